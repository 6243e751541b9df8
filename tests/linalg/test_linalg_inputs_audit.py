"""Inputs the routines took without a word: an unused generator, a truthy non-bool
``randomized``, an ascending spectrum (a wrong rank), and parameters (a torch warning)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from rankwise.errors import GeneratorError
from rankwise.linalg import (
    cr_approx,
    cur,
    energy,
    interpolative,
    lstsq_factor,
    monarch_project,
    pinv,
    randomized_svd,
    rank_for_energy,
    truncated_svd,
)

M = torch.randn(20, 15, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize(
    "call",
    [
        lambda g: interpolative(M, rank=3, randomized=False, generator=g),
        lambda g: cur(M, 3, randomized=False, generator=g),
        lambda g: cr_approx(M, M.T, 3, method="top", generator=g),
    ],
)
def test_a_bad_generator_is_refused_even_where_it_is_not_used(call) -> None:
    for bad in ("oops", 3.7, [1]):
        with pytest.raises(GeneratorError, match="generator: expected"):
            call(bad)
    call(0)  # a good one is fine


def test_randomized_must_be_a_bool() -> None:
    for call in (
        lambda: interpolative(M, rank=3, randomized="no"),
        lambda: cur(M, 3, randomized=1),
    ):
        with pytest.raises(TypeError, match="randomized: expected True or False"):
            call()


def test_an_ascending_spectrum_is_refused() -> None:
    # [1, 2, 3] (eigvalsh's order) gave rank 3 for half the energy; sorted, it is rank 1
    with pytest.raises(ValueError, match=r"S: expected singular values in descending order"):
        rank_for_energy(torch.tensor([1.0, 2.0, 3.0]), 0.5)
    with pytest.raises(ValueError, match="descending"):
        energy(torch.tensor([1.0, 2.0, 3.0]))
    assert rank_for_energy(torch.tensor([3.0, 2.0, 1.0]), 0.5) == 1
    assert rank_for_energy(torch.tensor([2.0, 2.0 * (1 + 1e-15), 1.0]), 0.99) == 3  # ties


def test_parameters_are_taken_without_a_torch_warning() -> None:
    W = torch.nn.Parameter(torch.randn(24, 16, generator=torch.Generator().manual_seed(1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Converting a tensor with requires_grad=True ..."
        randomized_svd(W, 3, generator=0)
        truncated_svd(W, 3)
        pinv(W)
        lstsq_factor(W, left=torch.randn(24, 2))
        cr_approx(W, W.T, 4, generator=0)
        interpolative(W, rank=3, randomized=True, generator=0)
        interpolative(W, eps=1e-3)
        cur(W, 3)
        monarch_project(W, 4)


def test_float32_deterministic_id_keeps_what_float32_resolves() -> None:
    # the float32 pivoted QR's R11 failed its rank test at k·eps(float32) and the coefficients
    # came from a truncated pinv: 17.5 σ_61 where float64 (and scipy) reach 2.5 σ_61
    from rankwise.linalg import interpolative

    rng = np.random.default_rng(11)
    s = 0.8 ** np.arange(1, 301)
    U, _ = np.linalg.qr(rng.standard_normal((400, 300)))
    V, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    A = (U * s) @ V.T
    A32 = A.astype(np.float32)
    k = 60
    decomposition = interpolative(A32, k)
    approx = A32[:, decomposition.idx].astype(np.float64) @ decomposition.Z.astype(np.float64)
    assert np.linalg.norm(A - approx, 2) < 3.5 * s[k]


def test_monarch_takes_flipped_numpy_views() -> None:
    # torch.as_tensor refused negative strides ("At least one stride ... is negative")
    from rankwise.linalg import monarch_project

    rng = np.random.default_rng(0)
    M = monarch_project(rng.standard_normal((16, 16)), 4)
    x = rng.standard_normal((16, 3))
    dense = M.to_dense()
    for view in (x[::-1], x[:, ::-1], np.flip(x, 0)[:, 0]):
        np.testing.assert_allclose(M.matmul(view), dense @ view, rtol=1e-12, atol=1e-12)
    flipped = type(M)(np.flip(M.L, 1), M.R)
    np.testing.assert_allclose(
        flipped.to_dense(), type(M)(np.ascontiguousarray(np.flip(M.L, 1)), M.R).to_dense()
    )


def test_negative_seeds_are_refused() -> None:
    # torch wraps them modulo 2**64: -1 gave the draws of 2**64 - 1
    from rankwise.errors import GeneratorError
    from rankwise.linalg import randomized_svd

    A = np.random.default_rng(0).standard_normal((20, 10))
    with pytest.raises(GeneratorError, match=r"generator: expected a seed in \[0, "):
        randomized_svd(A, 3, generator=-1)
    randomized_svd(A, 3, generator=2**64 - 1)


def test_energy_one_is_the_numerical_rank_of_pinv_and_matrix_rank() -> None:
    # truncated_svd(energy=1.0) cut at len(S)·eps·σ_1 (4 values of a 300 × 4 matrix), not
    # max(m, n)·eps·σ_1 as numpy.linalg.matrix_rank and rankwise's pinv
    from rankwise.linalg import truncated_svd

    rng = np.random.default_rng(2)
    eps = np.finfo(float).eps
    U, _ = np.linalg.qr(rng.standard_normal((300, 4)))
    V, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    A = (U * [1.0, 0.5, 600 * eps, 150 * eps]) @ V.T
    assert truncated_svd(A, energy=1.0).S.shape[0] == np.linalg.matrix_rank(A) == 3
