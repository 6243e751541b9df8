"""pinv and lstsq_factor: agreement with numpy, Moore–Penrose conditions, conditioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from linalg_spectra import with_spectrum

from rankwise.linalg import lstsq_factor, pinv

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 9),
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_pinv_satisfies_moore_penrose_and_matches_numpy(
    device: str, m: int, n: int, data: st.DataObject, dtype: torch.dtype
) -> None:
    rank = data.draw(st.integers(1, min(m, n)), label="rank")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(m, rank, generator=gen, dtype=dtype)
    A = (left @ torch.randn(rank, n, generator=gen, dtype=dtype)).to(device)  # rank <= rank
    P = pinv(A)
    assert P.shape == (n, m) and P.dtype == dtype and P.device == A.device
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    scale = max(1.0, float(P.abs().max()) * float(A.abs().max()))
    for lhs, rhs in (
        (A @ P @ A, A),
        (P @ A @ P, P),
        ((A @ P).mT, A @ P),
        ((P @ A).mT, P @ A),
    ):
        torch.testing.assert_close(lhs, rhs, atol=tol * scale, rtol=tol)
    if dtype == torch.float64:
        rtol = max(m, n) * np.finfo(np.float64).eps
        expected = np.linalg.pinv(A.cpu().numpy(), rtol=rtol)
        np.testing.assert_allclose(P.cpu().numpy(), expected, atol=1e-9 * scale)


def test_pinv_numpy_in_numpy_out_with_rtol() -> None:
    A = np.asarray(with_spectrum(7, 5, torch.tensor([1.0, 0.5, 1e-3]), seed=1))
    before = A.copy()
    loose = pinv(A, rtol=1e-2)  # drops σ = 1e-3: the rank-2 pseudo-inverse
    assert isinstance(loose, np.ndarray)
    np.testing.assert_allclose(loose, np.linalg.pinv(A, rtol=1e-2), atol=1e-10)
    np.testing.assert_allclose(pinv(A), np.linalg.pinv(A, rtol=7 * 2.220446049250313e-16))
    assert np.linalg.matrix_rank(loose) == 2
    np.testing.assert_array_equal(A, before)


def test_pinv_does_not_square_the_condition_number() -> None:
    # κ(A) = 1e6: the SVD route loses ~κ·eps, the normal equations (AᵀA)⁻¹Aᵀ lose ~κ²·eps.
    sigma = torch.logspace(0, -6, 6, dtype=torch.float64)
    A = with_spectrum(50, 6, sigma, seed=2)
    x = torch.linspace(-1, 1, 6, dtype=torch.float64)
    b = A @ x
    ours = float((pinv(A) @ b - x).norm() / x.norm())
    normal = torch.linalg.inv(A.T @ A) @ A.T @ b
    theirs = float((normal - x).norm() / x.norm())
    assert ours < 1e-8
    assert theirs > 100 * ours


def test_lstsq_factor_left_and_right_match_numpy() -> None:
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(12, 9, generator=gen, dtype=torch.float64)
    A = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    B = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    got_B = lstsq_factor(M, left=A)
    want_B = np.linalg.lstsq(A.numpy(), M.numpy(), rcond=None)[0]
    np.testing.assert_allclose(got_B.numpy(), want_B, atol=1e-12)
    got_A = lstsq_factor(M, right=B)
    want_A = np.linalg.lstsq(B.numpy().T, M.numpy().T, rcond=None)[0].T
    np.testing.assert_allclose(got_A.numpy(), want_A, atol=1e-12)
    # Optimality: the residual is orthogonal to the factor's span.
    torch.testing.assert_close(A.T @ (A @ got_B - M), torch.zeros(4, 9, dtype=torch.float64))
    torch.testing.assert_close((got_A @ B - M) @ B.T, torch.zeros(12, 4, dtype=torch.float64))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 8),
    n=st.integers(1, 8),
    r=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_lstsq_factor_matches_numpy_on_any_shape(
    m: int, n: int, r: int, seed: int, dtype: type
) -> None:
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((m, n)).astype(dtype)
    A = rng.standard_normal((m, r)).astype(dtype)
    B = rng.standard_normal((r, n)).astype(dtype)
    tol = 1e-3 if dtype == np.float32 else 1e-9
    got = lstsq_factor(M, left=A)
    assert isinstance(got, np.ndarray) and got.shape == (r, n) and got.dtype == dtype
    want = np.linalg.lstsq(A.astype(np.float64), M.astype(np.float64), rcond=None)[0]
    scale = 1 + np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tol * scale * 10, rtol=tol)
    got = lstsq_factor(M, right=B)
    want = np.linalg.lstsq(B.T.astype(np.float64), M.T.astype(np.float64), rcond=None)[0].T
    scale = 1 + np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tol * scale * 10, rtol=tol)


def test_lstsq_factor_rank_deficient_gives_the_minimum_norm_solution() -> None:
    gen = torch.Generator().manual_seed(4)
    A = (
        torch.randn(10, 2, generator=gen, dtype=torch.float64)
        @ torch.randn(2, 5, generator=gen).double()
    )
    M = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    want = np.linalg.lstsq(A.numpy(), M.numpy(), rcond=None)[0]
    np.testing.assert_allclose(lstsq_factor(M, left=A).numpy(), want, atol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of left, right"),
        ({"left": torch.ones(4, 2), "right": torch.ones(2, 3)}, "exactly one of left, right"),
        ({"left": torch.ones(5, 2)}, r"left: expected 4 rows"),
        ({"right": torch.ones(2, 5)}, r"right: expected 3 columns"),
        ({"left": torch.ones(4, 2, 1)}, r"left: expected a 2-D matrix"),
    ],
)
def test_lstsq_factor_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lstsq_factor(torch.ones(4, 3), **kwargs)


def test_pinv_bad_input() -> None:
    with pytest.raises(ValueError, match="A: expected a 2-D matrix"):
        pinv(torch.ones(3))
    with pytest.raises(ValueError, match="A: expected finite entries"):
        pinv(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="rtol"):
        pinv(torch.ones(2, 2), rtol=-1.0)
