"""Inputs the routines took without a word: an unused generator, a truthy non-bool
``randomized``, an ascending spectrum (a wrong rank), and parameters (a torch warning)."""

from __future__ import annotations

import warnings

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
