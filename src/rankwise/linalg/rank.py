"""Rank and energy helpers: how much of a matrix a low-rank approximation keeps.

With singular values ``σ_1 >= σ_2 >= ... >= 0`` the *energy* kept by the top ``r`` triplets is
``Σ_{i<=r} σ_i² / Σ_i σ_i²`` — by Eckart–Young–Mirsky, ``1 - energy`` is the squared relative
Frobenius error of the best rank-``r`` approximation.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

from rankwise.linalg._validate import (
    ArrayLike,
    as_matrix,
    check_fraction,
    peak_exponent,
    times_power_of_two,
    to_output,
)


def _spectrum(S: Any, name: str = "S") -> tuple[torch.Tensor, bool]:
    was_numpy = isinstance(S, np.ndarray)
    # float128/longdouble, strings, objects: torch has no such dtype (from_numpy raises)
    if was_numpy and (S.dtype.kind not in "biuf" or S.dtype.itemsize > 8):
        raise ValueError(f"{name}: expected a real numeric array, found dtype {S.dtype}")
    # np.require keeps a 0-D array 0-D (ascontiguousarray made it 1-D: energy of a scalar)
    tensor = torch.from_numpy(np.require(S, requirements="C")) if was_numpy else S
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, found {type(S)}")
    if tensor.ndim != 1 or tensor.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D vector, found shape {tuple(S.shape)}")
    if tensor.is_complex():
        raise ValueError(f"{name}: expected real singular values, found dtype {tensor.dtype}")
    tensor = tensor.to(torch.float64)
    bad = ~torch.isfinite(tensor) | (tensor < 0)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name}: expected finite non-negative singular values, found {int(bad.sum())} "
            f"others (first: {name}[{first}] = {float(tensor[first])})"
        )
    # descending, as svdvals gives it (an ascending eigvalsh output gave a wrong rank); a few
    # ulps of disorder between equal values are rounding, not order
    rises = tensor[1:] > tensor[:-1] * (1 + 64 * torch.finfo(torch.float64).eps)
    if bool(rises.any()):
        at = int(rises.nonzero()[0, 0])
        raise ValueError(
            f"{name}: expected singular values in descending order, found {name}[{at}] = "
            f"{float(tensor[at])} < {name}[{at + 1}] = {float(tensor[at + 1])} (sort it with "
            "torch.sort(..., descending=True))"
        )
    return tensor, was_numpy


def energy(S: ArrayLike) -> ArrayLike:
    """Cumulative energy ``e[r-1] = Σ_{i<=r} σ_i² / Σ_i σ_i²`` of a descending spectrum ``S``.

    Returns a float64 vector of the same length (numpy for numpy input). ``e[-1] == 1``; an
    all-zero spectrum has energy 1 at every rank (nothing is lost by truncating it).
    """
    sigma, was_numpy = _spectrum(S)
    peak = sigma.max()
    if peak == 0:
        return to_output(torch.ones_like(sigma), was_numpy)
    squares = (
        sigma / peak
    ).square()  # scale-free: σ² of 1e160 or 1e-170 neither over- nor underflows
    cumulative = torch.cumsum(squares, 0)
    # over the cumulative sum's own last entry: e[-1] is 1 exactly (over squares.sum(), which
    # rounds otherwise, it was 1 ± 6e-15, and sqrt(1 - e) of a full-rank truncation NaN)
    return to_output(cumulative / cumulative[-1], was_numpy)


def rank_for_energy(S: ArrayLike, fraction: float) -> int:
    """Smallest ``r >= 1`` whose top-``r`` triplets keep at least ``fraction`` of the energy.

    ``fraction`` must lie in (0, 1]. The comparison allows ``4·len(S)`` ulps of rounding in
    the cumulative sum, so a spectrum built to keep exactly 80% at rank 2 gives rank 2 for
    0.8. ``fraction = 1`` gives the numerical rank instead (``σ > len(S)·eps·σ_1``, ``eps`` of
    ``S``'s dtype: :func:`numpy.linalg.matrix_rank`'s rule for a square matrix; given the
    matrix, :func:`~rankwise.linalg.truncated_svd` with ``energy=1`` uses its ``max(m, n)``):
    the slack would drop a last ``σ`` as large as 3e-8·σ_1 in float64, and no slack would keep
    every rounding-level ``σ`` of a rank-deficient matrix.
    """
    fraction = check_fraction(fraction, "fraction", closed_right=True)
    cumulative, _ = _spectrum(S)
    if fraction == 1.0:
        eps = float(torch.finfo(torch.float64).eps)  # integer spectra: as float64
        if isinstance(S, torch.Tensor) and S.is_floating_point():
            eps = float(torch.finfo(S.dtype).eps)
        elif isinstance(S, np.ndarray) and S.dtype.kind == "f":
            eps = float(np.finfo(S.dtype).eps)
        tol = cumulative.numel() * eps * float(cumulative.max())
        return max(1, int((cumulative > tol).sum()))
    cumulative = torch.as_tensor(energy(cumulative))
    slack = 4 * cumulative.numel() * torch.finfo(torch.float64).eps
    reached = torch.nonzero(cumulative >= fraction - slack)
    return int(reached[0, 0]) + 1


def stable_rank(M: ArrayLike) -> float:
    """Stable rank ``‖M‖_F² / ‖M‖_2²`` (Rudelson & Vershynin 2007); 0 for the zero matrix."""
    matrix = as_matrix(M, "M").tensor.to(torch.float64)
    sigma = torch.linalg.svdvals(matrix)
    if sigma[0] == 0:
        return 0.0
    return float((sigma / sigma[0]).square().sum())  # scale-free (no σ² overflow/underflow)


def effective_rank(M: ArrayLike) -> float:
    """Effective rank ``exp(H(p))``, ``p_i = σ_i / Σ σ_j`` (Roy & Vetterli 2007, Def. 1).

    Equals ``r`` for ``r`` equal singular values and lies in ``[1, min(m, n)]``; 0 for the
    zero matrix.
    """
    matrix = as_matrix(M, "M").tensor.to(torch.float64)
    sigma = torch.linalg.svdvals(matrix)
    total = sigma.sum()
    if total == 0:
        return 0.0
    p = sigma[sigma > 0] / total
    value = math.exp(float(-(p * p.log()).sum()))
    # clamped to the bounds it holds in exact arithmetic (eye(5) gave 5.000000000000001)
    return min(max(value, 1.0), float(p.numel()))


def relative_error(
    M: ArrayLike, approx: ArrayLike, *, norm: Literal["fro", "spectral"] = "fro"
) -> float:
    """``‖M - approx‖ / ‖M‖`` in the Frobenius (default) or spectral norm (float64 maths)."""
    matrix = as_matrix(M, "M").tensor
    other = as_matrix(approx, "approx").tensor
    if other.shape != matrix.shape:
        raise ValueError(
            f"approx: expected shape {tuple(matrix.shape)} (that of M), found {tuple(other.shape)}"
        )
    if norm not in ("fro", "spectral"):
        raise ValueError(f"norm: expected 'fro' or 'spectral', found {norm!r}")
    matrix = matrix.to(torch.float64)
    other = other.to(device=matrix.device, dtype=torch.float64)
    # An exact power-of-two rescale: norms of 1e160 or 1e-170 entries neither overflow nor
    # underflow.
    exponent = peak_exponent(matrix)
    matrix, other = times_power_of_two(matrix, -exponent), times_power_of_two(other, -exponent)
    diff = matrix - other
    ord_ = "fro" if norm == "fro" else 2
    scale = float(torch.linalg.matrix_norm(matrix, ord=ord_))
    if scale == 0:
        return 0.0 if not bool(diff.any()) else math.inf
    return float(torch.linalg.matrix_norm(diff, ord=ord_)) / scale
