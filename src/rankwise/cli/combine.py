"""``rankwise combine``: one adapter from several (exact linear, SVD, TIES or DARE)."""

from __future__ import annotations

import argparse
import math

from rankwise.analysis.algebra import COMBINE_METHODS
from rankwise.cli import (
    CliError,
    add_out_option,
    copy_sidecars,
    figure_directory,
    new_output_dir,
    require_plotting,
    seed,
)
from rankwise.cli.resize import spectrum_figures


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, found {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="+", help="adapter directories (PEFT format)")
    add_out_option(parser, "directory of the new adapter")
    parser.add_argument("--weights", type=_floats, help="comma-separated weights (default all 1)")
    parser.add_argument(
        "--method",
        choices=COMBINE_METHODS,
        default="linear",
        help="linear: exact sum (rank = sum of ranks); svd: best rank-k of the sum; "
        "ties / dare: the papers' merges on the dense updates, then rank k (default linear)",
    )
    parser.add_argument(
        "--rank",
        type=int,
        help="rank k for svd/ties/dare (default: the largest r or rank_pattern entry of the inputs, as PEFT)",
    )
    parser.add_argument("--density", type=float, help="ties/dare: fraction kept (0.5)")
    parser.add_argument("--seed", type=seed, help="dare: seed of the drop masks (0)")
    parser.add_argument(
        "--head-from",
        type=int,
        metavar="N",
        help="take the trained head, biases and embeddings of the N-th adapter (1-based) when "
        "they differ (default: they must agree)",
    )
    parser.add_argument(
        "--plot",
        type=figure_directory,
        metavar="DIR",
        help="also write the new adapter's spectrum PNG",
    )


def run(args: argparse.Namespace) -> int:
    from rankwise.analysis import combine_adapters
    from rankwise.analysis.report import format_table, layer_table

    if args.rank is not None and args.rank < 1:
        raise CliError(f"--rank must be a positive integer; found {args.rank}")
    if args.rank is not None and args.method == "linear":
        raise CliError(
            "--rank: --method linear is exact (its rank is the sum of the inputs' ranks) and "
            "takes no rank; use --method svd (or ties / dare) for a rank-k result"
        )
    if args.weights is not None and len(args.weights) != len(args.adapters):
        raise CliError(
            f"--weights: expected {len(args.adapters)} numbers (one per adapter), "
            f"found {len(args.weights)}"
        )
    if args.weights is not None and not all(math.isfinite(w) for w in args.weights):
        raise CliError(f"--weights: expected finite numbers, found {args.weights}")
    # options another method ignores: refused rather than ignored without a word
    if args.density is not None and args.method not in ("ties", "dare"):
        raise CliError(
            f"--density: only --method ties or dare uses it, found --method {args.method}"
        )
    if args.seed is not None and args.method != "dare":
        raise CliError(f"--seed: only --method dare uses it, found --method {args.method}")
    density = 0.5 if args.density is None else args.density
    if args.method in ("ties", "dare") and not 0.0 < density <= 1.0:
        raise CliError(f"--density: expected a fraction in (0, 1], found {density}")
    head = args.head_from
    if head is not None and not 1 <= head <= len(args.adapters):
        raise CliError(f"--head-from: expected 1..{len(args.adapters)}, found {head}")
    require_plotting(args.plot)
    with new_output_dir(args.out, outside={"--plot": args.plot}) as tmp:
        rows = combine_adapters(
            args.adapters,
            tmp,
            args.weights,
            method=args.method,
            rank=args.rank,
            density=density,
            generator=0 if args.seed is None else args.seed,
            extras_from=None if head is None else head - 1,
        )
        print(format_table(*layer_table(rows)))
        # task file, tokenizer: predict/evaluate work on it
        copy_sidecars(args.adapters[0 if head is None else head - 1], str(tmp))
        plotted = spectrum_figures(tmp, args.plot)
    print(f"wrote {args.out}")
    for path in plotted:
        print(f"wrote {path}")
    return 0
