"""Moore–Penrose pseudo-inverse and least-squares factors, both through the SVD.

Never ``(AᵀA)⁻¹Aᵀ``: forming ``AᵀA`` squares the condition number (κ(AᵀA) = κ(A)²), so in
float32 a matrix with κ ≈ 10⁴ would already lose every digit. With ``A = U Σ Vᵀ``,
``A⁺ = V Σ⁺ Uᵀ`` where ``Σ⁺`` inverts the singular values above a cutoff and zeroes the rest
(Golub & Van Loan, *Matrix Computations*, 4th ed., §5.5.2).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rankwise.errors import ShapeMismatchError
from rankwise.linalg._validate import (
    ArrayLike,
    as_matrix,
    check_one_of,
    times_power_of_two,
    to_output,
    unit_scaled,
)


def _cutoff(S: torch.Tensor, shape: tuple[int, ...], rtol: float | None) -> torch.Tensor:
    # Default as numpy/torch: max(m, n) · eps(dtype), relative to σ_max.
    if rtol is None:
        rtol = max(shape) * torch.finfo(S.dtype).eps
    elif isinstance(rtol, (bool, np.bool_)) or not (
        isinstance(rtol, (int, float, np.integer, np.floating))
        and math.isfinite(rtol)
        and rtol >= 0
    ):
        raise ValueError(f"rtol: expected a finite number >= 0, found {rtol!r}")
    return rtol * S.max() if S.numel() else S.new_zeros(())


def _pinv_tensor(A: torch.Tensor, rtol: float | None) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)  # (m, p), (p,), (p, n)
    keep = S > _cutoff(S, tuple(A.shape), rtol)
    inverse = torch.where(keep, 1.0 / torch.where(keep, S, torch.ones_like(S)), 0.0)  # Σ⁺
    return (Vh.mT * inverse) @ U.mT  # (n, m) = V Σ⁺ Uᵀ


def pinv(A: ArrayLike, *, rtol: float | None = None) -> ArrayLike:
    """Moore–Penrose pseudo-inverse ``A⁺ = V Σ⁺ Uᵀ`` (n, m) of an (m, n) matrix.

    Singular values ``σ_i <= rtol · σ_max`` are treated as zero; the default ``rtol`` is
    ``max(m, n) · eps(dtype)`` (the convention of ``numpy.linalg.matrix_rank`` and
    ``torch.linalg.pinv``). ``A⁺ b`` is then the minimum-norm least-squares solution.
    """
    matrix, was_numpy = as_matrix(A, "A")
    return to_output(_pinv_tensor(matrix, rtol), was_numpy)


def lstsq_factor(
    M: ArrayLike, *, left: ArrayLike | None = None, right: ArrayLike | None = None
) -> ArrayLike:
    """The missing factor of ``M ≈ A B`` in the least-squares sense.

    * ``left=A`` (m, r): returns ``B = A⁺ M`` (r, n) = argmin_B ‖A B − M‖_F;
    * ``right=B`` (r, n): returns ``A = M B⁺`` (m, r) = argmin_A ‖A B − M‖_F.

    Exactly one of ``left``/``right`` is given. When the factor is rank deficient the
    minimum-Frobenius-norm minimiser is returned (pseudo-inverse through the SVD).
    """
    which = check_one_of(left=left, right=right)
    matrix, was_numpy = as_matrix(M, "M")
    factor = as_matrix(left if which == "left" else right, which).tensor
    dtype = torch.promote_types(matrix.dtype, factor.dtype)
    matrix, factor = matrix.to(dtype), factor.to(device=matrix.device, dtype=dtype)
    if which == "left" and factor.shape[0] != matrix.shape[0]:
        raise ShapeMismatchError(
            f"left: expected {matrix.shape[0]} rows (M is {tuple(matrix.shape)}), "
            f"found shape {tuple(factor.shape)}"
        )
    if which == "right" and factor.shape[1] != matrix.shape[1]:
        raise ShapeMismatchError(
            f"right: expected {matrix.shape[1]} columns (M is {tuple(matrix.shape)}), "
            f"found shape {tuple(factor.shape)}"
        )
    # scale-free: A⁺ of a subnormal factor overflows though A⁺ M is O(1) (float32 at 1e-41)
    factor, e_factor = unit_scaled(factor)
    matrix, e_matrix = unit_scaled(matrix)
    if which == "left":
        result = _pinv_tensor(factor, None) @ matrix  # (r, m) @ (m, n) -> (r, n)
    else:
        result = matrix @ _pinv_tensor(factor, None)  # (m, n) @ (n, r) -> (m, r)
    if e_matrix != e_factor:
        result = times_power_of_two(result, e_matrix - e_factor)
    return to_output(result, was_numpy)
