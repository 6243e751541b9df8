"""Results that must not depend on the scale of the input: entries near float32's or float64's
range edges (squared norms and Gram matrices would overflow or underflow)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rankwise.linalg as rl


def _near_rank8(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    B = torch.randn(60, 8, generator=g, dtype=torch.float64) @ torch.randn(
        8, 40, generator=g, dtype=torch.float64
    )
    return (B + 1e-3 * torch.randn(60, 40, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("scale", [1e-24, 1e20])
def test_float32_interpolative_pivots_do_not_depend_on_scale(scale: float) -> None:
    A = _near_rank8(torch.float32)
    ref = rl.interpolative(A, 8)
    got = rl.interpolative(A * scale, 8)  # squared norms: 0 or inf in float32
    assert sorted(got.idx.tolist()) == sorted(ref.idx.tolist())
    torch.testing.assert_close(got.Z, ref.Z, rtol=1e-4, atol=1e-5)


def test_randomized_routines_on_huge_float64_entries() -> None:
    A = _near_rank8(torch.float64) * 1e160  # finite; its Gram matrix is not
    S = torch.linalg.svdvals(A)[:5]
    got = rl.randomized_svd(A, 5, generator=0).S
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got / S[0], S / S[0], rtol=1e-3, atol=1e-3)
    assert len(rl.interpolative(A, 8, randomized=True, generator=0).idx) == 8


@pytest.mark.parametrize("scale", [1e-170, 1e160])
def test_rank_helpers_are_scale_free(scale: float) -> None:
    np.testing.assert_allclose(rl.energy(np.full(3, scale)), [1 / 3, 2 / 3, 1.0])
    eye = torch.eye(3, dtype=torch.float64) * scale
    assert rl.stable_rank(eye) == pytest.approx(3.0)
    assert rl.relative_error(eye, eye / 2) == pytest.approx(0.5)
    A = torch.diag(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)) * scale
    assert rl.truncated_svd(A, energy=0.9).S.numel() == 3


def test_monarch_slices_never_alias_the_input() -> None:
    M = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    before = M.clone()
    slices = rl.monarch_slices(M, 1)  # a contiguous permutation: it used to be a view
    slices.zero_()
    assert torch.equal(M, before)


def test_numpy_scalars_accepted_and_strings_or_bools_refused() -> None:
    A = _near_rank8(torch.float64)
    torch.testing.assert_close(rl.pinv(A, rtol=np.float32(0.1)), rl.pinv(A, rtol=0.1))
    rl.randomized_svd(A, 4, oversample=np.int64(3), generator=0)
    for bad in ("0.5", True):
        with pytest.raises(ValueError, match="energy: expected a number"):
            rl.truncated_svd(A, energy=bad)


def test_float32_interpolative_with_many_rows_near_2_to_60() -> None:
    # the peak is ordinary for one entry, but 1000 squared entries overflow float32
    g = torch.Generator().manual_seed(0)
    A = 1 + 0.1 * (torch.randn(1000, 2, generator=g) @ torch.randn(2, 30, generator=g))
    A = A / A.abs().max()  # rank 3, every entry near the largest
    ref = rl.interpolative(A, 3)
    got = rl.interpolative(A * 2.0**60, 3)  # largest entry 2^60: was not rescaled
    assert got.idx.tolist() == ref.idx.tolist()
    torch.testing.assert_close(got.Z, ref.Z, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float32, 1e30),
                                         (torch.float64, 1e160)])  # fmt: skip
def test_cr_weights_do_not_depend_on_opposite_scales(dtype: torch.dtype, scale: float) -> None:
    # X·s and Y/s have the product XY, and the same optimal sampling weights
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 30, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 30)
    Y = torch.randn(30, 15, generator=g, dtype=torch.float64)
    Xs, Ys = (X * scale).to(dtype), (Y / scale).to(dtype)
    X, Y = X.to(dtype), Y.to(dtype)
    ref = rl.cr_approx(X, Y, 10, method="top")
    assert rl.cr_approx(Xs, Ys, 10, method="top").idx.tolist() == ref.idx.tolist()
    ref = rl.cr_approx(X, Y, 10, generator=3)
    got = rl.cr_approx(Xs, Ys, 10, generator=3)
    assert got.idx.tolist() == ref.idx.tolist()
    torch.testing.assert_close(got.C @ got.R, ref.C @ ref.R, rtol=1e-4, atol=1e-4)


def test_cr_expected_error_is_not_negative_when_exact() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):  # inner dimension 1: one outer product, sampled exactly
        assert (
            rl.cr_expected_error(rng.standard_normal((7, 1)), rng.standard_normal((1, 9)), 1) >= 0
        )


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_randomized_interpolative_and_cur_pivots_do_not_depend_on_scale(scale: float) -> None:
    A = _near_rank8(torch.float64)
    ref = rl.interpolative(A, 8, randomized=True, generator=0)
    got = rl.interpolative(A * scale, 8, randomized=True, generator=0)  # sketch norms² overflow
    assert got.idx.tolist() == ref.idx.tolist()
    torch.testing.assert_close(got.Z, ref.Z, rtol=1e-9, atol=1e-12)
    by_eps = rl.interpolative(A * scale, eps=1e-3, randomized=True, generator=0)
    assert len(by_eps.idx) == len(rl.interpolative(A, eps=1e-3, randomized=True, generator=0).idx)
    assert len(by_eps.idx) >= 8  # rank 8 plus 1e-3 noise (index order stopped at 1 column)
    c_ref = rl.cur(A, 8, randomized=True, generator=0)
    c_got = rl.cur(A * scale, 8, randomized=True, generator=0)
    assert c_got.cols.tolist() == c_ref.cols.tolist()
    assert c_got.rows.tolist() == c_ref.rows.tolist()


@pytest.mark.parametrize(
    ("dtype", "scale"), [(torch.float64, 1e-310), (torch.float32, 1e-42), (torch.float32, 1e-39)]
)
def test_subnormal_entries(dtype: torch.dtype, scale: float) -> None:
    # the largest entry is subnormal: bringing it to 1 needs 2^1030 (float64) or 2^140
    # (float32), beyond the dtype's range as one factor (an OverflowError, or inf)
    A = torch.randn(20, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tiny = (A * scale).to(dtype)
    assert float(tiny.abs().max()) < torch.finfo(dtype).tiny
    assert rl.relative_error(tiny, tiny * 0.5) == pytest.approx(0.5, rel=1e-2)
    S = rl.randomized_svd(tiny, 3, generator=0).S
    torch.testing.assert_close(
        S, torch.linalg.svdvals(tiny.double())[:3].to(dtype), rtol=2e-2, atol=0
    )
    exact = rl.interpolative(tiny.double() / scale, 3).idx.tolist()
    assert rl.interpolative(tiny, 3).idx.tolist() == exact
    assert len(rl.interpolative(tiny, 3, randomized=True, generator=0).idx) == 3


def test_cr_expected_error_beyond_float64_is_inf_not_an_overflow_error() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 6, generator=g, dtype=torch.float64)
    Y = torch.randn(6, 3, generator=g, dtype=torch.float64)
    ref = rl.cr_expected_error(X, Y, 2)
    assert rl.cr_expected_error(X * 1e150, Y * 1e150, 2) == math.inf  # ~1e600
    assert rl.cr_expected_error(X * 1e100, Y * 1e50, 2) == pytest.approx(ref * 1e300, rel=1e-12)
    assert rl.cr_expected_error(X * 1e-100, Y * 1e-60, 2) == pytest.approx(ref * 1e-320, rel=1e-2)


def test_big_endian_numpy_input() -> None:
    M = np.random.default_rng(0).standard_normal((6, 4))
    got = rl.truncated_svd(M.astype(">f8"), 2)
    np.testing.assert_allclose(got.S, rl.truncated_svd(M, 2).S, rtol=1e-12)
    assert isinstance(got.S, np.ndarray)


@pytest.mark.parametrize(
    ("dtype", "scale"), [(torch.float64, 1e-310), (torch.float32, 1e-41), (torch.float32, 1e30)]
)
@pytest.mark.parametrize("side", ["left", "right"])
def test_lstsq_factor_is_scale_free(dtype: torch.dtype, scale: float, side: str) -> None:
    # A⁺ of a subnormal factor overflows although A⁺ M is O(1): it came back NaN
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 4, generator=g, dtype=torch.float64)
    X = torch.randn(4, 6, generator=g, dtype=torch.float64)
    if side == "left":  # M = A X: B = A⁺ M = X
        factor, M = A, A @ X
    else:  # M = Xᵀ Aᵀ: A = M (Aᵀ)⁺ = Xᵀ
        factor, M = A.T, X.T @ A.T
    expected = X if side == "left" else X.T
    got = rl.lstsq_factor((M * scale).to(dtype), **{side: (factor * scale).to(dtype)})
    assert got.dtype == dtype and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-3)
