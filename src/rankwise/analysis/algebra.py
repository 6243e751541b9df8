"""Adapter algebra in factored form: resize, combine and extract low-rank updates.

A LoRA update is a product ``ΔW = B @ A`` with ``B: (out, r)`` and ``A: (r, in)``. Every
function here takes and returns such factor pairs (:class:`Factors`); scaling (``alpha / r``)
is the caller's business — fold it into ``B`` first (the model-level functions in
:mod:`rankwise.analysis.model` do).

Resizing and the exact combinations never form the dense ``out × in`` product: the SVD of
``B @ A`` comes from QR factorizations of ``B`` and ``Aᵀ`` and the SVD of a small ``r × r``
core, ``O((out + in)·r²)`` work (:func:`factored_svd`). TIES and DARE are defined entry-wise
on the dense update, so they form it — as their papers do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from rankwise.analysis._common import as_generator, check_factors, check_matrix, work_dtype
from rankwise.linalg import SVD, randomized_svd, rank_for_energy, truncated_svd

CombineMethod = Literal["linear", "svd", "ties", "dare"]
COMBINE_METHODS: tuple[str, ...] = ("linear", "svd", "ties", "dare")


class Factors(NamedTuple):
    """A low-rank matrix in factored form, ``M = B @ A``."""

    B: Tensor  # (out, r)
    A: Tensor  # (r, in)


def factored_svd(B: Tensor, A: Tensor) -> SVD:
    """Thin SVD of ``B @ A`` without forming the product.

    With ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (reduced QR), ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ``;
    the SVD ``R_B R_Aᵀ = U S Vᵀ`` of the small core gives ``B A = (Q_B U) S (Q_A V)ᵀ``.
    Cost ``O((out + in)·r² + r³)`` instead of ``O(out·in·r)`` for the product plus its SVD.
    The ``min(out, in, r)`` triplets are returned in descending order of ``S``.
    """
    check_factors(B, A)
    dtype = work_dtype(B, A)
    q_b, r_b = torch.linalg.qr(B.to(dtype))  # (out, p), (p, r) with p = min(out, r)
    q_a, r_a = torch.linalg.qr(A.to(dtype).mT)  # (in, q), (q, r) with q = min(in, r)
    core = r_b @ r_a.mT  # (p, q): B A = Q_B core Q_Aᵀ
    small = truncated_svd(core)
    return SVD(q_b @ small.U, small.S, small.Vh @ q_a.mT)  # (out, k), (k,), (k, in)


def split_svd(svd: SVD, rank: int, *, dtype: torch.dtype | None = None) -> Factors:
    """Balanced factors of the rank-``rank`` truncation: ``B = U √S``, ``A = √S Vᵀ``.

    Splitting ``√S`` to both sides keeps ``‖B‖`` and ``‖A‖`` equal, the usual choice when the
    factors are trained further (it is what PiSSA does with the principal part of ``W``).
    """
    root = svd.S[:rank].clamp_min(0).sqrt()  # (k,)
    B = svd.U[:, :rank] * root  # (out, k)
    A = root[:, None] * svd.Vh[:rank]  # (k, in)
    if dtype is not None:
        B, A = B.to(dtype), A.to(dtype)
    return Factors(B.contiguous(), A.contiguous())


def check_rank(rank: int, *, available: int) -> int:
    """``rank`` if it is an integer in ``[1, available]``, else a ValueError naming it."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= available:
        raise ValueError(f"rank must be an integer in [1, {available}]; found {rank!r}")
    return rank


def choose_rank(S: Tensor, rank: int | None, energy: float | None, *, available: int) -> int:
    """The rank to keep: given directly (``1 ≤ rank ≤ available``) or by retained energy."""
    if (rank is None) == (energy is None):
        raise ValueError(
            f"give exactly one of rank and energy; found rank={rank!r}, energy={energy!r}"
        )
    if rank is not None:
        return check_rank(rank, available=available)
    if not 0.0 < float(energy) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"energy must be a fraction in (0, 1]; found {energy!r}")
    return max(1, min(available, int(rank_for_energy(S, float(energy)))))  # type: ignore[arg-type]


def resize(
    B: Tensor, A: Tensor, rank: int | None = None, *, energy: float | None = None
) -> Factors:
    """The best rank-``k`` approximation of ``B @ A`` in factored form (Eckart–Young).

    ``k`` is ``rank`` (at most ``r``; resizing never grows an adapter) or the smallest rank
    keeping the fraction ``energy`` of ``‖B A‖_F²``. The result ``B' A'`` equals the rank-``k``
    truncated SVD of the dense product, computed via :func:`factored_svd` without forming it;
    the factors are balanced (:func:`split_svd`). Inputs are not modified.
    """
    svd = factored_svd(B, A)
    k = choose_rank(svd.S, rank, energy, available=svd.S.numel())
    return split_svd(svd, k, dtype=B.dtype)


def extract(
    W_base: Tensor,
    W_finetuned: Tensor,
    rank: int | None = None,
    *,
    energy: float | None = None,
    randomized: bool = False,
    generator: torch.Generator | int | None = None,
) -> Factors:
    """Factors ``(B, A)`` with ``B @ A ≈ W_finetuned − W_base`` (a LoRA extracted by SVD).

    The rank-``k`` truncated SVD ``U_k S_k V_kᵀ`` of the difference is optimal in Frobenius
    and spectral norm (Eckart–Young); ``k`` is ``rank`` or the smallest rank keeping the
    fraction ``energy`` of ``‖ΔW‖_F²``. ``randomized=True`` uses the Halko–Martinsson–Tropp
    randomized SVD (needs ``rank``; reproducible with ``generator``). An update of exact rank
    ``≤ k`` is recovered to rounding error. Factors are balanced, ``B = U_k √S_k``.
    """
    check_matrix(W_base, name="W_base")
    check_matrix(W_finetuned, name="W_finetuned")
    if W_base.shape != W_finetuned.shape:
        raise ValueError(
            "W_base and W_finetuned must be matrices of the same shape; "
            f"found {tuple(W_base.shape)} and {tuple(W_finetuned.shape)}"
        )
    dtype = work_dtype(W_base, W_finetuned)
    delta = W_finetuned.to(dtype) - W_base.to(dtype)  # (out, in); a new tensor, inputs untouched
    if randomized:
        if rank is None or energy is not None:
            raise ValueError("randomized=True needs rank (an integer) and no energy")
        check_rank(rank, available=min(delta.shape))
        svd = randomized_svd(delta, rank, generator=as_generator(generator))
    else:
        svd = truncated_svd(delta)
    k = choose_rank(svd.S, rank, energy, available=svd.S.numel())
    return split_svd(svd, k, dtype=W_finetuned.dtype)


def _check_inputs(
    factors: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float] | None
) -> list[float]:
    if len(factors) == 0:
        raise ValueError("factors must hold at least one (B, A) pair; found none")
    for i, (B, A) in enumerate(factors):
        check_factors(B, A, name=f"factors[{i}]")
        B0, A0 = factors[0]
        if B.shape[0] != B0.shape[0] or A.shape[1] != A0.shape[1]:
            raise ValueError(
                f"factors[{i}] is a ({B.shape[0]}, {A.shape[1]}) update; "
                f"factors[0] is ({B0.shape[0]}, {A0.shape[1]}): all must have the same shape"
            )
    return _check_weights(weights, len(factors), "factors")


def _check_weights(weights: Sequence[float] | None, n: int, what: str) -> list[float]:
    """``weights`` as ``n`` finite floats (all 1 when ``None``), else a ValueError."""
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} entries; {what} has {n}")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, (str, bytes, bool)):
            raise ValueError(f"weights[{i}]: expected a finite number; found {w!r}")
        try:
            value = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"weights[{i}]: expected a finite number; found {w!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"weights[{i}]: expected a finite number; found {w!r}")
        out.append(value)
    return out


def _check_deltas(deltas: Sequence[Tensor], weights: Sequence[float]) -> list[float]:
    """Dense updates for TIES/DARE: at least one, same shape, finite; weights one each."""
    if len(deltas) == 0:
        raise ValueError("deltas must hold at least one update; found none")
    for i, d in enumerate(deltas):
        check_matrix(d, name=f"deltas[{i}]")
        if d.shape != deltas[0].shape:
            raise ValueError(
                f"deltas[{i}] has shape {tuple(d.shape)}; deltas[0] has "
                f"{tuple(deltas[0].shape)}: all must have the same shape"
            )
    return _check_weights(weights, len(deltas), "deltas")


def concatenate(factors: Sequence[tuple[Tensor, Tensor]], weights: list[float]) -> Factors:
    """``Σ wᵢ Bᵢ Aᵢ = [w₁B₁ | … | w_nB_n] · [A₁; …; A_n]`` exactly, rank ``Σ rᵢ``."""
    dtype = work_dtype(*(t for pair in factors for t in pair))
    B = torch.cat(
        [w * Bi.to(dtype) for w, (Bi, _) in zip(weights, factors, strict=True)], dim=1
    )  # (out, Σr)
    A = torch.cat([Ai.to(dtype) for _, Ai in factors], dim=0)  # (Σr, in)
    return Factors(B, A)


def ties_merge(deltas: Sequence[Tensor], weights: Sequence[float], *, density: float) -> Tensor:
    """TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models", Alg. 1).

    For task vectors ``τᵢ = wᵢ ΔWᵢ`` (the weights scale each one; the paper's λ is a common
    weight): (1) *trim* — keep the ``density`` fraction of entries of largest magnitude in each
    ``τᵢ``, zero the rest, giving ``τ̂ᵢ``; (2) *elect* — ``γ = sgn(Σᵢ τ̂ᵢ)`` per entry; (3)
    *disjoint merge* — the mean of the ``τ̂ᵢ`` whose sign agrees with ``γ`` (entries where no
    task agrees are 0). Trimming is per matrix here (the paper trims the whole model's task
    vector at once). Returns the dense merged update.
    """
    _check_density(density)
    weights = _check_deltas(deltas, weights)
    trimmed = torch.stack(
        [_keep_top(w * d, density) for w, d in zip(weights, deltas, strict=True)]
    )  # (n, o, i)
    elected = torch.sign(trimmed.sum(dim=0))  # (out, in)
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)  # (n, out, in)
    count = agree.sum(dim=0).clamp_min(1)  # (out, in)
    return (trimmed * agree).sum(dim=0) / count


def dare_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: float,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    """DARE (Yu et al. 2023, "Language Models are Super Mario", Sec. 3): drop and rescale.

    Each entry of each ``ΔWᵢ`` is kept with probability ``density = 1 − p`` and the kept ones
    are divided by ``density``, ``ΔŴᵢ = (m ⊙ ΔWᵢ) / (1 − p)`` with ``m ~ Bernoulli(1 − p)``,
    so ``E[ΔŴᵢ] = ΔWᵢ``; the sparsified updates are then merged by task arithmetic,
    ``Σᵢ wᵢ ΔŴᵢ``. Reproducible with ``generator``.
    """
    _check_density(density)
    weights = _check_deltas(deltas, weights)
    gen = as_generator(generator)
    out = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas, strict=True):
        # Bernoulli(density) mask, drawn on the CPU where the generator lives
        keep = (torch.rand(d.shape, generator=gen, dtype=d.dtype) < density).to(d.device)
        out += (w / density) * d * keep
    return out


def _check_density(density: float) -> None:
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be a fraction in (0, 1]; found {density!r}")


def _keep_top(t: Tensor, density: float) -> Tensor:
    """``t`` with all but its ``ceil(density·numel)`` largest-magnitude entries zeroed."""
    k = max(1, min(t.numel(), math.ceil(density * t.numel())))
    idx = t.abs().flatten().topk(k).indices
    mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    mask[idx] = True
    return t * mask.view_as(t)


def _update_shape(factors: Sequence[tuple[Tensor, Tensor]]) -> tuple[int, int]:
    return int(factors[0][0].shape[0]), int(factors[0][1].shape[1])  # (out, in)


def combine_rank_cap(factors: Sequence[tuple[Tensor, Tensor]], method: CombineMethod) -> int:
    """The largest ``rank`` :func:`combine` can return for these factors: ``min(out, in)``,
    and at most ``Σ rᵢ`` for ``"svd"`` (a sum of rank-``rᵢ`` updates has no more)."""
    cap = min(_update_shape(factors))
    if method in ("svd", "linear"):
        cap = min(cap, sum(int(Ai.shape[0]) for _, Ai in factors))
    return cap


def combine(
    factors: Sequence[tuple[Tensor, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    method: CombineMethod = "linear",
    rank: int | None = None,
    density: float = 0.5,
    generator: torch.Generator | int | None = None,
) -> Factors:
    """Combine updates ``ΔWᵢ = Bᵢ Aᵢ`` (all ``out × in``) into one factored update.

    * ``"linear"``: ``Σ wᵢ ΔWᵢ`` *exactly*, by concatenation (rank ``Σ rᵢ``; ``rank`` must be
      ``None``). PEFT's ``"linear"`` instead adds the factors (``Σ√wᵢBᵢ · Σ√wᵢAᵢ``), which
      adds cross terms ``BᵢAⱼ``; this method is PEFT's ``"cat"``.
    * ``"svd"``: the best rank-``rank`` approximation of ``Σ wᵢ ΔWᵢ``, from the concatenation
      via :func:`resize` — the dense sum is never formed (PEFT forms it and runs a full SVD).
    * ``"ties"`` / ``"dare"``: :func:`ties_merge` / :func:`dare_merge` on the dense updates, as
      in their papers, then a rank-``rank`` truncated SVD. PEFT's ``"ties"`` and
      ``"dare_linear"`` apply trimming, sign election and dropping to the ``A`` and ``B``
      factors separately; an entry of ``B A`` is a sum of products of factor entries, so
      those are not TIES/DARE on ``ΔW`` (PEFT's ``"ties_svd"``/``"dare_linear_svd"`` are the
      dense versions, with sign election before weighting).

    For the truncating methods ``rank=None`` means ``max rᵢ`` (PEFT's default new rank),
    capped at ``min(out, in)``; :func:`combine_rank_cap` is the largest ``rank`` accepted.
    ``density`` is the fraction kept by TIES (by magnitude) and DARE (at random).
    """
    w = _check_inputs(factors, weights)
    if method not in COMBINE_METHODS:
        raise ValueError(f"method must be one of {COMBINE_METHODS}; found {method!r}")
    out_dtype = factors[0][0].dtype
    if method == "linear":
        if rank is not None:
            raise ValueError("method='linear' is exact and takes no rank; use method='svd'")
        B, A = concatenate(factors, w)
        B, A = B.to(out_dtype), A.to(out_dtype)
        if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
            raise ValueError(
                f"weights: {w} scale the factors beyond {out_dtype}'s range "
                "(non-finite entries); use smaller weights"
            )
        return Factors(B, A)
    if rank is None:  # at most min(out, in): PEFT allows r above it
        rank = min(max(Ai.shape[0] for _, Ai in factors), *_update_shape(factors))
    if method == "svd":
        B, A = concatenate(factors, w)
        svd = factored_svd(B, A)
        return split_svd(
            svd, choose_rank(svd.S, rank, None, available=svd.S.numel()), dtype=out_dtype
        )
    dtype = work_dtype(*(t for pair in factors for t in pair))
    deltas = [Bi.to(dtype) @ Ai.to(dtype) for Bi, Ai in factors]  # (out, in) each
    if method == "ties":
        merged = ties_merge(deltas, w, density=density)
    else:
        merged = dare_merge(deltas, w, density=density, generator=generator)
    svd = truncated_svd(merged)
    return split_svd(svd, choose_rank(svd.S, rank, None, available=svd.S.numel()), dtype=out_dtype)
