"""``rankwise resize``: the best rank-k version of an adapter, computed in factored form."""

from __future__ import annotations

import argparse

from rankwise.cli import (
    CliError,
    add_out_option,
    copy_sidecars,
    energy_fraction,
    figure_directory,
    new_output_dir,
    require_plotting,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="source adapter directory (PEFT format)")
    add_out_option(parser, "directory of the new adapter")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="new rank (capped at each module's r)")
    size.add_argument(
        "--energy", type=energy_fraction, help="keep this fraction of each |dW|_F^2, per module"
    )
    parser.add_argument(
        "--plot",
        type=figure_directory,
        metavar="DIR",
        help="also write the new adapter's spectrum PNG",
    )


def run(args: argparse.Namespace) -> int:
    from rankwise.analysis import resize_adapter
    from rankwise.analysis.report import format_table, layer_table

    if args.rank is not None and args.rank < 1:
        raise CliError(f"--rank must be a positive integer; found {args.rank}")
    require_plotting(args.plot)
    with new_output_dir(args.out, outside={"--plot": args.plot}) as tmp:
        rows = resize_adapter(args.adapter, tmp, args.rank, energy=args.energy)
        print(format_table(*layer_table(rows)))
        copy_sidecars(args.adapter, str(tmp))  # task file, tokenizer: predict/evaluate work
        plotted = spectrum_figures(tmp, args.plot)
    print(f"wrote {args.out}")
    for path in plotted:
        print(f"wrote {path}")
    return 0


def spectrum_figures(adapter: object, directory: str | None) -> list:
    """The spectrum PNGs of the new ``adapter`` in ``directory`` (none without --plot)."""
    if not directory:
        return []
    from rankwise.analysis import adapter_spectrum
    from rankwise.analysis.plots import plot_spectra

    return plot_spectra(adapter_spectrum(adapter), directory)
