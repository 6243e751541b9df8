"""``rankwise compress-image``: the classic SVD image-compression figure, plus ID and Monarch.

A grayscale image is a matrix; its best rank-k approximation is the truncated SVD
(Eckart–Young). Next to it: a column interpolative decomposition (k actual pixel columns) and
a Monarch approximation (Dao et al. 2022) at the same parameter count. Writes
``DIR/compress_grid.png`` (reconstructions), ``DIR/spectrum.png`` (singular values, linear and
log, and cumulative energy against rank) and prints compression ratio and relative error.

Parameter counts for an m×n image: rank-k SVD ``k(m+n)`` (S folded into U), ID ``k(m+n−k)``
(k stored columns, plus Z without its identity block; the k indices are not counted),
Monarch with b blocks ``b(m+n)``. So Monarch matches SVD exactly when ``b = k`` — which needs
b to divide both m and n. The image is therefore center-cropped: to multiples of
``lcm(ranks)`` when that keeps at least half of each side (the default image, 427×640, becomes
400×600 for ranks 5, 20, 50, so b = k exactly); otherwise to multiples of 16 (8, 4, 2 or
none when a smaller image would lose more, or fall below the largest rank), and each rank k
uses the common divisor b of the cropped sides nearest to k (the parameter count shown is then
Monarch's own, the nearest available to k(m+n)).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from rankwise.cli import CliError, figure_directory, seed
from rankwise.io.files import default_file_mode, made_parents

DEFAULT_IMAGE = "china.jpg (scikit-learn sample image)"


class Row(NamedTuple):
    method: str
    rank: int
    params: int
    ratio: float
    error: float


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
    parser.add_argument("--seed", type=seed, default=0, help="seed of the randomized ID")


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


def load_gray(path: str | None) -> np.ndarray:
    """The image as a float64 (H, W) matrix in [0, 1] (ITU-R BT.601 luma for colour)."""
    if path is None:
        from sklearn.datasets import load_sample_image

        pixels = np.asarray(load_sample_image("china.jpg"), dtype=np.float64) / 255.0
    else:
        from PIL import Image  # a dependency of matplotlib

        if not Path(path).is_file():
            raise FileNotFoundError(f"image: no such file {path!r}")
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError as err:  # not an OSError: would be a traceback
            raise ValueError(f"image {path!r}: {err}") from None
        with opened as image:
            if image.mode.startswith(("I", "F")):  # 16/32-bit grayscale: RGB would clip at 255
                gray = np.asarray(image, dtype=np.float64)
                top = float(gray.max()) if gray.size else 0.0
                full = 1.0 if image.mode == "F" else 65535.0  # 16-bit range for integer modes
                return gray / max(full, top) if top > 0 else gray
            pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return pixels[..., :3] @ np.array([0.299, 0.587, 0.114])


def crop_for_monarch(image: np.ndarray, ranks: tuple[int, ...]) -> np.ndarray:
    """Center-crop so Monarch block counts divide both sides (see the module docstring): to
    multiples of the first step of ``lcm(ranks)``, 16, 8, 4, 2 that keeps at least half of
    each side and the largest rank (1: no crop, always possible for ranks ``<= min(m, n)``)."""
    height, width = image.shape
    need = max(ranks)
    for step in (math.lcm(*ranks), 16, 8, 4, 2, 1):
        new_h, new_w = height // step * step, width // step * step
        if new_h >= max(need, height / 2) and new_w >= max(need, width / 2):
            break
    top, left = (height - new_h) // 2, (width - new_w) // 2
    return image[top : top + new_h, left : left + new_w]


def monarch_blocks(shape: tuple[int, int], rank: int) -> int:
    """The common divisor of both sides nearest to ``rank`` (the smaller one on a tie)."""
    divisors = [d for d in range(1, math.gcd(*shape) + 1) if math.gcd(*shape) % d == 0]
    return min(divisors, key=lambda d: (abs(d - rank), d))


def approximations(
    image: np.ndarray, ranks: tuple[int, ...], *, randomized: bool, seed: int
) -> tuple[list[Row], dict[tuple[str, int], np.ndarray], np.ndarray]:
    """Rank-k SVD, ID and Monarch reconstructions, their table rows, and the spectrum."""
    from rankwise.linalg import (
        id_reconstruct,
        interpolative,
        monarch_project,
        relative_error,
        truncated_svd,
    )

    m, n = image.shape
    full = truncated_svd(image)  # one thin SVD serves every rank
    rows, pictures = [], {}
    for k in ranks:
        b = monarch_blocks((m, n), k)
        d = interpolative(image, k, randomized=randomized, generator=seed)
        candidates = {
            "SVD": ((full.U[:, :k] * full.S[:k]) @ full.Vh[:k], k * (m + n)),
            "ID": (id_reconstruct(image, d), k * (m + n - k)),
            f"Monarch (b={b})": (monarch_project(image, b).to_dense(), b * (m + n)),
        }
        for method, (approx, params) in candidates.items():
            pictures[(method.split(" ")[0], k)] = approx
            error = relative_error(image, approx)
            rows.append(Row(method, k, params, m * n / params, error))
    return rows, pictures, full.S


def _save(figure: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            figure.savefig(handle, format="png", dpi=110)
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def plot_grid(image: np.ndarray, rows: list[Row], pictures: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    ranks = sorted({r.rank for r in rows})
    methods = ["SVD", "ID", "Monarch"]
    aspect = image.shape[0] / image.shape[1]
    figure = Figure(figsize=(4 * 3.2, len(ranks) * (3.2 * aspect + 0.7) + 0.6))
    axes = figure.subplots(len(ranks), 4, squeeze=False)
    by_key = {(r.method.split(" ")[0], r.rank): r for r in rows}
    for i, k in enumerate(ranks):
        axes[i, 0].set_axis_off()
        if i == 0:
            axes[i, 0].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[i, 0].set_title(f"original {image.shape[0]}x{image.shape[1]}", fontsize=9)
        for j, method in enumerate(methods, start=1):
            row = by_key[(method, k)]
            ax = axes[i, j]
            ax.imshow(np.clip(pictures[(method, k)], 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_title(
                f"{row.method} k={k}\nerr {100 * row.error:.1f}%, {row.ratio:.1f}x smaller",
                fontsize=9,
            )
            ax.set_axis_off()
    figure.suptitle("rank-k reconstructions at (near) equal parameter counts")
    figure.tight_layout()
    _save(figure, path)


def plot_spectrum(S: np.ndarray, ranks: tuple[int, ...], path: Path) -> None:
    from matplotlib.figure import Figure

    from rankwise.linalg import energy

    index = np.arange(1, S.size + 1)
    figure = Figure(figsize=(13, 3.8))
    linear, log, cumulative = figure.subplots(1, 3)
    linear.plot(index, S)
    linear.set(title="singular values", xlabel="i", ylabel=r"$\sigma_i$")
    log.semilogy(index, np.maximum(S, np.finfo(float).tiny))
    log.set(title="singular values (log scale)", xlabel="i", ylabel=r"$\sigma_i$")
    cumulative.plot(index, energy(S))
    cumulative.set(
        title="cumulative energy",
        xlabel="rank k",
        ylabel=r"$\sum_{i \leq k} \sigma_i^2 \,/\, \sum_i \sigma_i^2$",
    )
    for ax in (linear, log, cumulative):
        for k in ranks:
            ax.axvline(k, color="gray", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    _save(figure, path)


def run(args: argparse.Namespace) -> int:
    image = load_gray(args.image)
    if max(args.ranks) > min(image.shape):  # no rank-k approximation beyond min(m, n)
        raise CliError(
            f"--ranks: expected ranks <= {min(image.shape)} (the image is "
            f"{image.shape[0]}x{image.shape[1]}), found {max(args.ranks)}"
        )
    image = crop_for_monarch(image, args.ranks)
    rows, pictures, S = approximations(
        image, args.ranks, randomized=args.randomized, seed=args.seed
    )
    created = not args.out.exists()  # made here: removed again if the figures fail
    with made_parents(args.out):  # and so are the parents made for it
        args.out.mkdir(exist_ok=True)
        try:
            plot_grid(image, rows, pictures, args.out / "compress_grid.png")
            plot_spectrum(S, args.ranks, args.out / "spectrum.png")
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
