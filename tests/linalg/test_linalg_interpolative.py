"""interpolative, id_reconstruct, id_to_svd and cur: against scipy's ID, randomness, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from linalg_spectra import geometric, with_spectrum

import rankwise.linalg as rl
from rankwise.linalg import (
    cur,
    id_reconstruct,
    id_to_svd,
    interpolative,
    relative_error,
    truncated_svd,
)


@pytest.fixture(scope="module")
def decaying() -> np.ndarray:
    return with_spectrum(300, 240, geometric(240, 0.95), seed=0).numpy()


def _spectral_error(M: np.ndarray, decomposition) -> float:
    return relative_error(M, id_reconstruct(M, decomposition), norm="spectral")


def test_deterministic_id_matches_scipy(decaying: np.ndarray) -> None:
    sli = pytest.importorskip("scipy.linalg.interpolative")
    for rank in (10, 40):
        ours = interpolative(decaying, rank)
        idx, proj = sli.interp_decomp(decaying.copy(), rank, rand=False)
        theirs = sli.reconstruct_matrix_from_id(decaying[:, idx[:rank]], idx, proj)
        scipy_error = relative_error(decaying, theirs, norm="spectral")
        assert _spectral_error(decaying, ours) == pytest.approx(scipy_error, rel=0.01)
        assert set(ours.idx.tolist()) == set(idx[:rank].tolist())


def test_randomized_id_depends_on_the_generator_and_is_near_deterministic(
    decaying: np.ndarray, record_property
) -> None:
    rank = 40
    exact = interpolative(decaying, rank)
    a = interpolative(decaying, rank, randomized=True, generator=0)
    b = interpolative(decaying, rank, randomized=True, generator=1)
    again = interpolative(decaying, rank, randomized=True, generator=0)
    np.testing.assert_array_equal(a.Z, again.Z)
    assert not np.array_equal(a.Z, b.Z)
    for decomposition in (a, b):
        assert _spectral_error(decaying, decomposition) <= 2 * _spectral_error(decaying, exact)
    max_z = {name: float(np.abs(d.Z).max()) for name, d in (("det", exact), ("rand", a))}
    record_property("max_abs_Z", max_z)  # reported in the junit XML
    assert 1.0 <= max_z["det"] <= 10 and 1.0 <= max_z["rand"] <= 10


def test_scipy_fixed_rank_rand_true_is_deterministic(decaying: np.ndarray) -> None:
    # The trap this module works around (scipy >= 1.15): different rngs, identical pivots.
    sli = pytest.importorskip("scipy.linalg.interpolative")
    runs = [
        sli.interp_decomp(decaying.copy(), 20, rand=True, rng=np.random.default_rng(s))[0]
        for s in (0, 1)
    ]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_id_structure_and_svd_of_the_id(decaying: np.ndarray) -> None:
    d = interpolative(decaying, 25)
    assert d.idx.shape == (25,) and d.Z.shape == (25, 240)
    np.testing.assert_array_equal(d.Z[:, d.idx], np.eye(25))
    svd = id_to_svd(decaying, d)
    np.testing.assert_allclose(
        (svd.U * svd.S) @ svd.Vh, id_reconstruct(decaying, d), atol=1e-12, rtol=0
    )
    np.testing.assert_allclose(svd.U.T @ svd.U, np.eye(25), atol=1e-12)
    np.testing.assert_allclose(svd.Vh @ svd.Vh.T, np.eye(25), atol=1e-12)
    np.testing.assert_allclose(svd.S, np.linalg.svd(id_reconstruct(decaying, d))[1][:25])
    # Rank 25 by columns can never beat rank 25 by Eckart–Young.
    best = truncated_svd(decaying, 25)
    optimum = relative_error(decaying, (best.U * best.S) @ best.Vh, norm="spectral")
    assert _spectral_error(decaying, d) >= optimum * (1 - 1e-12)


@pytest.mark.parametrize("randomized", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exactly_low_rank_is_recovered(randomized: bool, dtype: torch.dtype) -> None:
    M = with_spectrum(80, 60, geometric(7, 0.5), seed=1, dtype=dtype)
    d = interpolative(M, 7, randomized=randomized, generator=3)
    assert d.Z.dtype == dtype and d.idx.dtype == torch.long
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert relative_error(M, id_reconstruct(M, d)) < tol
    # Asking for more than the true rank still works (new directions, min-norm coefficients).
    d = interpolative(M, 12, randomized=randomized, generator=3)
    assert relative_error(M, id_reconstruct(M, d)) < tol


@pytest.mark.parametrize("randomized", [False, True])
def test_eps_bounds_the_residual_columns(decaying: np.ndarray, randomized: bool) -> None:
    eps = 1e-2
    d = interpolative(decaying, eps=eps, randomized=randomized, generator=0)
    residual = decaying - id_reconstruct(decaying, d)
    column_scale = np.linalg.norm(decaying, axis=0).max()
    assert np.linalg.norm(residual, axis=0).max() <= eps * column_scale
    assert 1 <= d.idx.size < 240
    if not randomized:  # one fewer column would break the bound: the rank is minimal
        fewer = interpolative(decaying, d.idx.size - 1)
        fewer_residual = decaying - id_reconstruct(decaying, fewer)
        assert np.linalg.norm(fewer_residual, axis=0).max() > eps * column_scale


@pytest.mark.parametrize(
    "spectrum",
    [1 / np.arange(1, 241), np.r_[np.ones(6), np.full(234, 1e-2)]],
    ids=["1/j", "flat tail"],
)
def test_randomized_eps_holds_on_m_when_the_sketch_misses_a_heavy_tail(
    spectrum: np.ndarray,
) -> None:
    # the sketch holds only part of a heavy tail: its residuals stopped the QR early (k = 80
    # and 2.0·eps on a 1/j spectrum at 400 × 300, k = 10 for 300 at a flat tail)
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((320, spectrum.size)))
    V, _ = np.linalg.qr(rng.standard_normal((240, spectrum.size)))
    M = (U * spectrum) @ V.T
    eps = 0.03
    exact = interpolative(M, eps=eps)
    d = interpolative(M, eps=eps, randomized=True, generator=0)
    column_scale = np.linalg.norm(M, axis=0).max()
    residual = np.linalg.norm(M - id_reconstruct(M, d), axis=0).max()
    assert residual <= eps * column_scale
    assert d.idx.size >= exact.idx.size  # the deterministic rank is the smallest that holds


@pytest.mark.parametrize("randomized", [False, True])
def test_cur_picks_real_columns_and_rows(decaying: np.ndarray, randomized: bool) -> None:
    c = cur(decaying, 30, randomized=randomized, generator=0)
    np.testing.assert_array_equal(c.C, decaying[:, c.cols])
    np.testing.assert_array_equal(c.R, decaying[c.rows, :])
    assert c.U.shape == (30, 30) and len(set(c.rows.tolist())) == 30
    error = relative_error(decaying, c.C @ c.U @ c.R, norm="spectral")
    assert error <= 3 * _spectral_error(decaying, interpolative(decaying, 30))
    M = with_spectrum(50, 40, geometric(5, 0.5), seed=2)
    exact = cur(M, 5)
    assert relative_error(M, exact.C @ exact.U @ exact.R) < 1e-10


def test_inputs_are_not_modified(decaying: np.ndarray) -> None:
    before = decaying.copy()
    interpolative(decaying, 5, randomized=True, generator=0)
    cur(decaying, 5)
    np.testing.assert_array_equal(decaying, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of rank, eps"),
        ({"rank": 3, "eps": 0.1}, "exactly one of rank, eps"),
        ({"rank": 0}, "rank"),
        ({"rank": 9}, "rank"),
        ({"eps": 0.0}, r"eps: expected a value in \(0, 1\)"),
        ({"eps": 1.0}, r"eps: expected a value in \(0, 1\)"),
        ({"eps": 1.5}, r"eps"),
        ({"rank": 2, "randomized": True, "generator": 1.5}, "generator"),
    ],
)
def test_interpolative_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        interpolative(torch.ones(8, 10), **kwargs)


def test_bad_matrices_and_decompositions() -> None:
    with pytest.raises(ValueError, match="M: expected a 2-D matrix"):
        interpolative(torch.ones(8), 1)
    with pytest.raises(ValueError, match="M: expected finite entries"):
        cur(torch.full((3, 3), float("inf")), 1)
    M = torch.randn(6, 5)
    d = interpolative(M, 2)
    with pytest.raises(ValueError, match=r"decomposition.Z: expected shape \(2, 4\)"):
        id_reconstruct(M[:, :4], d)
    with pytest.raises(ValueError, match=r"decomposition.idx: expected column indices"):
        id_reconstruct(M, d._replace(idx=torch.tensor([0, 7])))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 10),
    n=st.integers(1, 10),
    seed=st.integers(0, 2**16),
    randomized=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_full_rank_id_and_cur_are_exact_on_any_shape(
    m: int, n: int, seed: int, randomized: bool, dtype: type
) -> None:
    M = np.random.default_rng(seed).standard_normal((m, n)).astype(dtype)
    M.setflags(write=False)  # read-only input is fine: nothing writes to it
    k = min(m, n)
    tol = 1e-3 if dtype == np.float32 else 1e-9
    d = interpolative(M, k, randomized=randomized, generator=seed)
    assert d.idx.shape == (k,) and d.Z.shape == (k, n) and d.Z.dtype == dtype
    assert len(set(d.idx.tolist())) == k
    assert relative_error(M, id_reconstruct(M, d)) < tol
    c = cur(M, k, randomized=randomized, generator=seed)
    assert relative_error(M, c.C @ c.U @ c.R) < tol


def test_interpolative_and_cur_take_a_weight_that_requires_grad() -> None:
    layer = torch.nn.Linear(12, 9)  # its weight requires grad, as every trainable weight
    for randomized in (False, True):
        d = rl.interpolative(layer.weight, 4, randomized=randomized, generator=0)
        ref = rl.interpolative(layer.weight.detach(), 4, randomized=randomized, generator=0)
        assert d.idx.tolist() == ref.idx.tolist()
        assert rl.interpolative(layer.weight, eps=0.5).idx.numel() >= 1
    assert rl.cur(layer.weight, 3).cols.numel() == 3


@pytest.mark.parametrize(
    "idx",
    [[2.9, 4.9], [True, False, True], [[0], [1]], np.array([0.0, 1.0])],
    ids=["floats", "mask", "2-D", "numpy-floats"],
)
def test_id_with_non_integer_indices_is_refused(idx: object) -> None:
    # floats were truncated and a boolean mask read as indices 1, 0, 1: a wrong reconstruction
    M = np.eye(5)
    k = np.asarray(idx).reshape(-1).shape[0]
    bad = rl.ID(idx, np.ones((k, 5)))
    for routine in (id_reconstruct, id_to_svd):
        with pytest.raises(ValueError, match="decomposition.idx: expected a 1-D array of integer"):
            routine(M, bad)
