"""``rankwise analyze``: the LoRA paper's questions about trained adapters, as tables and PNGs.

* ``similarity A1 A2`` — subspace similarity φ per shared module (Hu et al. 2021, Sec. 7.2)
* ``spectrum ADAPTER`` — singular values, stable/effective rank, energy of each ``ΔW``
* ``amplification ADAPTER --model M`` — how ``ΔW`` amplifies directions of ``W`` (Sec. 7.3)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rankwise.cli import CliError


def _plot_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plot", metavar="DIR", help="also write PNG figures to DIR")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    p = sub.add_parser("similarity", help="subspace similarity phi(i, j) between two adapters")
    p.add_argument("adapter1", help="adapter directory (PEFT format)")
    p.add_argument("adapter2", help="adapter directory (PEFT format)")
    p.add_argument(
        "--factor",
        choices=("A", "B"),
        default="A",
        help="compare A factors (right singular vectors, default) or B factors (left)",
    )
    _plot_option(p)
    p = sub.add_parser("spectrum", help="singular values and ranks of each module's update")
    p.add_argument("adapter", help="adapter directory (PEFT format)")
    _plot_option(p)
    p = sub.add_parser("amplification", help="how each update amplifies directions of W")
    p.add_argument("adapter", help="adapter directory (PEFT format)")
    p.add_argument("--model", help="base model directory (default: the bundled MiniLM)")
    p.add_argument("--rank", type=int, help="directions to project on (default: each adapter's r)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-subspace baseline")
    _plot_option(p)


def _print(table: tuple[list[str], list[list[str]]]) -> None:
    from rankwise.analysis.report import format_table

    print(format_table(*table))


def _plotted(paths: list[Any]) -> None:
    for path in paths:
        print(f"wrote {path}")


def _similarity(args: argparse.Namespace) -> int:
    from rankwise.analysis import adapter_similarity
    from rankwise.analysis.report import similarity_table

    rows = adapter_similarity(args.adapter1, args.adapter2, factor=args.factor)
    _print(similarity_table(rows))
    if args.plot:
        from rankwise.analysis.plots import plot_similarity

        _plotted(
            plot_similarity(
                rows, args.plot, labels=(Path(args.adapter1).name, Path(args.adapter2).name)
            )
        )
    return 0


def _spectrum(args: argparse.Namespace) -> int:
    from rankwise.analysis import adapter_spectrum
    from rankwise.analysis.report import spectrum_table

    rows = adapter_spectrum(args.adapter)
    _print(spectrum_table(rows))
    if args.plot:
        from rankwise.analysis.plots import plot_spectra

        _plotted(plot_spectra(rows, args.plot))
    return 0


def load_base_model(name: str | None) -> Any:
    """A transformers ``AutoModel`` from a local directory (default: the bundled MiniLM)."""
    import transformers

    from rankwise.train.models import resolve_model_source

    return transformers.AutoModel.from_pretrained(resolve_model_source(name)).eval()


def _amplification(args: argparse.Namespace) -> int:
    from rankwise.analysis import adapter_amplification
    from rankwise.analysis.report import amplification_table

    if args.rank is not None and args.rank < 1:
        raise CliError(f"--rank must be a positive integer; found {args.rank}")
    model = load_base_model(args.model)
    rows = adapter_amplification(model, args.adapter, rank=args.rank, generator=args.seed)
    _print(amplification_table(rows))
    if args.plot:
        from rankwise.analysis.plots import plot_amplification

        _plotted(plot_amplification(rows, args.plot))
    return 0


_RUN: dict[str, Callable[[argparse.Namespace], int]] = {
    "similarity": _similarity,
    "spectrum": _spectrum,
    "amplification": _amplification,
}


def run(args: argparse.Namespace) -> int:
    return _RUN[args.analysis](args)
