"""Subspace similarity between LoRA factors (Hu et al. 2021, "LoRA", Sec. 7.2, Eq. 4).

For two factors ``A₁: (r₁, in)`` and ``A₂: (r₂, in)`` with right-singular matrices
``U_{A₁}: (in, r₁)`` and ``U_{A₂}: (in, r₂)`` (columns in decreasing singular-value order),

    φ(A₁, A₂, i, j) = ‖U_{A₁}^{i ⊤} U_{A₂}^{j}‖_F² / min(i, j)  ∈ [0, 1],

``U^i`` being the first ``i`` columns: how much of the span of the top ``i`` directions of one
adapter lies in the span of the top ``j`` directions of the other (1: contained, 0: orthogonal).
For ``B`` factors (``(out, r)``) the same is done with the *left* singular vectors.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from rankwise.analysis._common import check_matrix, work_dtype
from rankwise.errors import ShapeMismatchError
from rankwise.linalg import truncated_svd

Factor = Literal["A", "B"]


def factor_basis(X: Tensor, *, factor: Factor = "A") -> Tensor:
    """Orthonormal basis of a factor's row space (``A``) or column space (``B``), as columns.

    ``A: (r, in)`` gives its right singular vectors ``(in, r)``; ``B: (out, r)`` its left
    singular vectors ``(out, r)``; columns ordered by decreasing singular value. Directions
    with zero singular value (a rank-deficient factor) are arbitrary, so φ is meaningful up to
    the factor's numerical rank.
    """
    _factor_basis_checked(X, factor, name=f"factor {factor}")
    return _basis(X, factor, name=f"factor {factor}")


def _factor_basis_checked(X: Tensor, factor: Factor, *, name: str) -> None:
    check_matrix(X, name=name)
    if factor not in ("A", "B"):
        raise ValueError(
            f"factor must be 'A' (right singular vectors) or 'B' (left); found {factor!r}"
        )


def _basis(X: Tensor, factor: Factor, *, name: str) -> Tensor:
    svd = truncated_svd(X.to(work_dtype(X)))
    if float(svd.S[0]) == 0.0:
        raise ValueError(
            f"{name} is all zeros (an untrained LoRA B?): it spans no subspace to compare"
        )
    return svd.Vh.mT if factor == "A" else svd.U  # (in, k) or (out, k), k = min(X.shape)


def subspace_similarity(X1: Tensor, X2: Tensor, *, factor: Factor = "A") -> Tensor:
    """The LoRA paper's φ for every ``(i, j)``: an ``r₁ × r₂`` matrix, entry ``[i-1, j-1] = φ(i, j)``.

    ``factor="A"`` compares ``A`` factors ``(r, in)`` through their right singular vectors;
    ``factor="B"`` compares ``B`` factors ``(out, r)`` through their left singular vectors.
    A factor with ``r`` above that dimension ``d`` has only ``d`` singular directions, so its
    side of the matrix is ``min(r, d)`` (φ(i, ·) is undefined for ``i > d``). ``φ(X, X)`` is all ones; for independent random subspaces ``E φ(i, j) ≈ max(i, j) / d``
    (``E‖U^{i⊤}V^{j}‖_F² = i·j/d`` in dimension ``d``). Computed in ``O(r₁ r₂ d)`` from the
    overlap matrix ``G = U₁ᵀU₂`` by 2-D cumulative sums of ``G²``.
    """
    # both checked first, each by its own name (which one holds the NaN, which one is empty)
    _factor_basis_checked(X1, factor, name=f"X1 (factor {factor})")
    _factor_basis_checked(X2, factor, name=f"X2 (factor {factor})")
    U1 = _basis(X1, factor, name=f"X1 (factor {factor})")  # (d, r1)
    U2 = _basis(X2, factor, name=f"X2 (factor {factor})")  # (d, r2)
    if U1.shape[0] != U2.shape[0]:
        side = "in (columns of A)" if factor == "A" else "out (rows of B)"
        raise ShapeMismatchError(
            f"the two {factor} factors must share their {side} dimension; "
            f"found {U1.shape[0]} and {U2.shape[0]}"
        )
    dtype = torch.promote_types(U1.dtype, U2.dtype)
    overlap = (U1.to(dtype).mT @ U2.to(dtype)).square()  # (r1, r2): cos² of principal pairs
    cumulative = overlap.cumsum(0).cumsum(1)  # [i-1, j-1] = ‖U1^{i⊤} U2^{j}‖_F²
    i = torch.arange(1, U1.shape[1] + 1, dtype=dtype)[:, None]  # (r1, 1)
    j = torch.arange(1, U2.shape[1] + 1, dtype=dtype)[None, :]  # (1, r2)
    return (cumulative / torch.minimum(i, j)).clamp(0.0, 1.0)
