"""cr_approx and cr_expected_error: unbiased optimal sampling, Monte-Carlo error, 'top'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankwise.linalg import cr_approx, cr_expected_error


def _factors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    # Products of very different sizes, so the optimal p_i is far from uniform.
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, 40, dtype=torch.float64)
    X = torch.randn(30, 40, generator=gen, dtype=torch.float64) * scale
    Y = torch.randn(40, 20, generator=gen, dtype=torch.float64)
    return X, Y


def test_sampled_cr_matches_the_expected_error_and_is_unbiased() -> None:
    X, Y = _factors()
    rank, trials = 10, 4000
    gen = torch.Generator().manual_seed(1)
    product = X @ Y
    errors = torch.empty(trials, dtype=torch.float64)
    mean = torch.zeros_like(product)
    for t in range(trials):
        C, R, idx = cr_approx(X, Y, rank, generator=gen)
        assert C.shape == (30, rank) and R.shape == (rank, 20) and idx.shape == (rank,)
        approx = C @ R
        errors[t] = (product - approx).square().sum()
        mean += approx / trials
    expected = cr_expected_error(X, Y, rank)
    assert float(errors.mean()) == pytest.approx(expected, rel=0.05)
    # Unbiased: the Monte-Carlo mean approaches XY (standard error ~ sqrt(E/trials)).
    bias = float((mean - product).square().sum().sqrt())
    assert bias < 4 * (expected / trials) ** 0.5


def test_expected_error_closed_form_and_uniform_sampling_is_worse() -> None:
    X, Y = _factors(2)
    norms = X.norm(dim=0) * Y.norm(dim=1)
    closed = (float(norms.sum()) ** 2 - float((X @ Y).square().sum())) / 5
    assert cr_expected_error(X, Y, 5) == pytest.approx(closed, rel=1e-12)
    # Uniform sampling's expected error: (1/c)[n Σ‖x_i‖²‖y_i‖² − ‖XY‖²] >= the optimum.
    uniform = (40 * float(norms.square().sum()) - float((X @ Y).square().sum())) / 5
    assert uniform > cr_expected_error(X, Y, 5)


def test_top_is_exact_at_full_inner_dimension_and_keeps_the_largest() -> None:
    X, Y = _factors(3)
    C, R, idx = cr_approx(X, Y, 40, method="top")
    torch.testing.assert_close(C @ R, X @ Y, atol=1e-12, rtol=0)
    _, _, top5 = cr_approx(X, Y, 5, method="top")
    norms = X.norm(dim=0) * Y.norm(dim=1)
    assert set(top5.tolist()) == set(norms.topk(5).indices.tolist())


def test_sampling_is_reproducible_and_numpy_round_trips() -> None:
    X, Y = _factors(4)
    a = cr_approx(X.numpy(), Y.numpy(), 6, generator=11)
    b = cr_approx(X.numpy(), Y.numpy(), 6, generator=11)
    c = cr_approx(X.numpy(), Y.numpy(), 6, generator=12)
    assert all(isinstance(f, np.ndarray) for f in a)
    np.testing.assert_array_equal(a.C, b.C)
    assert not np.array_equal(a.idx, c.idx)


def test_zero_product_is_handled() -> None:
    C, R, _ = cr_approx(torch.zeros(3, 4), torch.zeros(4, 2), 2, generator=0)
    assert torch.equal(C @ R, torch.zeros(3, 2))
    assert cr_expected_error(torch.zeros(3, 4), torch.zeros(4, 2), 2) == 0.0


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.ones(3, 4), torch.ones(4, 2), 0), {}, "rank"),
        ((torch.ones(3, 4), torch.ones(4, 2), 5), {}, "rank"),
        ((torch.ones(3, 4), torch.ones(5, 2), 2), {}, r"Y: expected 4 rows"),
        ((torch.ones(3, 4), torch.ones(4, 2), 2), {"method": "best"}, "method"),
        ((torch.ones(3, 4, 1), torch.ones(4, 2), 2), {}, "X: expected a 2-D"),
    ],
)
def test_cr_bad_input(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cr_approx(*args, **kwargs)


def test_expected_error_on_inputs_that_require_grad_gives_no_warning() -> None:
    import warnings

    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 5, generator=g, requires_grad=True)
    Y = torch.randn(5, 4, generator=g, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Converting a tensor with requires_grad=True ..."
        value = cr_expected_error(X, Y, 2)
    assert value == pytest.approx(cr_expected_error(X.detach(), Y.detach(), 2))
