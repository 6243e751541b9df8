"""``rankwise compress-image``: the classic SVD image-compression figure, plus ID and Monarch.

Writes ``DIR/compress_grid.png`` (reconstructions), ``DIR/spectrum.png`` (singular values,
linear and log, and cumulative energy against rank) and prints compression ratio and relative
error. The maths, the parameter counts and the crop that lets Monarch match SVD's count are
:mod:`rankwise.analysis.image`'s; the figures :mod:`rankwise.analysis.plots`'.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from rankwise.cli import CliError, figure_directory, seed
from rankwise.io.files import made_parents

DEFAULT_IMAGE = "china.jpg (scikit-learn sample image)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "image", nargs="?", help=f"image file (PNG/JPEG/...; default: {DEFAULT_IMAGE})"
    )
    parser.add_argument(
        "--ranks", type=_ranks, default=(5, 20, 50), help="comma-separated ranks (default 5,20,50)"
    )
    parser.add_argument(
        "--out",
        "--output",
        dest="out",
        type=lambda value: Path(figure_directory(value)),
        required=True,
        help="directory for the PNG figures",
    )
    parser.add_argument(
        "--randomized", action="store_true", help="randomized ID (default: pivoted QR)"
    )
    parser.add_argument("--seed", type=seed, help="--randomized: seed of the ID (0)")


def _ranks(text: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers such as 5,20,50; found {text!r}"
        ) from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; found {text!r}")
    return tuple(sorted(set(ranks)))


def run(args: argparse.Namespace) -> int:
    from rankwise.analysis import plots
    from rankwise.analysis.image import approximations, crop_for_monarch, load_gray

    if args.seed is not None and not args.randomized:  # it was ignored without a word
        raise CliError(f"--seed: only --randomized uses it, found --seed {args.seed} without it")
    image = load_gray(args.image)
    if max(args.ranks) > min(image.shape):  # no rank-k approximation beyond min(m, n)
        raise CliError(
            f"--ranks: expected ranks <= {min(image.shape)} (the image is "
            f"{image.shape[0]}x{image.shape[1]}), found {max(args.ranks)}"
        )
    image = crop_for_monarch(image, args.ranks)
    rows, pictures, S = approximations(
        image, args.ranks, randomized=args.randomized, seed=0 if args.seed is None else args.seed
    )
    created = not args.out.exists()  # made here: removed again if the figures fail
    with made_parents(args.out):  # and so are the parents made for it
        args.out.mkdir(exist_ok=True)
        try:
            plots.plot_compression(image, rows, pictures, args.out)
            plots.plot_image_spectrum(S, args.ranks, args.out)
        except BaseException:
            if created:
                shutil.rmtree(args.out, ignore_errors=True)
            raise
    print(f"image {image.shape[0]}x{image.shape[1]} ({image.size} pixels)")
    print(f"{'method':<16} {'rank':>5} {'params':>9} {'compression':>12} {'rel. error':>11}")
    for row in rows:
        print(
            f"{row.method:<16} {row.rank:>5} {row.params:>9} {row.ratio:>11.1f}x "
            f"{100 * row.error:>10.2f}%"
        )
    print(f"wrote {args.out / 'compress_grid.png'} and {args.out / 'spectrum.png'}")
    return 0
