"""How ``ΔW`` relates to ``W``: the LoRA paper's feature-amplification measure.

Hu et al. 2021 (LoRA, Sec. 7.3, Table 7) project ``W`` onto the ``r``-dimensional subspace of
``ΔW``: with ``U: (out, r)`` and ``V: (in, r)`` the top-``r`` left/right singular vectors of
``ΔW``, ``‖UᵀWV‖_F`` is small compared with the same projection onto ``W``'s own top-``r``
directions (``= sqrt(Σ_{i≤r} σᵢ(W)²)``), yet larger than onto a random ``r``-subspace: ``ΔW``
amplifies directions that ``W`` has but does not emphasize. The amplification factor is
``‖ΔW‖_F / ‖UᵀWV‖_F`` (≈ 21.5 for ``W_q`` at ``r = 4`` on GPT-3 in the paper).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rankwise.analysis._common import as_generator, check_matrix, work_dtype
from rankwise.errors import ShapeMismatchError
from rankwise.linalg import truncated_svd


class Amplification(NamedTuple):
    """Norms of Table 7 of the LoRA paper for one weight matrix (all Frobenius norms)."""

    rank: int  # r: the number of directions projected on
    delta_norm: float  # ‖ΔW‖_F
    weight_norm: float  # ‖W‖_F
    delta_directions: float  # ‖Uᵀ W V‖_F with U, V the top-r singular vectors of ΔW
    weight_directions: float  # the same with W's own top-r singular vectors
    random_directions: float  # the same with random orthonormal r-subspaces
    factor: float  # delta_norm / delta_directions


def numerical_rank(S: Tensor, shape: tuple[int, int], *, eps: float | None = None) -> int:
    """Singular values above ``max(shape)·eps·σ₁`` (NumPy's ``matrix_rank`` rule).

    ``eps`` defaults to the machine epsilon of ``S``'s dtype; pass the input's when ``S`` was
    computed in a wider working precision (a float16 matrix has float16 rounding noise).
    """
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    eps = torch.finfo(S.dtype).eps if eps is None else eps
    tol = max(shape) * eps * float(S[0])
    return int((S > tol).sum())


def rounded_rank(S: Tensor, shape: tuple[int, int], input_dtype: torch.dtype) -> int:
    """The numerical rank of a matrix given in ``input_dtype`` whose singular values ``S``
    were computed in a wider working copy.

    float32/float64: :func:`numerical_rank` with the input's epsilon (NumPy's rule). float16 and
    bfloat16: NumPy's ``max(shape)·eps·σ₁`` models rounding *during* an SVD in that precision
    and exceeds σ₁ for bfloat16 from 128 columns on, calling every such update zero. The
    working copy is float32, so only the input's own rounding ``E`` is noise, with
    ``‖E‖₂ ≤ ‖E‖_F ≤ u·‖ΔW‖_F`` (``u = eps/2``, ``‖ΔW‖_F = ‖S‖₂``): values above that bound,
    and above the working precision's NumPy tolerance, count.
    """
    if input_dtype not in (torch.float16, torch.bfloat16):
        return numerical_rank(S, shape, eps=torch.finfo(input_dtype).eps)
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    unit = torch.finfo(input_dtype).eps / 2
    working = max(shape) * torch.finfo(S.dtype).eps * float(S[0])
    tol = max(unit * float(torch.linalg.vector_norm(S)), working)
    return int((S > tol).sum())


def _random_basis(n: int, r: int, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """Orthonormal ``(n, r)`` basis of a uniformly random ``r``-subspace (QR of a Gaussian)."""
    G = torch.randn(n, r, generator=gen, dtype=dtype)
    Q, R = torch.linalg.qr(G)
    return Q * torch.sign(torch.diagonal(R))  # sign fix: Haar-distributed columns


def amplification(
    W: Tensor,
    delta: Tensor,
    *,
    rank: int | None = None,
    generator: torch.Generator | int | None = None,
) -> Amplification:
    """Measure how ``delta`` (``ΔW``) amplifies directions of ``W`` (both ``(out, in)``).

    ``rank`` defaults to the numerical rank of ``delta`` (an adapter's ``r``; :func:`rounded_rank`). The random
    baseline draws one pair of random subspaces from ``generator``.
    """
    check_matrix(W, name="W")
    check_matrix(delta, name="delta")
    if W.shape != delta.shape:
        raise ShapeMismatchError(
            f"W and delta must have the same shape; found {tuple(W.shape)} and {tuple(delta.shape)}"
        )
    input_dtype = delta.dtype  # its rounding level, not the working copy's, is the noise
    dtype = work_dtype(W, delta)
    W, delta = W.to(dtype), delta.to(dtype)
    d = truncated_svd(delta)  # U (out, k), S (k,), Vh (k, in)
    r = rounded_rank(d.S, tuple(W.shape), input_dtype) if rank is None else rank
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= d.S.numel():
        raise ValueError(
            f"rank must be an integer in [1, {d.S.numel()}]; found {rank!r} (delta may be zero)"
        )
    on_delta = d.U[:, :r].mT @ W @ d.Vh[:r].mT  # (r, r)
    on_weight = truncated_svd(W, r).S  # top-r σ(W): ‖U_Wᵀ W V_W‖_F² = Σ σᵢ²
    gen = as_generator(generator)
    U_rand = _random_basis(W.shape[0], r, dtype, gen)  # (out, r)
    V_rand = _random_basis(W.shape[1], r, dtype, gen)  # (in, r)
    delta_norm = float(torch.linalg.norm(d.S))
    projected = float(torch.linalg.norm(on_delta))
    return Amplification(
        rank=r,
        delta_norm=delta_norm,
        weight_norm=float(torch.linalg.norm(W)),
        delta_directions=projected,
        weight_directions=float(torch.linalg.norm(on_weight)),
        random_directions=float(torch.linalg.norm(U_rand.mT @ W @ V_rand)),
        factor=delta_norm / projected if projected > 0 else float("inf"),
    )
