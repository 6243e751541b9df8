"""Monarch matrices and the optimal Monarch projection (Dao et al., ICML 2022).

A Monarch matrix is ``M = P L Pᵀ R`` with ``R`` block-diagonal (``b`` blocks, each (b, q)),
``L`` block-diagonal (``b`` blocks, each (p, b)), and ``P`` the reshape-transpose permutation
that turns an index ``(j, s)`` of a (b, b) grid into ``(s, j)``. Here ``b = nblocks``,
``m = p·b`` and ``n = b·q`` (the square case of the paper is ``m = n = b²``). Written out,

    M[(i, s), (j, t)] = L[s, i, j] · R[j, s, t]        (row = i·b + s, col = j·q + t)

so for every pair ``(s, j)`` the (p, q) slice ``M[(·, s), (j, ·)]`` is the rank-1 matrix
``L[s, :, j] ⊗ R[j, s, :]``. Hence (Dao et al. 2022, Thm. 1) the Frobenius-optimal Monarch
approximation of any (m, n) matrix is found slice by slice with rank-1 SVDs, and its squared
error is the sum over slices of their discarded ``σ_2² + σ_3² + ...``.

Parameters: ``L`` has ``m·b`` and ``R`` has ``n·b`` entries, so a Monarch matrix with
``nblocks = b`` stores ``b·(m + n)`` numbers — exactly as many as a rank-``b`` factorization
``A B`` with ``A`` (m, b), ``B`` (b, n). Sizes must be divisible: ``nblocks`` divides both
``m`` and ``n`` (pad or crop otherwise), else :func:`monarch_project` raises ``ValueError``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from rankwise.errors import ShapeMismatchError
from rankwise.linalg._validate import ArrayLike, as_matrix, from_numpy, to_output


class Monarch(NamedTuple):
    """``M = P L Pᵀ R``: ``L`` (b, p, b) holds the b blocks (p, b), ``R`` (b, b, q) the b blocks (b, q)."""

    L: torch.Tensor
    R: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        self._check_shapes()
        b, p, _ = self.L.shape
        q = self.R.shape[2]
        return (p * b, b * q)

    def _check_shapes(self) -> None:
        """``L`` (b, p, b) and ``R`` (b, b, q) with one ``b`` (a hand-built pair of other
        shapes gave a wrong ``shape`` and torch's einsum/bmm errors naming neither)."""
        L, R = tuple(self.L.shape), tuple(self.R.shape)
        if len(L) != 3 or len(R) != 3 or not L[0] == L[2] == R[0] == R[1]:
            raise ShapeMismatchError(
                f"Monarch: expected L of shape (b, p, b) and R of shape (b, b, q) with one b, "
                f"found L {L} and R {R}"
            )

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        self._check_shapes()
        was_numpy = isinstance(self.L, np.ndarray)
        return _tensor(self.L), _tensor(self.R), was_numpy

    def to_dense(self) -> ArrayLike:
        """The (m, n) matrix: ``M[(i, s), (j, t)] = L[s, i, j] · R[j, s, t]``."""
        L, R, was_numpy = self._factors()
        dense = torch.einsum("sij,jst->isjt", L, R).reshape(self.shape)
        return to_output(dense, was_numpy)

    def matmul(self, x: ArrayLike) -> ArrayLike:
        """``M @ x`` for ``x`` of shape (n,) or (n, c) in ``O(b·(m + n)·c)`` — ``O(n^1.5)``
        per column when ``b = sqrt(n)`` — without forming ``M``. Computed in the promoted
        floating dtype of the factors and ``x``, as ``to_dense() @ x`` would be (float32
        factors times a float64 ``x`` give float64; integer ``x`` takes the factors' dtype)."""
        L, R, was_numpy = self._factors()
        x = _tensor(x).to(L.device)
        if x.is_complex() and not (L.is_complex() or R.is_complex()):
            # real factors: the cast below to their dtype would drop x's imaginary part
            raise ValueError(f"x: expected a real array, found dtype {x.dtype}")
        dtype = torch.promote_types(R.dtype, x.dtype) if x.is_floating_point() else R.dtype
        L, R = L.to(dtype), R.to(dtype)
        b, p, _ = L.shape
        q = R.shape[2]
        m, n = self.shape
        if x.ndim not in (1, 2) or x.shape[0] != n:
            raise ShapeMismatchError(
                f"x: expected shape ({n},) or ({n}, c) for a Monarch matrix of shape {(m, n)}, "
                f"found {tuple(x.shape)}"
            )
        columns = x.reshape(b, q, -1)  # (b, q, c): block j holds x[(j, ·)]
        y = torch.bmm(R, columns.to(dtype))  # (b_j, b_s, c): R_j applied per block
        y = y.transpose(0, 1)  # (b_s, b_j, c): the permutation Pᵀ
        out = torch.bmm(L, y)  # (b_s, p, c): L_s applied per block
        out = out.transpose(0, 1).reshape(m, -1)  # (p, b_s, c) -> rows (i, s): the permutation P
        return to_output(out.reshape(m) if x.ndim == 1 else out, was_numpy)


def _tensor(value: ArrayLike) -> torch.Tensor:
    """``torch.as_tensor`` that also takes numpy arrays with negative strides (a flipped
    view, ``x[::-1]``), as every other entry point does (:func:`from_numpy`)."""
    return from_numpy(value) if isinstance(value, np.ndarray) else torch.as_tensor(value)


def _slices(M: torch.Tensor, nblocks: int) -> torch.Tensor:
    # (m, n) -> (b_s, b_j, p, q): slice [s, j] = M[(·, s), (j, ·)].
    m, n = M.shape
    p, q = m // nblocks, n // nblocks
    return M.reshape(p, nblocks, nblocks, q).permute(1, 2, 0, 3)


def monarch_slices(M: ArrayLike, nblocks: int) -> ArrayLike:
    """The ``nblocks²`` slices (b, b, p, q) whose rank-1 parts :func:`monarch_project` keeps."""
    matrix, was_numpy = as_matrix(M, "M")
    nblocks = _check_nblocks(matrix.shape, nblocks)
    # always a copy (a contiguous view, nblocks = 1 or p = 1, would alias the caller's M)
    return to_output(
        _slices(matrix, nblocks).clone(memory_format=torch.contiguous_format), was_numpy
    )


def _check_nblocks(shape: torch.Size, nblocks: int) -> int:
    m, n = shape
    if isinstance(nblocks, bool) or not isinstance(nblocks, (int, np.integer)) or nblocks < 1:
        raise ValueError(f"nblocks: expected a positive int, found {nblocks!r}")
    if m % nblocks or n % nblocks:
        raise ValueError(
            f"nblocks: expected a common divisor of both sides of M {(m, n)}, found {nblocks} "
            "(crop or pad M so that nblocks divides m and n)"
        )
    return int(nblocks)


def monarch_project(M: ArrayLike, nblocks: int) -> Monarch:
    """The Frobenius-optimal Monarch approximation of ``M`` with ``nblocks`` blocks.

    Dao et al. 2022, Alg. 1: reshape ``M`` (m, n) into ``b²`` slices (p, q) (``b = nblocks``,
    ``m = p·b``, ``n = b·q``), keep each slice's top singular triplet ``σ u vᵀ`` with
    ``L[s, :, j] = σ u`` and ``R[j, s, :] = vᵀ``. The error ``‖M − P L Pᵀ R‖_F²`` is the sum of
    the discarded squared slice singular values. ``nblocks`` must divide both ``m`` and ``n``.
    """
    matrix, was_numpy = as_matrix(M, "M")
    nblocks = _check_nblocks(matrix.shape, nblocks)
    slices = _slices(matrix, nblocks)  # (b, b, p, q)
    U, S, Vh = torch.linalg.svd(slices, full_matrices=False)  # batched over the b² slices
    L = (U[..., 0] * S[..., :1]).permute(0, 2, 1)  # (b_s, b_j, p) -> (b_s, p, b_j)
    R = Vh[..., 0, :].transpose(0, 1)  # (b_s, b_j, q) -> (b_j, b_s, q)
    return to_output(Monarch(L.contiguous(), R.contiguous()), was_numpy)
