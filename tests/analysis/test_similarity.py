"""Subspace similarity φ (LoRA paper Eq. 4): identities, symmetry, random-subspace expectation."""

from __future__ import annotations

import pytest
import torch

from rankwise.analysis import subspace_similarity
from rankwise.errors import ShapeMismatchError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("factor", ["A", "B"])
def test_self_similarity_is_all_ones(factor: str) -> None:
    X = torch.randn(8, 50, generator=_gen(0), dtype=torch.float64)
    X = X if factor == "A" else X.mT  # B factors are (out, r)
    phi = subspace_similarity(X, X, factor=factor)
    assert phi.shape == (8, 8)
    # U^i lies inside U^j for i <= j, so every entry (not only the diagonal) is 1.
    torch.testing.assert_close(phi, torch.ones(8, 8, dtype=torch.float64))


def test_symmetric_and_invariant_to_rotations_of_the_rank_space() -> None:
    A1 = torch.randn(4, 30, generator=_gen(1), dtype=torch.float64)
    A2 = torch.randn(6, 30, generator=_gen(2), dtype=torch.float64)
    phi = subspace_similarity(A1, A2)
    torch.testing.assert_close(subspace_similarity(A2, A1), phi.mT)
    # A -> Q A with Q orthogonal keeps A's right singular vectors (Q only rotates the r side).
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=_gen(3), dtype=torch.float64))
    torch.testing.assert_close(subspace_similarity(3.0 * Q @ A1, A2), phi)


def test_matches_the_definition_entry_by_entry() -> None:
    A1 = torch.randn(3, 12, generator=_gen(4), dtype=torch.float64)
    A2 = torch.randn(5, 12, generator=_gen(5), dtype=torch.float64)
    V1 = torch.linalg.svd(A1, full_matrices=False).Vh.mT
    V2 = torch.linalg.svd(A2, full_matrices=False).Vh.mT
    phi = subspace_similarity(A1, A2)
    for i in range(1, 4):
        for j in range(1, 6):
            direct = torch.linalg.norm(V1[:, :i].mT @ V2[:, :j]) ** 2 / min(i, j)
            assert abs(float(phi[i - 1, j - 1] - direct)) < 1e-12


def test_shared_direction_is_detected() -> None:
    # Both adapters share their dominant direction; the rest is independent noise.
    g = _gen(6)
    shared = torch.randn(1, 64, generator=g, dtype=torch.float64)
    A8 = torch.cat([10 * shared, torch.randn(7, 64, generator=g, dtype=torch.float64)])
    A64 = torch.cat([10 * shared, torch.randn(63, 64, generator=g, dtype=torch.float64)])
    phi = subspace_similarity(A8, A64)
    assert phi[0, 0] > 0.9
    assert phi[1:, 1].max() < 0.9


@pytest.mark.parametrize("factor", ["A", "B"])
def test_random_subspaces_match_the_expectation(factor: str) -> None:
    # E ||U1^{i T} U2^{j}||_F^2 = i j / d for independent uniformly random subspaces,
    # so E phi(i, j) = max(i, j) / d.
    d, r1, r2, trials = 40, 4, 6, 200
    g = _gen(7)
    total = torch.zeros(r1, r2, dtype=torch.float64)
    for _ in range(trials):
        X1 = torch.randn(r1, d, generator=g, dtype=torch.float64)
        X2 = torch.randn(r2, d, generator=g, dtype=torch.float64)
        if factor == "B":
            X1, X2 = X1.mT, X2.mT
        total += subspace_similarity(X1, X2, factor=factor)
    mean = total / trials
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    expected = torch.maximum(i, j) / d
    # Standard error of a mean of 200 draws is a few percent of these values.
    torch.testing.assert_close(mean, expected, rtol=0.12, atol=0.01)


def test_errors_name_the_culprit() -> None:
    with pytest.raises(ShapeMismatchError, match="in"):
        subspace_similarity(torch.randn(4, 10), torch.randn(4, 11))
    with pytest.raises(ValueError, match="factor"):
        subspace_similarity(torch.randn(4, 10), torch.randn(4, 10), factor="C")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="all zeros"):
        subspace_similarity(torch.zeros(10, 4), torch.randn(10, 4), factor="B")
    with pytest.raises(ShapeMismatchError, match="matrix"):
        subspace_similarity(torch.randn(4), torch.randn(4, 10))


def test_non_finite_inputs_are_refused_by_their_own_names() -> None:
    """A NaN reached rankwise.linalg, whose error named its own argument "M" (not X1/X2, nor
    delta, W_finetuned, the factors, a PiSSA weight); one NaN in A counted as 4 (of B·A)."""
    from rankwise.analysis import extract, resize, spectrum
    from rankwise.lora.init_svd import pissa_init, top_singular_triplets

    g = torch.Generator().manual_seed(0)
    A1, A2 = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    A2[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"X2 \(factor A\): expected finite entries; found 1 NaN"):
        subspace_similarity(A1, A2)
    with pytest.raises(ValueError, match=r"X1 \(factor A\): expected finite"):
        subspace_similarity(A2, A1)
    with pytest.raises(ValueError, match=r"X2 \(factor B\) is all zeros"):
        subspace_similarity(A1.T, torch.zeros(16, 4), factor="B")
    D = torch.randn(8, 8, generator=g)
    D[0, 0] = float("inf")
    with pytest.raises(ValueError, match="delta: expected finite entries; found 1 NaN/Inf"):
        spectrum(D)
    with pytest.raises(ValueError, match="W_finetuned: expected finite"):
        extract(torch.randn(8, 8, generator=g), D, 2)
    B, A = torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g)
    A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="factors A: expected finite entries; found 1 NaN/Inf"):
        resize(B, A, 1)
    with pytest.raises(ValueError, match="pissa_init: weight must be finite, found 1 NaN"):
        pissa_init(D, r=2, scaling=1.0)
    with pytest.raises(ValueError, match=r"top_singular_triplets: r must be an int in \[1, .*8\]"):
        top_singular_triplets(torch.randn(16, 8, generator=g), 9)
