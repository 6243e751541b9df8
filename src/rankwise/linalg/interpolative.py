"""Interpolative decomposition (ID) and CUR, deterministic or randomized.

A column ID writes ``M ≈ M[:, idx] @ Z`` with ``k`` actual columns of ``M`` (``idx``) and a
coefficient matrix ``Z`` (k, n) that contains the identity in the columns ``idx``. It comes
from a column-pivoted QR ``M P = Q [R11 R12]`` truncated at rank ``k``: ``Z P = [I, R11⁻¹R12]``
(Cheng, Gimbutas, Martinsson & Rokhlin 2005; Halko, Martinsson & Tropp 2011, §3.2.3, §5.2).
The error is ``‖R22‖``, i.e. within a factor ``sqrt(1 + k(n−k))`` (in practice much less) of
``σ_{k+1}``.

The randomized ID (Martinsson, Rokhlin & Tygert 2011; Voronin & Martinsson 2017, Alg. 1)
runs the pivoted QR on a small sketch ``Y = Qᵀ M`` (k+20, n) instead of ``M``, where ``Q`` is
the randomized range finder of :func:`~rankwise.linalg.randomized_svd` (Gaussian start and
power iterations with the same adaptive "auto" rule). ``Y`` mixes the rows of ``M``, so the
linear relations between its columns, hence the ID coefficients, carry over; the power
iterations make the sketch faithful on slowly decaying spectra, where a plain ``Ω M`` sketch
is ~3× worse than the deterministic ID. Unlike ``scipy.linalg.interpolative`` ≥ 1.15, whose
fixed-rank ``rand=True`` silently runs the deterministic path, the randomized path here really
is randomized: it draws from ``generator``. The 20 extra rows matter for the coefficients:
``Z`` solves the least-squares problem in the sketched space, and with 10 extra rows it was
~1.5× worse than the deterministic ID on a 0.98^j spectrum, with 20 ~1.15× (the columns
chosen are as good either way).

Cost. Deterministic: one streaming pass for the column norms, then ``k`` GEMVs ``q_jᵀ M``
(memory-bound, one per pivot: the next pivot needs every downdated column norm, so they
cannot be blocked) and a k×k triangular solve; ``M`` is never updated, copied or transposed.
Randomized: the ``2q + 2`` passes of the range finder against an n×(k+20) block, then the
same QRCP on the (k+20)×n sketch. ``benchmarks/linalg.py`` times both against those floors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from rankwise.errors import ShapeMismatchError
from rankwise.linalg._random import GeneratorLike, make_generator
from rankwise.linalg._validate import (
    ArrayLike,
    as_matrix,
    check_flag,
    check_fraction,
    check_one_of,
    check_rank,
    to_output,
    unit_scaled,
)
from rankwise.linalg.pinv import _pinv_tensor
from rankwise.linalg.svd import SVD, _fix_signs, _range_and_projection

SKETCH_OVERSAMPLE = 20


class ID(NamedTuple):
    """Column interpolative decomposition ``M ≈ M[:, idx] @ Z``; ``idx`` (k,), ``Z`` (k, n)."""

    idx: torch.Tensor
    Z: torch.Tensor


class CUR(NamedTuple):
    """``M ≈ C @ U @ R`` with ``C = M[:, cols]`` (m, k), ``R = M[rows, :]`` (k, n), ``U`` (k, k)."""

    C: torch.Tensor
    U: torch.Tensor
    R: torch.Tensor
    cols: torch.Tensor
    rows: torch.Tensor


def _new_direction(Qt: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # A residual that vanished (rank-deficient M): continue with the coordinate vector least
    # represented in span(Q) (Qt is (j, m), one basis vector per row), orthogonalized twice,
    # so Q stays orthonormal.
    e = torch.zeros_like(v)
    e[int(Qt.square().sum(dim=0).argmin())] = 1.0
    for _ in range(2):
        e = e - (Qt @ e) @ Qt
    return e / torch.linalg.vector_norm(e)


def _column_norms2(A: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``‖A[:, j]‖²`` (n,), summed over blocks of rows.

    One streaming pass over ``A`` with a cache-sized temporary: ``A.square().sum(dim=0)``
    would allocate a full (m, n) copy (6× slower on 3000² float64).
    """
    norms2 = A.new_zeros(A.shape[1])
    for start in range(0, A.shape[0], block):
        norms2 += A[start : start + block].square().sum(dim=0)  # (n,) from a (block, n) tile
    return norms2


def _pivoted_qr(
    A: torch.Tensor, max_rank: int, eps: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated column-pivoted QR (Businger & Golub 1965) by pivoted Gram–Schmidt.

    Returns the pivots (k,) and ``R`` (k, n) with ``R = Qᵀ A`` over *all* columns, so that
    ``R[:, pivots]`` is upper triangular. Step ``j`` takes the column of largest residual norm,
    orthogonalizes it against ``q_0..q_{j-1}`` (classical Gram–Schmidt with the coefficients
    ``R[:j, p]`` already at hand, then once more: CGS2), and reads ``A`` once (one GEMV,
    ``R[j] = q_jᵀ A``) to downdate every residual column norm: ``k`` passes over ``A`` in all,
    and ``A`` is never updated or copied. Norms that lost half their digits to cancellation
    are recomputed (the safeguard of LAPACK's xLAQP2). ``eps``: stop once every residual
    column norm is ``<= eps · max_j ‖A[:, j]‖``.
    """
    m, n = A.shape
    Qt = A.new_zeros(max_rank, m)  # (k, m): q_j in row j, contiguous for the GEMV
    R = A.new_zeros(max_rank, n)  # (k, n)
    # norms2 (n,): residual column norms², -inf once a column is a pivot; recompute_below (n,):
    # sqrt(eps)·(last exact norm²), -inf for pivots so they never qualify. One (2, n) buffer,
    # so that one assignment retires a pivot in both.
    state = A.new_empty(2, n)
    norms2, recompute_below = state[0], state[1]
    norms2.copy_(_column_norms2(A))
    sqrt_eps = math.sqrt(torch.finfo(A.dtype).eps)
    torch.mul(norms2, sqrt_eps, out=recompute_below)
    stop = None if eps is None else (eps**2) * float(norms2.detach().max())
    stale = torch.empty(n, dtype=torch.bool, device=A.device)
    At = A.mT  # (n, m) view: R[j] = At @ q_j is a GEMV streaming A row by row
    pivots: list[int] = []
    for j in range(max_rank):
        p = int(norms2.argmax())
        if stop is not None and j > 0 and float(norms2[p]) <= stop:
            break
        Q = Qt[:j]  # (j, m)
        v = torch.addmv(A[:, p], Q.mT, R[:j, p], alpha=-1.0)  # (m,) residual of the pivot
        v.addmv_(Q.mT, Q @ v, alpha=-1.0)  # re-orthogonalize (CGS2)
        norm = float(torch.linalg.vector_norm(v))
        q, r = Qt[j], R[j]  # (m,), (n,) views
        if norm > 0:
            torch.div(v, norm, out=q)
        else:
            q.copy_(_new_direction(Q, v))
        torch.mv(At, q, out=r)  # (n,) = q_jᵀ A: the one pass over A
        norms2.addcmul_(r, r, value=-1.0)
        state[:, p] = -math.inf
        pivots.append(p)
        if bool(torch.lt(norms2, recompute_below, out=stale).any()):
            cols = stale.nonzero().flatten()  # (s,)
            residual = A[:, cols] - Qt[: j + 1].mT @ R[: j + 1, cols]  # (m, s)
            norms2[cols] = residual.square().sum(dim=0)
            recompute_below[cols] = sqrt_eps * norms2[cols]
    k = len(pivots)
    return torch.tensor(pivots, dtype=torch.long, device=A.device), R[:k]


def _coefficients(R: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    """``Z = R11⁻¹ R`` (k, n) with ``Z[:, pivots] = I`` exactly."""
    k = pivots.numel()
    R11 = torch.triu(R[:, pivots])  # (k, k) upper triangular by construction
    diagonal = R11.diagonal().abs()
    if bool((diagonal > k * torch.finfo(R.dtype).eps * diagonal.max()).all()):
        Z = torch.linalg.solve_triangular(R11, R, upper=True)  # (k, n)
    else:  # numerically rank deficient: minimum-norm coefficients
        Z = _pinv_tensor(R11, None) @ R
    Z[:, pivots] = torch.eye(k, dtype=R.dtype, device=R.device)
    return Z


def _meets_eps(A: torch.Tensor, pivots: torch.Tensor, R: torch.Tensor, eps: float) -> bool:
    """Whether the ID from ``pivots`` and ``R`` reconstructs every column of ``A`` within
    ``eps · max_j ‖A[:, j]‖`` (float64)."""
    A64 = A.to(torch.float64)
    residual = A64 - A64[:, pivots] @ _coefficients(R, pivots)  # (m, n)
    return bool(
        torch.linalg.vector_norm(residual, dim=0).max()
        <= eps * torch.linalg.vector_norm(A64, dim=0).max()
    )


def _sketched_pivots(
    A: torch.Tensor, rank: int | None, eps: float | None, gen: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    # Y = Qᵀ A (l, n), Q (m, l) from the randomized range finder. With eps the sketch doubles
    # until the rank found leaves SKETCH_OVERSAMPLE rows to spare and the ID meets eps on A
    # itself: the sketch holds only part of A's tail, so its residuals stop the QR early (on a
    # 1/j spectrum, 400 × 300 at eps 0.03: k = 80 and 2.0·eps on A). Once the sketch would
    # reach half of min(m, n), the QR pivots on A itself (its own test is A's): at 2000 × 1500
    # on a 1/j spectrum at eps 0.01, the sketch grown to full width took 15.5 s against 8.2 s.
    limit = min(A.shape)
    width = min((rank or 32) + SKETCH_OVERSAMPLE, limit)
    while True:
        target = min(rank or width - SKETCH_OVERSAMPLE, width)
        Z = _range_and_projection(A, width, max(target, 1), None, gen).Z  # (n, l) = Yᵀ
        pivots, R = _pivoted_qr(Z.mT.to(torch.float64), rank or width, eps)
        if rank is not None or eps is None or width == limit:
            return pivots, R
        if pivots.numel() <= width - SKETCH_OVERSAMPLE and _meets_eps(A, pivots, R, eps):
            return pivots, R
        if 2 * width >= limit:  # a sketch that wide costs more than pivoting on A itself
            return _pivoted_qr(A, limit, eps)
        width *= 2


def _column_id(
    A: torch.Tensor,
    rank: int | None,
    eps: float | None,
    randomized: bool,
    gen: torch.Generator | None,
) -> ID:
    A = A.detach()  # pivots and coefficients are not differentiable (nn.Linear weights)
    A_unit, _ = unit_scaled(A)  # pivots and coefficients do not depend on scale
    if randomized:
        pivots, R = _sketched_pivots(A_unit, rank, eps, gen)
    else:  # in float64, as the sketch: float32 pivots took R11's rank-deficiency test
        # (k·eps·max of float32) for directions float32 data resolves (400 × 300, σ_j = 0.8^j,
        # k = 60: 17.5 σ_61 against 2.5 σ_61 in float64, scipy's)
        pivots, R = _pivoted_qr(A_unit.to(torch.float64), rank or min(A.shape), eps)
    Z = _coefficients(R, pivots).to(A.dtype)
    return ID(pivots, Z)


def interpolative(
    M: ArrayLike,
    rank: int | None = None,
    *,
    eps: float | None = None,
    randomized: bool = False,
    generator: GeneratorLike = None,
) -> ID:
    """Column interpolative decomposition ``M ≈ M[:, idx] @ Z``.

    Give exactly one of ``rank`` (``1 <= rank <= min(m, n)``) or ``eps`` in (0, 1): the
    pivoted QR stops once every residual column norm is ``<= eps · max_j ‖M[:, j]‖``.
    ``randomized=False`` pivots on ``M`` itself (``k`` passes over ``M``);
    ``randomized=True`` pivots on the sketch ``Qᵀ M`` with ``k + 20`` rows (a few passes of
    ``M`` against a thin block) and depends on ``generator``; with ``eps`` the sketch grows by
    doubling until the decomposition meets the same bound on ``M`` itself (checked on ``M``:
    ``‖M[:, j] − (M[:, idx] Z)[:, j]‖ ≤ eps · max_j ‖M[:, j]‖`` for every ``j``).
    """
    check_one_of(rank=rank, eps=eps)
    matrix, was_numpy = as_matrix(M, "M")
    k = None if rank is None else check_rank(rank, tuple(matrix.shape))
    tol = None if eps is None else check_fraction(eps, "eps", closed_right=False)
    gen = make_generator(generator)  # checked even where unused, as randomized_svd does
    randomized = check_flag(randomized, "randomized")
    return to_output(_column_id(matrix, k, tol, randomized, gen), was_numpy)


def _check_id(matrix: torch.Tensor, decomposition: ID) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        idx = torch.as_tensor(decomposition.idx, device=matrix.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"decomposition.idx: expected integer column indices ({exc})") from None
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex() or idx.ndim != 1:
        # a boolean mask or rounded floats would pick other columns than the ID's, silently
        raise ValueError(
            "decomposition.idx: expected a 1-D array of integer column indices, found "
            f"dtype {idx.dtype} with shape {tuple(idx.shape)}"
        )
    idx = idx.long()
    Z = as_matrix(decomposition.Z, "decomposition.Z").tensor.to(matrix.device, matrix.dtype)
    if Z.shape != (idx.numel(), matrix.shape[1]):
        raise ShapeMismatchError(
            f"decomposition.Z: expected shape ({idx.numel()}, {matrix.shape[1]}) for "
            f"{idx.numel()} indices and M of shape {tuple(matrix.shape)}, found {tuple(Z.shape)}"
        )
    if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < matrix.shape[1]):
        raise ValueError(
            f"decomposition.idx: expected column indices in [0, {matrix.shape[1]}), "
            f"found range [{int(idx.min())}, {int(idx.max())}]"
        )
    return idx, Z


def id_reconstruct(M: ArrayLike, decomposition: ID) -> ArrayLike:
    """``M[:, idx] @ Z`` (m, n): the matrix an :class:`ID` of ``M`` stands for."""
    matrix, was_numpy = as_matrix(M, "M")
    idx, Z = _check_id(matrix, decomposition)
    return to_output(matrix[:, idx] @ Z, was_numpy)


def id_to_svd(M: ArrayLike, decomposition: ID) -> SVD:
    """The exact SVD of the rank-``k`` matrix ``M[:, idx] @ Z``.

    ``M[:, idx] = Q T`` (QR, (m, k) and (k, k)), then ``T Z = Ũ Σ Vᴴ`` (k, n) gives
    ``M[:, idx] Z = (Q Ũ) Σ Vᴴ`` — never forming the (m, n) product (HMT 2011, Alg. 5.2).
    """
    matrix, was_numpy = as_matrix(M, "M")
    idx, Z = _check_id(matrix, decomposition)
    Q, T = torch.linalg.qr(matrix[:, idx])  # (m, k), (k, k)
    Ut, S, Vh = torch.linalg.svd(T @ Z, full_matrices=False)  # (k, k), (k,), (k, n)
    U, Vh = _fix_signs(Q @ Ut, Vh)
    return to_output(SVD(U, S, Vh), was_numpy)


def cur(
    M: ArrayLike, rank: int, *, randomized: bool = False, generator: GeneratorLike = None
) -> CUR:
    """CUR decomposition ``M ≈ C U R`` from two interpolative decompositions.

    Columns ``cols`` come from a column ID of ``M`` (randomized or not, as in
    :func:`interpolative`); rows ``rows`` from a column ID of ``Cᵀ`` (Voronin & Martinsson
    2017, Alg. 2). ``U = C⁺ M R⁺`` is the Frobenius-optimal core for these ``C``, ``R``
    (Stewart 1999). Costs two more passes over ``M`` than the ID.
    """
    matrix, was_numpy = as_matrix(M, "M")
    k = check_rank(rank, tuple(matrix.shape))
    gen = make_generator(generator)  # checked even where unused, as randomized_svd does
    randomized = check_flag(randomized, "randomized")
    cols = _column_id(matrix, k, None, randomized, gen).idx  # (k,)
    C = matrix[:, cols]  # (m, k)
    rows = _column_id(C.mT.contiguous(), k, None, False, None).idx  # (k,) rows of C
    R = matrix[rows, :]  # (k, n)
    U = (_pinv_tensor(C, None) @ matrix) @ _pinv_tensor(R, None)  # (k, m)(m, n)(n, k)
    return to_output(CUR(C, U, R, cols, rows), was_numpy)
