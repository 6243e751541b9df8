"""``rankwise extract``: a LoRA adapter from a fully fine-tuned model and its base (by SVD)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rankwise.cli import (
    CliError,
    add_out_option,
    energy_fraction,
    figure_directory,
    new_output_dir,
    require_plotting,
    seed,
)
from rankwise.cli.resize import spectrum_figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        "--model",
        dest="base",
        help="base model directory (default: the bundled MiniLM)",
    )
    parser.add_argument("--finetuned", required=True, help="fine-tuned model directory")
    add_out_option(parser, "adapter directory to write")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="rank of every layer (capped at min(out, in))")
    size.add_argument(
        "--energy", type=energy_fraction, help="keep this fraction of each |dW|_F^2, per layer"
    )
    parser.add_argument(
        "--targets", help="comma-separated module names (default: every changed linear layer)"
    )
    parser.add_argument("--randomized", action="store_true", help="randomized SVD (needs --rank)")
    parser.add_argument("--seed", type=seed, help="--randomized: seed of the SVD (0)")
    parser.add_argument(
        "--plot", type=figure_directory, metavar="DIR", help="also write the adapter's spectrum PNG"
    )


def _read_task(source: str) -> dict | None:
    """The fine-tuned model's ``rankwise_task.json`` (None without one); read and checked
    before anything is written, so a broken one leaves no half-made adapter behind."""

    from rankwise.train.inference import TASK_FILE, read_task_info

    if not (Path(source) / TASK_FILE).is_file():
        return None
    try:
        return read_task_info(source)
    except ValueError as err:
        raise CliError(f"--finetuned: {err}") from None


def run(args: argparse.Namespace) -> int:
    from rankwise.analysis import extract_adapter
    from rankwise.analysis.report import format_table, layer_table
    from rankwise.train.inference import copy_extract_sidecars
    from rankwise.train.models import load_finetuned_pair, resolve_model_source

    if args.rank is not None and args.rank < 1:
        raise CliError(f"--rank must be a positive integer; found {args.rank}")
    if args.randomized and args.rank is None:  # before both models load, naming the options
        given = f"--energy {args.energy}" if args.energy is not None else "no --rank"
        raise CliError(f"--randomized needs --rank (an integer); found {given}")
    if args.seed is not None and not args.randomized:  # it was ignored without a word
        raise CliError(f"--seed: only --randomized uses it, found --seed {args.seed} without it")
    task = _read_task(args.finetuned)
    require_plotting(args.plot)
    with new_output_dir(args.out, outside={"--plot": args.plot}) as tmp:
        base, tuned, heads = load_finetuned_pair(args.base, args.finetuned)
        seq_cls = type(tuned).__name__.endswith("ForSequenceClassification")
        targets = (
            [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
        )
        report = extract_adapter(
            base,
            tuned,
            tmp,
            rank=args.rank,
            energy=args.energy,
            targets=targets,
            randomized=args.randomized,
            generator=0 if args.seed is None else args.seed,
            task_type="SEQ_CLS" if seq_cls else None,
            modules_to_save=heads,
            base_model_name_or_path=resolve_model_source(args.base),
        )
        if heads:
            print(f"stored whole (modules_to_save): {', '.join(heads)}")
        copied = copy_extract_sidecars(
            args.finetuned,
            str(tmp),
            task=task,
            base=resolve_model_source(args.base),
            tuned_config=tuned.config,
        )
        print(format_table(*layer_table(report.layers)))
        if report.uncaptured:
            print(
                "not captured (changed outside the extracted weights): "
                + ", ".join(report.uncaptured)
            )
        plotted = spectrum_figures(tmp, args.plot)
    print(f"wrote {args.out}" + (f" (with {', '.join(copied)})" if copied else ""))
    for path in plotted:
        print(f"wrote {path}")
    return 0
