"""monarch_project: exact recovery, slice-wise optimality, fast matmul, vs SVD at equal size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankwise.linalg import Monarch, monarch_project, monarch_slices, truncated_svd


def _random_monarch(b: int, p: int, q: int, seed: int = 0) -> Monarch:
    gen = torch.Generator().manual_seed(seed)
    L = torch.randn(b, p, b, generator=gen, dtype=torch.float64)
    R = torch.randn(b, b, q, generator=gen, dtype=torch.float64)
    return Monarch(L, R)


def _explicit(monarch: Monarch) -> torch.Tensor:
    # P L Pᵀ R with explicit block-diagonal and permutation matrices, as in Dao et al. 2022.
    L, R = monarch.L, monarch.R
    b, p, _ = L.shape
    R_blocks = torch.block_diag(*R)  # (b·b, b·q): rows (j, s)
    L_blocks = torch.block_diag(*L)  # (b·p, b·b): rows (s, i), columns (s, j)
    transpose = torch.zeros(b * b, b * b, dtype=L.dtype)  # Pᵀ: (j, s) -> (s, j)
    out = torch.zeros(p * b, b * p, dtype=L.dtype)  # P: (s, i) -> (i, s)
    for s in range(b):
        for j in range(b):
            transpose[s * b + j, j * b + s] = 1
        for i in range(p):
            out[i * b + s, s * p + i] = 1
    return out @ L_blocks @ transpose @ R_blocks


@pytest.mark.parametrize(("b", "p", "q"), [(4, 4, 4), (3, 5, 2), (1, 6, 7), (5, 1, 1)])
def test_dense_matmul_and_explicit_form_agree(b: int, p: int, q: int) -> None:
    monarch = _random_monarch(b, p, q)
    dense = monarch.to_dense()
    assert dense.shape == monarch.shape == (p * b, b * q)
    torch.testing.assert_close(dense, _explicit(monarch), atol=1e-12, rtol=0)
    x = torch.randn(b * q, 3, dtype=torch.float64)
    torch.testing.assert_close(monarch.matmul(x), dense @ x, atol=1e-12, rtol=0)
    torch.testing.assert_close(monarch.matmul(x[:, 0]), dense @ x[:, 0], atol=1e-12, rtol=0)
    # Same number of parameters as a rank-b factorization (m + n)·b.
    assert monarch.L.numel() + monarch.R.numel() == b * (p * b + b * q)


def test_projection_recovers_a_monarch_matrix() -> None:
    target = _random_monarch(8, 8, 8, seed=1).to_dense()  # 64 x 64, the square case n = b²
    projected = monarch_project(target, 8)
    error = (projected.to_dense() - target).norm() / target.norm()
    assert float(error) < 1e-10


def test_projection_error_is_the_discarded_slice_spectrum() -> None:
    gen = torch.Generator().manual_seed(2)
    M = torch.randn(36, 24, generator=gen, dtype=torch.float64)
    for b in (2, 3, 6, 12):
        projected = monarch_project(M, b)
        sigma = torch.linalg.svdvals(monarch_slices(M, b))  # (b, b, min(p, q))
        discarded = float(sigma[..., 1:].square().sum().sqrt())
        assert float((M - projected.to_dense()).norm()) == pytest.approx(discarded, rel=1e-10)
        # Optimal: perturbing the factors never helps.
        for seed in range(3):
            noise = torch.Generator().manual_seed(seed)
            L = projected.L + 1e-3 * torch.randn(projected.L.shape, generator=noise).double()
            worse = (M - Monarch(L, projected.R).to_dense()).norm()
            assert float(worse) >= discarded


def test_monarch_beats_svd_at_equal_parameters_on_sparse_matrices() -> None:
    # A diagonal matrix is a Monarch matrix (every slice has at most one non-zero), while its
    # singular values are its |diagonal|: a rank-b SVD with the same (m + n)·b parameters
    # keeps only b of n entries. Likewise a sparse diagonal-plus-noise matrix.
    n, b = 256, 16
    gen = torch.Generator().manual_seed(3)
    for noise in (0.0, 0.01):
        M = torch.diag(torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
        M = M + noise * torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
        monarch = monarch_project(M, b)
        svd = truncated_svd(M, b)
        assert monarch.L.numel() + monarch.R.numel() == svd.U.numel() + svd.Vh.numel()
        monarch_error = float((M - monarch.to_dense()).norm() / M.norm())
        svd_error = float((M - (svd.U * svd.S) @ svd.Vh).norm() / M.norm())
        assert monarch_error < 0.2 * svd_error
        if noise == 0.0:
            assert monarch_error < 1e-12


def test_numpy_in_numpy_out_float32_and_no_mutation() -> None:
    M = np.random.default_rng(0).standard_normal((12, 20)).astype(np.float32)
    before = M.copy()
    monarch = monarch_project(M, 4)
    assert isinstance(monarch.L, np.ndarray) and monarch.L.dtype == np.float32
    assert monarch.L.shape == (4, 3, 4) and monarch.R.shape == (4, 4, 5)
    dense = monarch.to_dense()
    assert isinstance(dense, np.ndarray) and dense.shape == (12, 20)
    np.testing.assert_allclose(monarch.matmul(np.ones(20, np.float32)), dense.sum(1), rtol=1e-5)
    np.testing.assert_array_equal(M, before)


@pytest.mark.parametrize(
    ("nblocks", "match"),
    [
        (0, "nblocks: expected a positive int, found 0"),
        (3, r"nblocks: expected a common divisor of both sides of M \(12, 20\), found 3"),
        (8, "found 8"),
        (2.0, "nblocks: expected a positive int"),
    ],
)
def test_bad_nblocks(nblocks: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        monarch_project(torch.ones(12, 20), nblocks)


def test_bad_matrix_and_vector() -> None:
    with pytest.raises(ValueError, match="M: expected a 2-D matrix"):
        monarch_project(torch.ones(4), 2)
    with pytest.raises(ValueError, match=r"x: expected shape \(20,\) or \(20, c\)"):
        monarch_project(torch.ones(12, 20), 4).matmul(torch.ones(12))


def test_matmul_promotes_like_the_dense_product() -> None:
    """float32 factors times a float64 x: float64, as ``to_dense() @ x`` (x was cast down to
    float32 and the product lost ~1e-7 relative); an integer x takes the factors' dtype."""
    monarch = monarch_project(torch.randn(12, 20, generator=torch.Generator().manual_seed(0)), 4)
    assert monarch.L.dtype == torch.float32
    x = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x + 1e-9  # digits float32 cannot hold
    out = monarch.matmul(x)
    assert out.dtype == torch.float64
    exact = type(monarch)(monarch.L.double(), monarch.R.double()).to_dense() @ x
    torch.testing.assert_close(out, exact, atol=1e-12, rtol=0)
    ints = torch.arange(20)
    assert monarch.matmul(ints).dtype == torch.float32
    torch.testing.assert_close(monarch.matmul(ints), monarch.to_dense() @ ints.float())


def test_matmul_refuses_a_complex_x() -> None:
    """The cast to the factors' real dtype dropped x's imaginary part: M @ (1j·1) gave 0."""
    M = monarch_project(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)), 2)
    with pytest.raises(ValueError, match=r"x: expected a real array, found dtype torch.complex64"):
        M.matmul(1j * torch.ones(8))
    with pytest.raises(ValueError, match="x: expected a real array, found dtype torch.complex128"):
        Monarch(M.L.numpy(), M.R.numpy()).matmul(np.ones(8) * 1j)
    # complex factors (hand-built) take a complex x, as to_dense() @ x does
    C = Monarch(M.L.to(torch.complex64), M.R.to(torch.complex64))
    torch.testing.assert_close(C.matmul(1j * torch.ones(8)), C.to_dense() @ (1j * torch.ones(8)))


def test_mismatched_factors_are_refused_by_name() -> None:
    """A hand-built pair with two block counts had shape (8, 8) and failed in einsum/bmm."""
    from rankwise.errors import ShapeMismatchError

    M = Monarch(torch.ones(2, 4, 2), torch.ones(3, 3, 4))
    for use in (lambda: M.shape, M.to_dense, lambda: M.matmul(torch.ones(8))):
        with pytest.raises(ShapeMismatchError, match=r"found L \(2, 4, 2\) and R \(3, 3, 4\)"):
            use()
    with pytest.raises(ShapeMismatchError, match=r"found L \(2, 4\) and R"):
        Monarch(torch.ones(2, 4), torch.ones(2, 2, 4)).to_dense()
