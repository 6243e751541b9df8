"""Truncated and randomized singular value decompositions.

Both return ``SVD(U, S, Vh)`` with ``M ≈ U @ diag(S) @ Vh``: ``U`` is (m, r) with orthonormal
columns, ``S`` is (r,) descending and non-negative, ``Vh`` is (r, n) with orthonormal rows.
Signs are fixed so that the largest-magnitude entry of every column of ``U`` is positive (the
first of them where several are equal to within rounding), which makes results reproducible across
LAPACK drivers and between the two routines.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch

from rankwise.linalg._random import GeneratorLike, gaussian, make_generator
from rankwise.linalg._validate import (
    ArrayLike,
    as_matrix,
    check_fraction,
    check_rank,
    peak_exponent,
    times_power_of_two,
    to_output,
    unit_scaled,
)
from rankwise.linalg.rank import rank_for_energy

# Power iterations for ``power_iters="auto"``: stop once the leading Ritz values move by at most
# this fraction of the (k+1)-th one between passes, and never run more than the cap.
AUTO_RITZ_TOLERANCE = 0.05
AUTO_MAX_POWER_ITERS = 8


class SVD(NamedTuple):
    """A (truncated) singular value decomposition ``M ≈ U @ diag(S) @ Vh``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


# Entries of a column of U within this many units of U's rounding (eps of its dtype) of its
# largest |.| count as tied for the sign rule, and the first of them decides: argmax alone
# broke exact ties (a Hadamard-like basis) by rounding noise, 14 of 60 columns flipped between
# the two routines. Only ties at rounding level: a wider margin (0.1% was tried) re-signed
# ordinary columns, and with them LoRA-GA's B0 (taken from other triplets than A0).
SIGN_TIE_ULPS = 1000


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (m, r), (r, n): flip triplet i so that the first of U[:, i]'s largest-|.| entries (within
    # SIGN_TIE_ULPS of rounding) is positive.
    magnitude = U.abs()
    top = magnitude.amax(dim=0, keepdim=True)  # (1, r)
    margin = SIGN_TIE_ULPS * torch.finfo(U.dtype).eps
    pivots = (magnitude >= top * (1 - margin)).to(torch.uint8).argmax(dim=0)  # (r,)
    signs = torch.sign(U.gather(0, pivots[None, :]))  # (1, r)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.T


def _rank_from_options(
    S: torch.Tensor,
    shape: tuple[int, int],
    rank: int | None,
    energy: float | None,
    tol: float | None,
) -> int:
    given = [
        name for name, v in (("rank", rank), ("energy", energy), ("tol", tol)) if v is not None
    ]
    if len(given) > 1:
        raise ValueError(f"truncated_svd: give at most one of rank, energy, tol; found {given}")
    if rank is not None:
        return check_rank(rank, shape)
    if energy is not None:
        energy = check_fraction(energy, "energy", closed_right=True)
        if energy == 1.0:  # the numerical rank, with pinv's and matrix_rank's max(m, n)·eps
            cutoff = max(shape) * torch.finfo(S.dtype).eps * float(S[0])
            return max(1, int((S > cutoff).sum()))
        return rank_for_energy(S.detach().cpu(), energy)
    if tol is not None:
        tol = check_fraction(tol, "tol", closed_right=False)
        # Smallest r with σ_{r+1} <= tol·σ_1, i.e. relative spectral error ‖M - M_r‖₂/‖M‖₂ <= tol.
        return max(1, int((S > tol * S[0]).sum()))
    return S.numel()


def truncated_svd(
    M: ArrayLike,
    rank: int | None = None,
    *,
    energy: float | None = None,
    tol: float | None = None,
) -> SVD:
    """Best rank-``r`` approximation of ``M`` by a full thin SVD, truncated (Eckart–Young).

    By the Eckart–Young–Mirsky theorem (1936), ``M_r = U_r diag(S_r) Vh_r`` minimises both
    ``‖M - X‖_F = sqrt(Σ_{i>r} σ_i²)`` and ``‖M - X‖_2 = σ_{r+1}`` over all rank-``r`` ``X``.
    The rank ``r`` is chosen by at most one of:

    * ``rank`` — directly, ``1 <= rank <= min(m, n)``;
    * ``energy`` in (0, 1] — the smallest ``r`` with ``Σ_{i<=r} σ_i² >= energy · Σ_i σ_i²``
      (so the relative Frobenius error is ``<= sqrt(1 - energy)``);
    * ``tol`` in (0, 1) — the smallest ``r`` with ``σ_{r+1} <= tol · σ_1`` (relative spectral
      error ``<= tol``; the numerical rank, same convention as :func:`pinv`'s ``rtol``);
    * none of them — the full thin SVD, ``r = min(m, n)``.

    ``M`` is an (m, n) float32/float64 tensor or numpy array (numpy in, numpy out).
    """
    matrix, was_numpy = as_matrix(M, "M")
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)  # (m, p), (p,), (p, n), p = min
    r = _rank_from_options(S, tuple(matrix.shape), rank, energy, tol)
    U, Vh = _fix_signs(U[:, :r], Vh[:r])
    return to_output(SVD(U, S[:r].clone(), Vh), was_numpy)


def _check_power_iters(power_iters: int | Literal["auto"]) -> int | None:
    if power_iters == "auto":
        return None
    bad = isinstance(power_iters, bool) or not isinstance(power_iters, (int, np.integer))
    if bad or power_iters < 0:
        raise ValueError(f"power_iters: expected 'auto' or an int >= 0, found {power_iters!r}")
    return int(power_iters)


class RangeSketch(NamedTuple):
    """Internal: the range finder's ``Q`` (m, l), ``Z = Aᵀ Q`` (n, l) and the ``q`` it ran."""

    Q: torch.Tensor
    Z: torch.Tensor
    power_iters: int


def _range_and_projection(
    A: torch.Tensor, width: int, k: int, iters: int | None, generator: torch.Generator | None
) -> RangeSketch:
    """Orthonormal ``Q`` (m, l) approximating A's range and ``Z = Aᵀ Q`` (n, l), l = ``width``.

    Halko, Martinsson & Tropp 2011, Alg. 4.4 (randomized subspace iteration): every product is
    re-normalized before the next one so that small singular values survive in floating
    point. ``Q`` is orthonormalized by Householder QR (the Ritz values and the caller need an
    orthonormal basis); the right-hand block ``W`` only has to span ``range(Z)`` accurately,
    so it is the LU basis ``P L`` of ``Z = P L U`` (Li, Linderman, Szlam et al. 2017, ACM
    TOMS Alg. 971; ~5× cheaper than a QR with its Q formed, and as backward stable in
    practice). The Ritz values, the singular values of ``Z``, are the square roots of the
    eigenvalues of the (l, l) Gram matrix ``Zᵀ Z`` formed in float64 (one small GEMM, ~1.6×
    cheaper than a QR of ``Z`` plus an SVD of its ``R``); their absolute error
    ``~ε₆₄ σ₁² / σ_j`` is far below the 5% of σ_{k+1} the "auto" rule resolves unless
    ``σ₁/σ_{k+1} > 10⁶``, where float32 data carry no such digits anyway.
    """
    # Every product is written as a wide (l, ·) block times A or Aᵀ, the layout in which
    # BLAS streams A once with the l rows in cache (~1.4× faster than A @ (n, l) with MKL).
    # LAPACK's Q is column-major, so Q.mT is already a contiguous (l, m) block.
    # Ω is drawn in float32 whatever A's dtype (torch's float64 sampler is ~4× slower on the
    # CPU, and a Gaussian test matrix needs no more digits), then cast to A's dtype.
    single = torch.empty(0, dtype=torch.float32, device=A.device)
    omega_t = gaussian(width, A.shape[1], like=single, generator=generator).to(A.dtype)  # (l, n)
    Q, _ = torch.linalg.qr((omega_t @ A.mT).mT)  # (m, l) = orth(A Ω)
    previous: torch.Tensor | None = None
    # Relative to σ₁, a σ_{k+1} at rounding level (a matrix of rank <= k): the leading Ritz
    # values then only jitter, by ~1-2.4·ε·σ₁ between passes in float32 (measured), within
    # 5% of this floor. Kept low on purpose: a floor above a real σ_{k+1} (1e-5·σ₁ is still
    # resolved in float32) stops after one pass and loses accuracy (1.087·σ_{k+1} against
    # 1.0006 at a floor of max(m, n)·ε); float64's jitter can exceed it, and such matrices run
    # the iterations the 5% rule asks for, as before.
    rounding = 64 * torch.finfo(A.dtype).eps
    done = 0
    while True:
        Z_t = Q.mT @ A  # (l, n) = Qᵀ A = Zᵀ: one pass over A, and the projected matrix B
        if iters is not None and done == iters:
            return RangeSketch(Q, Z_t.mT, done)
        if iters is None:
            ritz = _singular_values_by_gram(Z_t)  # (l,) descending: Ritz values of A
            if previous is not None and _converged(previous, ritz, k, rounding):
                return RangeSketch(Q, Z_t.mT, done)
            if done == AUTO_MAX_POWER_ITERS:
                return RangeSketch(Q, Z_t.mT, done)
            previous = ritz
        W_t = _lu_basis_t(Z_t)  # (l, n) = Wᵀ, W spans range(Z)
        Q, _ = torch.linalg.qr((W_t @ A.mT).mT)  # (m, l) = orth(A W): one more pass over A
        done += 1


def _singular_values_by_gram(Z_t: torch.Tensor) -> torch.Tensor:
    # (l, n) -> (l,): sqrt of the eigenvalues of Z_t Z_tᵀ (l, l) in float64, descending;
    # |λ| keeps rounding-level negative eigenvalues of a rank-deficient Z at their ~ε scale.
    wide = Z_t.to(torch.float64)
    exponent = peak_exponent(wide)
    wide = times_power_of_two(wide, -exponent)  # exact: the Gram of 1e160 entries overflows
    eigenvalues = torch.linalg.eigvalsh(wide @ wide.mT)  # ascending
    values = eigenvalues.abs().sqrt().sort(descending=True).values
    return times_power_of_two(values, exponent).to(Z_t.dtype)


def _lu_basis_t(Z_t: torch.Tensor) -> torch.Tensor:
    """``(P L)ᵀ`` (l, n) for ``Z = Z_tᵀ = P L U`` (LU, partial pivoting): a basis of ``range(Z)``.

    ``L`` is unit lower trapezoidal with entries ``|L_ij| <= 1``: well conditioned in practice,
    which is all a power-iteration step needs (fbpca's intermediate normalization).
    """
    # lu_factor_ex: an exactly rank-deficient Z (zero pivot in U) is fine here — LAPACK leaves
    # that column of L unscaled (it is zero below the pivot), and only L is used.
    LU, swaps, _ = torch.linalg.lu_factor_ex(Z_t.mT)  # (n, l) packed L\U, (l,) swaps
    L_t = LU.mT.triu(1)  # (l, n) contiguous = Lᵀ without its unit diagonal
    L_t.diagonal().fill_(1.0)
    # LAPACK: row i was swapped with row swaps[i] (1-based), in order; Pᵀ Z = L U with
    # (Pᵀ Z)[r] = Z[perm[r]], so (P L)[perm[r]] = L[r], i.e. (P L)[i] = L[inverse[i]].
    # The permutation is built in numpy: l swaps on an int array, no (n,)-element Python list
    # turned into a tensor (which costs ~0.3 ms at n = 1536, more than the LU itself).
    n = L_t.shape[1]
    perm = np.arange(n)
    for i, s in enumerate(swaps.tolist()):
        perm[i], perm[s - 1] = perm[s - 1], perm[i]
    inverse = np.empty(n, dtype=np.int64)
    inverse[perm] = np.arange(n)
    return L_t[
        :, torch.from_numpy(inverse).to(L_t.device)
    ]  # (l, n), contiguous: the wide block layout of the next pass


def _converged(previous: torch.Tensor, ritz: torch.Tensor, k: int, rounding: float) -> bool:
    # Ritz values grow monotonically towards σ_j; a step of at most 5% of σ_{k+1} on the
    # leading k means the subspace has stopped moving at the scale of the optimal error. A
    # σ_{k+1} below rounding (``rounding · σ₁``: a matrix of rank <= k) counts as that level,
    # where the Ritz values only jitter: the first pass has already found the range.
    previous, ritz = previous.detach(), ritz.detach()  # a float() of a grad tensor warns
    floor = torch.clamp(ritz[min(k, ritz.numel() - 1)], min=rounding * float(ritz[0]))
    step = (ritz[:k] - previous[:k]).abs().max()
    return bool(step <= AUTO_RITZ_TOLERANCE * floor)


def randomized_svd(
    M: ArrayLike,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int | Literal["auto"] = "auto",
    generator: GeneratorLike = None,
) -> SVD:
    """Rank-``rank`` SVD by randomized subspace iteration (Halko, Martinsson & Tropp 2011).

    Range finder (Alg. 4.4) followed by a small SVD (Alg. 5.1): with ``l = rank + oversample``
    and a Gaussian test matrix ``Ω`` (n, l), ``Q = orth((A Aᵀ)^q A Ω)`` (m, l), ``B = Qᵀ A``
    (l, n) and ``B = Ũ Σ Vᴴ`` give ``A ≈ (Q Ũ) Σ Vᴴ``, truncated to exactly ``rank`` triplets
    (``torch.svd_lowrank`` instead returns ``q`` of them). The work is ``2q + 2`` passes of
    ``A`` against an (n, l) or (m, l) block plus QR factorizations of those blocks; tall and
    wide inputs alike (``l`` is capped at ``min(m, n)``).

    ``power_iters="auto"`` chooses ``q`` adaptively: after each pass ``Z = Aᵀ Q`` the
    singular values of ``Z``'s QR factor ``R`` are Ritz values of ``A`` (free); the iteration
    stops once the leading ``rank`` Ritz values rise by at most 5% of the ``(rank+1)``-th
    between consecutive iterations (at least one, at most 8 iterations). Measured on 4096²
    matrices at rank 64 (``benchmarks/linalg.py``): ``q = 2`` on geometric decay and on a flat
    tail (where ``q = 0`` is ~9× off σ_{k+1}), ``q = 3`` on σ_j = 1/j, each with a spectral
    error within 0.3% of σ_{k+1} — against scikit-learn's fixed 7. An int fixes ``q``.

    ``generator`` (``torch.Generator``, int seed or ``None`` for torch's global RNG) makes the
    result reproducible. ``M`` is an (m, n) float32/float64 tensor or numpy array.
    """
    matrix, was_numpy = as_matrix(M, "M")
    k = check_rank(rank, tuple(matrix.shape))
    if (
        isinstance(oversample, (bool, np.bool_))
        or not isinstance(oversample, (int, np.integer))
        or oversample < 0
    ):
        raise ValueError(f"oversample: expected an int >= 0, found {oversample!r}")
    oversample = int(oversample)
    iters = _check_power_iters(power_iters)
    gen = make_generator(generator)
    width = min(k + oversample, min(matrix.shape))  # l
    # Entries near the dtype's range limits (1e±300 in float64, subnormals) are brought to
    # unit scale first: the sketches, their QR and the Ritz values stay in range.
    matrix, exponent = unit_scaled(matrix)
    Q, Z, _ = _range_and_projection(matrix, width, k, iters, gen)  # (m, l), (n, l)
    # Z = Bᵀ = W Σ Xᵀ  =>  A ≈ Q B = (Q X) Σ Wᵀ.
    W, S, Xh = torch.linalg.svd(Z, full_matrices=False)  # (n, l), (l,), (l, l)
    U = Q @ Xh[:k].mT  # (m, k)
    Vh = W[:, :k].mT  # (k, n)
    U, Vh = _fix_signs(U.contiguous(), Vh.contiguous())
    S = times_power_of_two(S[:k].clone(), exponent)
    return to_output(SVD(U, S, Vh), was_numpy)
