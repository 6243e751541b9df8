"""Adapter algebra: resize, combine, extract against dense SVD and exact identities."""

from __future__ import annotations

import pytest
import torch

from rankwise.analysis import (
    Factors,
    combine,
    dare_merge,
    extract,
    factored_svd,
    resize,
    ties_merge,
)
from rankwise.errors import ShapeMismatchError
from rankwise.linalg import truncated_svd


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _factors(out: int, r: int, inp: int, seed: int) -> Factors:
    g = _gen(seed)
    B = torch.randn(out, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, inp, generator=g, dtype=torch.float64)
    return Factors(B, A)


def _best(M: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


@pytest.mark.parametrize(("out", "r", "inp"), [(60, 8, 40), (5, 8, 40), (60, 8, 3), (30, 30, 30)])
def test_factored_svd_equals_the_dense_svd(out: int, r: int, inp: int) -> None:
    B, A = _factors(out, r, inp, seed=0)
    svd = factored_svd(B, A)
    dense = torch.linalg.svdvals(B @ A)
    k = min(out, r, inp)
    torch.testing.assert_close(svd.S, dense[:k])
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.Vh, B @ A)
    torch.testing.assert_close(svd.U.mT @ svd.U, torch.eye(k, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_resize_equals_truncated_svd_of_the_product(k: int) -> None:
    B, A = _factors(50, 8, 70, seed=1)
    out = resize(B, A, k)
    assert out.B.shape == (50, k) and out.A.shape == (k, 70)
    ref = truncated_svd(B @ A, k)
    expected = ref.U @ torch.diag(ref.S) @ ref.Vh
    assert float((out.B @ out.A - expected).abs().max()) < 1e-6
    # Balanced split: ||B'||_F == ||A'||_F.
    assert float(torch.linalg.norm(out.B)) == pytest.approx(float(torch.linalg.norm(out.A)))


def test_resize_by_energy_and_inputs_untouched() -> None:
    S = torch.tensor([10.0, 1.0, 0.1, 0.01], dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(20, 4, generator=_gen(2), dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(15, 4, generator=_gen(3), dtype=torch.float64))
    B, A = U * S, V.mT.clone()
    B0, A0 = B.clone(), A.clone()
    out = resize(B, A, energy=0.999)  # 100 / 101.0101 < 0.999 <= 101 / 101.0101
    assert out.B.shape[1] == 2
    assert torch.equal(B, B0) and torch.equal(A, A0)
    with pytest.raises(ValueError, match="rank"):
        resize(B, A, 5)  # resizing never grows an adapter
    with pytest.raises(ValueError, match="exactly one"):
        resize(B, A, 2, energy=0.9)
    with pytest.raises(ShapeMismatchError, match="same r"):
        resize(B, A[:3], 2)


def test_resize_keeps_the_input_dtype() -> None:
    B, A = _factors(20, 6, 10, seed=4)
    out = resize(B.float(), A.float(), 2)
    assert out.B.dtype == torch.float32 and out.A.dtype == torch.float32


def test_linear_combine_is_exact() -> None:
    pairs = [_factors(30, 4, 20, seed=5), _factors(30, 8, 20, seed=6), _factors(30, 2, 20, seed=7)]
    weights = [0.5, -1.25, 2.0]
    out = combine(pairs, weights)
    expected = sum(w * (B @ A) for w, (B, A) in zip(weights, pairs))
    assert out.B.shape == (30, 14)
    torch.testing.assert_close(out.B @ out.A, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="linear"):
        combine(pairs, weights, rank=4)


def test_svd_combine_is_the_best_approximation_of_the_sum() -> None:
    pairs = [_factors(30, 4, 20, seed=8), _factors(30, 6, 20, seed=9)]
    out = combine(pairs, [1.0, 0.3], method="svd", rank=5)
    dense = pairs[0].B @ pairs[0].A + 0.3 * pairs[1].B @ pairs[1].A
    torch.testing.assert_close(out.B @ out.A, _best(dense, 5))
    assert combine(pairs, method="svd").B.shape[1] == 6  # default: max r_i (PEFT's rule)


def test_ties_merge_follows_the_paper() -> None:
    d1 = torch.tensor([[3.0, -1.0, 0.2], [0.0, 2.0, -4.0]])
    d2 = torch.tensor([[1.0, 5.0, -0.1], [-1.0, -3.0, 2.0]])
    merged = ties_merge([d1, d2], [1.0, 1.0], density=0.5)
    # trim to top-3 magnitudes: d1 -> [[3,0,0],[0,2,-4]], d2 -> [[0,5,0],[0,-3,2]]
    # elect sign of the sum: [[+,+,0],[0,-,-]]; disjoint mean of agreeing entries
    expected = torch.tensor([[3.0, 5.0, 0.0], [0.0, -3.0, -4.0]])
    torch.testing.assert_close(merged, expected)
    # one task at density 1 is the task itself
    torch.testing.assert_close(ties_merge([d1], [2.0], density=1.0), 2 * d1)


def test_dare_is_unbiased_and_reproducible() -> None:
    delta = torch.randn(40, 40, generator=_gen(10), dtype=torch.float64)
    first = dare_merge([delta], [1.0], density=0.3, generator=11)
    torch.testing.assert_close(first, dare_merge([delta], [1.0], density=0.3, generator=11))
    kept = first != 0
    assert 0.2 < float(kept.double().mean()) < 0.4
    torch.testing.assert_close(first[kept], delta[kept] / 0.3)
    mean = sum(dare_merge([delta], [1.0], density=0.5, generator=s) for s in range(200)) / 200
    assert float(torch.linalg.norm(mean - delta) / torch.linalg.norm(delta)) < 0.12


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_combine_truncate_the_dense_merge(method: str) -> None:
    pairs = [_factors(20, 3, 16, seed=12), _factors(20, 3, 16, seed=13)]
    out = combine(pairs, [1.0, 0.5], method=method, rank=4, density=0.6, generator=14)
    deltas = [B @ A for B, A in pairs]
    if method == "ties":
        merged = ties_merge(deltas, [1.0, 0.5], density=0.6)
    else:
        merged = dare_merge(deltas, [1.0, 0.5], density=0.6, generator=14)
    assert out.B.shape == (20, 4)
    torch.testing.assert_close(out.B @ out.A, _best(merged, 4))


def test_combine_checks_its_inputs() -> None:
    a, b = _factors(20, 3, 16, seed=15), _factors(21, 3, 16, seed=16)
    with pytest.raises(ValueError, match="same shape"):
        combine([a, b])
    with pytest.raises(ValueError, match="weights"):
        combine([a, a], [1.0])
    with pytest.raises(ValueError, match="method"):
        combine([a], method="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="density"):
        combine([a, a], method="ties", density=0.0)


@pytest.mark.parametrize("randomized", [False, True])
def test_extract_recovers_an_exact_low_rank_update(randomized: bool) -> None:
    g = _gen(17)
    W = torch.randn(64, 48, generator=g, dtype=torch.float64)
    B, A = _factors(64, 5, 48, seed=18)
    W_ft = W + B @ A
    out = extract(W, W_ft, 5, randomized=randomized, generator=19)
    torch.testing.assert_close(out.B @ out.A, B @ A, rtol=0, atol=1e-10)
    assert torch.equal(W_ft, W + B @ A)  # inputs untouched


def test_extract_by_energy_finds_the_rank_and_is_optimal() -> None:
    g = _gen(20)
    W = torch.randn(32, 32, generator=g, dtype=torch.float64)
    B, A = _factors(32, 3, 32, seed=21)
    noise = 1e-6 * torch.randn(32, 32, generator=g, dtype=torch.float64)
    out = extract(W, W + B @ A + noise, energy=0.999999)
    assert out.B.shape[1] == 3
    torch.testing.assert_close(out.B @ out.A, _best(B @ A + noise, 3))
    with pytest.raises(ValueError, match="randomized"):
        extract(W, W, energy=0.9, randomized=True)
    with pytest.raises(ValueError, match="same shape"):
        extract(W, W[:3])
