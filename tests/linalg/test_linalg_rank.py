"""energy, rank_for_energy, stable_rank, effective_rank, relative_error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from linalg_spectra import with_spectrum

import rankwise.linalg as rl
from rankwise.errors import ShapeMismatchError
from rankwise.linalg import (
    effective_rank,
    energy,
    rank_for_energy,
    relative_error,
    stable_rank,
    truncated_svd,
)


def test_energy_and_rank_for_energy_on_a_constructed_spectrum() -> None:
    S = np.sqrt(np.array([0.5, 0.3, 0.15, 0.05]))
    e = energy(S)
    assert isinstance(e, np.ndarray)
    np.testing.assert_allclose(e, [0.5, 0.8, 0.95, 1.0], rtol=1e-15)
    assert [rank_for_energy(S, f) for f in (0.5, 0.50001, 0.8, 0.95, 1.0)] == [1, 2, 2, 3, 4]
    torch.testing.assert_close(energy(torch.zeros(3)), torch.ones(3, dtype=torch.float64))


def test_energy_gives_the_eckart_young_frobenius_error() -> None:
    M = torch.randn(30, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    S = torch.linalg.svdvals(M)
    for r in (1, 5, 19):
        svd = truncated_svd(M, r)
        error = relative_error(M, (svd.U * svd.S) @ svd.Vh)
        assert error**2 == pytest.approx(1 - float(energy(S)[r - 1]), rel=1e-10)


def test_stable_and_effective_rank() -> None:
    flat = with_spectrum(40, 30, torch.ones(7, dtype=torch.float64), seed=1)
    assert stable_rank(flat) == pytest.approx(7.0, rel=1e-12)
    assert effective_rank(flat) == pytest.approx(7.0, rel=1e-12)
    skewed = with_spectrum(40, 30, torch.tensor([1.0, 0.1, 0.1]), seed=2)
    assert 1.0 < stable_rank(skewed) < effective_rank(skewed) < 3.0
    assert stable_rank(torch.zeros(3, 3)) == 0.0 and effective_rank(torch.zeros(3, 3)) == 0.0


def test_relative_error_norms() -> None:
    M = torch.diag(torch.tensor([3.0, 4.0]))
    approx = torch.diag(torch.tensor([3.0, 0.0]))
    assert relative_error(M, approx) == pytest.approx(4.0 / 5.0)
    assert relative_error(M, approx, norm="spectral") == pytest.approx(1.0)
    assert relative_error(torch.zeros(2, 2), torch.zeros(2, 2)) == 0.0
    assert math.isinf(relative_error(torch.zeros(2, 2), torch.ones(2, 2)))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: rank_for_energy(np.ones(3), 0.0), r"fraction: expected a value in \(0, 1\]"),
        (lambda: rank_for_energy(np.ones(3), 1.01), "fraction"),
        (lambda: energy(np.ones((2, 2))), "S: expected a non-empty 1-D vector"),
        (lambda: energy(np.array([1.0, -1.0])), "S: expected finite non-negative"),
        (lambda: stable_rank(torch.ones(3)), "M: expected a 2-D matrix"),
        (lambda: relative_error(torch.ones(2, 2), torch.ones(2, 3)), r"approx: expected shape"),
        (lambda: relative_error(torch.ones(2, 2), torch.ones(2, 2), norm="nuc"), "norm"),
    ],
)
def test_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_spectrum_checks_name_what_they_found() -> None:
    with pytest.raises(ValueError, match=r"found 1 others \(first: S\[1\] = nan\)"):
        rl.energy(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="expected real singular values, found dtype"):
        rl.energy(torch.tensor([3 + 4j, 1 + 0j]))  # the imaginary part was dropped


def test_numpy_integers_and_long_doubles() -> None:
    A = np.random.default_rng(0).standard_normal((8, 8))
    assert rl.randomized_svd(A, 2, power_iters=np.int64(2), generator=0).S.shape == (2,)
    assert rl.monarch_project(A, np.int64(2)).to_dense().shape == (8, 8)
    with pytest.raises(ValueError, match="A: expected a real numeric array, found dtype float128"):
        rl.pinv(A.astype(np.longdouble))
    with pytest.raises(ShapeMismatchError, match=r"x: expected shape \(8,\)"):
        rl.monarch_project(torch.randn(8, 8), 2).matmul(torch.tensor(1.0))


def test_energy_ends_at_exactly_one() -> None:
    # over squares.sum() the last entry was 1 ± 6e-15 (above 1 in 84 of 200 random spectra),
    # so sqrt(1 - e), the relative error of keeping every triplet, came back NaN
    rng = np.random.default_rng(0)
    for n in rng.integers(2, 3000, size=40):
        S = np.sort(rng.random(n) * 10.0 ** rng.uniform(-3, 3, n))[::-1].copy()
        e = energy(S)
        assert e[-1] == 1.0 and np.sqrt(1.0 - e[-1]) == 0.0
        assert np.all(np.diff(e) >= 0) and np.all(e <= 1.0)


@pytest.mark.parametrize("values", [np.array(["1", "2"]), np.array([1.0, 0.5], dtype=object)])
def test_spectrum_of_a_non_numeric_array_names_s(values: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"S: expected a real numeric array, found dtype"):
        energy(values)
    with pytest.raises(ValueError, match=r"S: expected a real numeric array"):
        rank_for_energy(values, 0.9)


def test_effective_rank_stays_within_its_bounds() -> None:
    # exp(H(p)) of n equal values rounded to 5.000000000000001 for eye(5), above min(m, n)
    for n in range(1, 40):
        value = effective_rank(np.eye(n))
        assert 1.0 <= value <= n and value == pytest.approx(n, rel=1e-12)
    assert effective_rank(np.ones((1, 1))) == 1.0


def test_energy_one_keeps_the_numerical_rank() -> None:
    """fraction = 1 promises an error of 0: a last σ of 3e-8·σ_1 is kept in float64 (the
    rounding slack dropped it: error 1.7e-8), the rounding-level σ of a rank-4 matrix are
    not (rank 4, not 40), and eps follows S's dtype (1e-8 is rounding in float32)."""
    g = torch.Generator().manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(50, 4, dtype=torch.float64, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(40, 4, dtype=torch.float64, generator=g))
    M = Q1 @ torch.diag(torch.tensor([1.0, 1.0, 1.0, 3e-8], dtype=torch.float64)) @ Q2.T
    svd = truncated_svd(M, energy=1.0)
    assert svd.S.numel() == 4
    assert relative_error(M, (svd.U * svd.S) @ svd.Vh) < 1e-13
    S = np.concatenate([np.ones(1000), [6e-7]])
    assert rank_for_energy(S, 1.0) == 1001 and rank_for_energy(S, 0.999) == 999
    assert rank_for_energy(np.array([1, 1, 1e-8], dtype=np.float32), 1.0) == 2
    assert rank_for_energy(torch.tensor([1.0, 1.0, 1e-8], dtype=torch.float64), 1.0) == 3
    assert rank_for_energy(np.array([3, 2, 0]), 1.0) == 2
    assert rank_for_energy(np.zeros(2), 1.0) == 1


@pytest.mark.parametrize("fn", [energy, lambda S: rank_for_energy(S, 0.5)])
def test_a_0d_numpy_spectrum_is_refused_as_0d(fn) -> None:
    """np.ascontiguousarray made a 0-D array 1-D: energy(np.array(3.0)) gave [1.]."""
    with pytest.raises(ValueError, match=r"S: expected a non-empty 1-D vector, found shape \(\)"):
        fn(np.array(3.0))


def test_a_0d_numpy_matrix_is_refused_as_0d() -> None:
    with pytest.raises(ValueError, match=r"A: expected a 2-D matrix, found 0-D with shape \(\)"):
        rl.pinv(np.array(3.0))
