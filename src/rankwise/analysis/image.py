"""Low-rank image compression: the classic SVD figure's numbers, plus ID and Monarch.

A grayscale image is a matrix; its best rank-k approximation is the truncated SVD
(Eckart–Young). Next to it: a column interpolative decomposition (k actual pixel columns) and
a Monarch approximation (Dao et al. 2022) at the same parameter count.

Parameter counts for an m×n image: rank-k SVD ``k(m+n)`` (S folded into U), ID ``k(m+n−k)``
(k stored columns, plus Z without its identity block; the k indices are not counted),
Monarch with b blocks ``b(m+n)``. So Monarch matches SVD exactly when ``b = k`` — which needs
b to divide both m and n. The image is therefore center-cropped (:func:`crop_for_monarch`):
to multiples of ``lcm(ranks)`` when that keeps at least half of each side (the default image,
427×640, becomes 400×600 for ranks 5, 20, 50, so b = k exactly); otherwise to multiples of
16 (8, 4, 2 or none when a smaller image would lose more, or fall below the largest rank), and
each rank k uses the common divisor b of the cropped sides nearest to k
(:func:`monarch_blocks`; the parameter count shown is then Monarch's own, the nearest
available to k(m+n)). The figures are :mod:`rankwise.analysis.plots`'; the command is
``rankwise compress-image``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np


class CompressionRow(NamedTuple):
    """One reconstruction: method, rank k, stored parameters, m·n / params, relative error."""

    method: str
    rank: int
    params: int
    ratio: float
    error: float


def load_gray(path: str | None) -> np.ndarray:
    """The image as a float64 (H, W) matrix in [0, 1] (ITU-R BT.601 luma for colour)."""
    if path is None:
        from sklearn.datasets import load_sample_image

        pixels = np.asarray(load_sample_image("china.jpg"), dtype=np.float64) / 255.0
    else:
        from PIL import Image  # a dependency of matplotlib

        if Path(path).is_dir():
            raise IsADirectoryError(f"image: {path!r} is a directory; expected an image file")
        if not Path(path).is_file():
            raise FileNotFoundError(f"image: no such file {path!r}")
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError as err:  # not an OSError: would be a traceback
            raise ValueError(f"image {path!r}: {err}") from None
        try:  # the pixels are decoded here: a truncated file fails now, by its name
            with opened as image:
                if image.mode.startswith(("I", "F")):  # 16/32-bit grayscale: RGB clips at 255
                    gray = np.asarray(image, dtype=np.float64)
                    if not np.isfinite(gray).all():  # a float TIFF: linalg would name "M"
                        bad = int((~np.isfinite(gray)).sum())
                        raise ValueError(f"image {path!r}: {bad} pixels are NaN or infinite")
                    top = float(gray.max()) if gray.size else 0.0
                    full = 1.0 if image.mode == "F" else 65535.0  # 16-bit range, integer modes
                    pixels = gray / max(full, top) if top > 0 else gray
                else:
                    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
                    pixels = rgb[..., :3] @ np.array([0.299, 0.587, 0.114])
        except OSError as err:  # "image file is truncated (28 bytes not processed)"
            raise ValueError(f"image {path!r}: {err}") from None
        return pixels
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
) -> tuple[list[CompressionRow], dict[tuple[str, int], np.ndarray], np.ndarray]:
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
            rows.append(CompressionRow(method, k, params, m * n / params, error))
    return rows, pictures, full.S
