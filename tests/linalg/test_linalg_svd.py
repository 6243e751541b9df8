"""truncated_svd and randomized_svd: Eckart–Young optimality, error bounds, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from linalg_spectra import flat_tail, geometric, hilbert, with_spectrum

from rankwise.linalg import SVD, randomized_svd, truncated_svd

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _spectral(E: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(E.to(torch.float64), ord=2))


def _reconstruct(svd: SVD) -> torch.Tensor:
    return (svd.U * svd.S) @ svd.Vh


def _assert_orthonormal(svd: SVD, atol: float) -> None:
    r = svd.S.numel()
    eye = torch.eye(r, dtype=svd.U.dtype, device=svd.U.device)
    torch.testing.assert_close(svd.U.mT @ svd.U, eye, atol=atol, rtol=0)
    torch.testing.assert_close(svd.Vh @ svd.Vh.mT, eye, atol=atol, rtol=0)


@pytest.mark.parametrize("rank", [1, 3, 10, 39])
def test_truncated_svd_is_eckart_young_optimal(rank: int) -> None:
    M = with_spectrum(60, 40, geometric(40, 0.8), seed=rank) + 1e-3 * hilbert(60)[:, :40]
    sigma = torch.linalg.svdvals(M)
    svd = truncated_svd(M, rank)
    E = M - _reconstruct(svd)
    frob_opt = float(sigma[rank:].square().sum().sqrt())
    assert float(torch.linalg.matrix_norm(E)) == pytest.approx(frob_opt, rel=1e-10, abs=1e-14)
    if rank < 40:
        assert _spectral(E) == pytest.approx(float(sigma[rank]), rel=1e-10)
    torch.testing.assert_close(svd.S, sigma[:rank], rtol=1e-12, atol=0)
    _assert_orthonormal(svd, 1e-12)


def test_truncated_svd_rank_by_energy_and_tol_is_exact() -> None:
    # σ² = 0.5, 0.3, 0.15, 0.05: energy 0.8 is reached exactly at rank 2.
    sigma = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).sqrt()
    M = with_spectrum(30, 20, sigma, seed=1)
    assert truncated_svd(M, energy=0.8).S.numel() == 2
    assert truncated_svd(M, energy=0.8000001).S.numel() == 3
    assert truncated_svd(M, energy=0.5).S.numel() == 1
    assert truncated_svd(M, energy=1.0).S.numel() == 4
    # σ = 1, 0.5, 0.1, 0.01: tol 0.1 keeps σ_i > 0.1 σ_1, so the spectral error is <= tol.
    M = with_spectrum(30, 20, torch.tensor([1.0, 0.5, 0.1, 0.01], dtype=torch.float64), seed=2)
    assert truncated_svd(M, tol=0.1 + 1e-9).S.numel() == 2
    assert truncated_svd(M, tol=0.09).S.numel() == 3
    assert truncated_svd(M).S.numel() == 20  # no option: the full thin SVD


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_in_numpy_out_and_dtype_kept(dtype: type) -> None:
    M = np.asarray(with_spectrum(20, 12, geometric(12, 0.7)), dtype=dtype)
    before = M.copy()
    for svd in (truncated_svd(M, 4), randomized_svd(M, 4, generator=0)):
        assert all(isinstance(f, np.ndarray) and f.dtype == dtype for f in svd)
        assert svd.U.shape == (20, 4) and svd.S.shape == (4,) and svd.Vh.shape == (4, 12)
    np.testing.assert_array_equal(M, before)


def _dct_columns(m: int, n: int) -> torch.Tensor:
    # The first n columns of the orthonormal DCT-II matrix: exact orthonormal columns, O(mn).
    i = torch.arange(m, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    U = torch.cos(torch.pi * (2 * i + 1) * j / (2 * m)) * (2.0 / m) ** 0.5
    U[:, 0] /= 2**0.5
    return U


def test_randomized_svd_flat_tail_within_5_percent_with_defaults() -> None:
    k = 64
    sigma = flat_tail(1500, k)  # σ = 1 for k, then 0.1
    # M = U diag(σ) Vᵀ with V = I: M Ω = U diag(σ) Ω for a Gaussian Ω, so the error's
    # distribution does not depend on the singular vectors; fixed ones keep the test fast.
    M = _dct_columns(2000, 1500) * sigma
    svd = randomized_svd(M, k, generator=0)
    assert svd.S.numel() == k
    E = M - _reconstruct(svd)
    spectral = float(torch.linalg.eigvalsh(E.T @ E)[-1].sqrt())  # ‖E‖₂
    assert spectral / float(sigma[k]) <= 1.05, spectral
    _assert_orthonormal(svd, 1e-10)
    # Without power iterations the same sketch is far off: "auto" is doing real work
    # (max column norm of E is a lower bound on ‖E‖₂).
    plain = randomized_svd(M, k, power_iters=0, generator=0)
    assert float((M - _reconstruct(plain)).norm(dim=0).max()) / float(sigma[k]) > 5.0


@pytest.mark.parametrize("shape", [(600, 400), (400, 600)])
def test_randomized_svd_geometric_decay_within_1_percent(shape: tuple[int, int]) -> None:
    k = 20
    sigma = geometric(min(shape), 0.9)
    M = with_spectrum(*shape, sigma, seed=4)
    svd = randomized_svd(M, k, generator=1)
    assert svd.U.shape == (shape[0], k) and svd.Vh.shape == (k, shape[1])
    assert _spectral(M - _reconstruct(svd)) / float(sigma[k]) <= 1.01


def test_randomized_svd_recovers_an_exactly_low_rank_matrix() -> None:
    M = with_spectrum(200, 150, geometric(8, 0.5), seed=5)
    svd = randomized_svd(M, 8, oversample=4, power_iters=0, generator=2)
    torch.testing.assert_close(_reconstruct(svd), M, atol=1e-12, rtol=0)
    torch.testing.assert_close(svd.S, geometric(8, 0.5), atol=1e-12, rtol=0)


def test_randomized_svd_is_reproducible_and_depends_on_the_generator() -> None:
    M = torch.randn(80, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = randomized_svd(M, 5, power_iters=1, generator=7)
    b = randomized_svd(M, 5, power_iters=1, generator=torch.Generator().manual_seed(7))
    c = randomized_svd(M, 5, power_iters=1, generator=8)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert not torch.equal(a.S, c.S)
    torch.manual_seed(3)
    d = randomized_svd(M, 5, power_iters=1)
    torch.manual_seed(3)
    torch.testing.assert_close(randomized_svd(M, 5, power_iters=1).S, d.S, atol=0, rtol=0)


def test_randomized_svd_matches_truncated_when_the_sketch_is_full() -> None:
    M = with_spectrum(50, 30, geometric(30, 0.7), seed=6)
    exact = truncated_svd(M, 10)
    sketch = randomized_svd(M, 10, oversample=100, generator=0)  # l capped at min(m, n)
    torch.testing.assert_close(sketch.S, exact.S, atol=1e-12, rtol=0)
    torch.testing.assert_close(_reconstruct(sketch), _reconstruct(exact), atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_svds_on_any_shape_rank_and_dtype(
    device: str, m: int, n: int, data: st.DataObject, dtype: torch.dtype
) -> None:
    rank = data.draw(st.integers(1, min(m, n)), label="rank")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    M = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)
    reference = np.linalg.svd(M.cpu().double().numpy(), compute_uv=False)
    optimum = float(np.sqrt((reference[rank:] ** 2).sum()))
    tol = (1e-5 if dtype == torch.float32 else 1e-12) * max(1.0, float(reference[0])) * (m + n)
    # With m, n <= 12 the default oversampling makes the sketch span all of M's range, so the
    # randomized SVD must be optimal too (and exact at rank = min(m, n)).
    for svd in (truncated_svd(M, rank), randomized_svd(M, rank, generator=seed)):
        assert svd.U.dtype == dtype and svd.U.device == M.device
        assert svd.U.shape == (m, rank) and svd.S.shape == (rank,) and svd.Vh.shape == (rank, n)
        error = float(torch.linalg.matrix_norm((M - _reconstruct(svd)).double()))
        assert error == pytest.approx(optimum, abs=tol)
        assert bool((svd.S[:-1] >= svd.S[1:]).all())


BAD = [
    ({"rank": 0}, "rank"),
    ({"rank": 31}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"energy": 0.0}, "energy"),
    ({"energy": 1.5}, "energy"),
    ({"tol": 1.0}, "tol"),
    ({"tol": -0.1}, "tol"),
    ({"rank": 2, "energy": 0.5}, "at most one"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD)
def test_truncated_svd_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        truncated_svd(torch.ones(40, 30), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 31}, "rank"),
        ({"rank": 3, "oversample": -1}, "oversample"),
        ({"rank": 3, "power_iters": -1}, "power_iters"),
        ({"rank": 3, "power_iters": "many"}, "power_iters"),
        ({"rank": 3, "generator": "seed"}, "generator"),
    ],
)
def test_randomized_svd_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        randomized_svd(torch.ones(40, 30), **kwargs)


@pytest.mark.parametrize("fn", [truncated_svd, randomized_svd])
def test_bad_matrices_name_the_argument(fn) -> None:
    with pytest.raises(ValueError, match=r"M: expected a 2-D matrix, found 3-D"):
        fn(torch.ones(2, 3, 4), 1)
    for bad in (float("nan"), float("inf")):
        M = torch.ones(5, 4)
        M[1, 2] = bad
        with pytest.raises(ValueError, match=r"M: expected finite entries, found 1 NaN/Inf"):
            fn(M, 1)


@pytest.mark.parametrize("fn", [truncated_svd, randomized_svd])
def test_meta_tensors_are_refused(fn) -> None:
    with pytest.raises(ValueError, match="M: expected a tensor with data, found one on the meta"):
        fn(torch.empty(4, 4, device="meta"), 1)


def test_inputs_are_not_modified() -> None:
    M = torch.randn(30, 20, dtype=torch.float64)
    before = M.clone()
    truncated_svd(M, 5)
    randomized_svd(M, 5, generator=0)
    assert torch.equal(M, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_range_finder_lu_basis_spans_the_block(dtype: torch.dtype) -> None:
    # The power iteration's right-hand block W only has to span range(Z), well conditioned.
    from rankwise.linalg.svd import _lu_basis_t

    gen = torch.Generator().manual_seed(0)
    full = torch.randn(300, 12, generator=gen, dtype=dtype)
    deficient = full[:, :4] @ torch.randn(4, 12, generator=gen, dtype=dtype)  # rank 4
    for Z in (full, deficient):
        W = _lu_basis_t(Z.mT).mT
        assert W.shape == Z.shape and W.dtype == dtype
        assert float(W.abs().max()) == 1.0  # entries of L are bounded by 1, its diagonal is 1
        assert float(torch.linalg.cond(W.double())) < 100  # full column rank, even for rank 4
        Q, _ = torch.linalg.qr(W.double())
        residual = Z.double() - Q @ (Q.mT @ Z.double())  # Z ⊆ span(W)
        tol = 1e-5 if dtype == torch.float32 else 1e-13
        assert float(residual.norm() / Z.double().norm()) < tol


def test_range_finder_ritz_values_from_the_gram_match_svdvals() -> None:
    from rankwise.linalg.svd import _singular_values_by_gram

    sigma = geometric(20, 0.5)  # σ₁ = 1 down to 2e-6
    for dtype in (torch.float64, torch.float32):
        Z_t = with_spectrum(20, 500, sigma, seed=7, dtype=dtype)
        ritz = _singular_values_by_gram(Z_t)
        assert ritz.dtype == dtype and bool((ritz[:-1] >= ritz[1:]).all())
        exact = torch.linalg.svdvals(Z_t.double())  # of the same (rounded) data
        # Gram in float64: absolute error ~ε₆₄ σ₁² / σ_j, ~1e-10 at the bottom here.
        assert float((ritz.double() - exact).abs().max()) < (
            1e-9 if dtype == torch.float64 else 1e-6
        )
        assert float(((ritz.double() - exact).abs() / exact)[:10].max()) < 1e-6


@pytest.mark.parametrize("power_iters", [2, "auto"])
def test_randomized_svd_of_exactly_rank_deficient_matrices(power_iters: int | str) -> None:
    # Exact zero pivots in the range finder's LU basis (a zero matrix, an exact rank-1 outer
    # product) once raised inside torch.linalg.lu_factor; the result must stay finite and exact.
    rank_one = torch.outer(
        torch.arange(30.0, dtype=torch.float64), torch.ones(20, dtype=torch.float64)
    )
    for M in (torch.zeros(30, 20, dtype=torch.float64), rank_one):
        svd = randomized_svd(M, 4, power_iters=power_iters, generator=0)
        assert svd.S.shape == (4,) and bool(
            torch.isfinite(svd.U).all() and torch.isfinite(svd.Vh).all()
        )
        torch.testing.assert_close(_reconstruct(svd), M, atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    ("dtype", "rank"),
    [(torch.float32, 16), (torch.float32, 32)],
)
def test_auto_power_iterations_stop_early_on_an_exactly_low_rank_matrix(
    dtype: torch.dtype, rank: int
) -> None:
    # σ_{k+1} is rounding noise: the 5%-of-σ_{k+1} rule alone never held and ran all 8
    # iterations (18 passes over M) for the accuracy one iteration already has
    from rankwise.linalg.svd import _range_and_projection

    g = torch.Generator().manual_seed(0)
    M = torch.randn(300, 16, generator=g, dtype=dtype) @ torch.randn(
        16, 200, generator=g, dtype=dtype
    )
    sketch = _range_and_projection(
        M, min(rank + 10, 200), rank, None, torch.Generator().manual_seed(1)
    )
    assert sketch.power_iters <= 2
    svd = randomized_svd(M, rank, generator=1)
    err = torch.linalg.matrix_norm(M - (svd.U * svd.S) @ svd.Vh, ord=2) / torch.linalg.matrix_norm(
        M, ord=2
    )
    assert float(err) < 100 * torch.finfo(dtype).eps


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_auto_power_iterations_keep_a_small_but_resolved_tail(p: float) -> None:
    # σ₁ = 1 and a slowly decaying tail σ_j = 1e-5·((k+1)/j)^p: a floor of max(m, n)·ε·σ₁
    # (1.8e-4 here) stopped after one pass, 1.087·σ_{k+1} where power_iters=8 reaches 1.000x
    g = torch.Generator().manual_seed(0)
    m, n, k = 1500, 200, 20
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    j = torch.arange(1, n + 1, dtype=torch.float64)
    S = 1e-5 * ((k + 1) / j) ** p
    S[0] = 1.0
    M = ((U * S) @ V.T).to(torch.float32)

    def error(svd: SVD) -> float:
        residual = M.double() - (svd.U.double() * svd.S.double()) @ svd.Vh.double()
        return float(torch.linalg.matrix_norm(residual, ord=2) / S[k])

    best = error(randomized_svd(M, k, power_iters=8, generator=0))
    assert error(randomized_svd(M, k, generator=0)) <= best * 1.01


def test_signs_agree_between_routines_on_tied_entries() -> None:
    """A Hadamard basis ties every |U| entry: argmax broke the tie by rounding noise and 14
    of 60 columns had the other sign than truncated_svd's (each routine exact here)."""
    import scipy.linalg as sl

    H = torch.tensor(sl.hadamard(8), dtype=torch.float64) / np.sqrt(8)
    M = H @ torch.diag(torch.arange(8, 0, -1, dtype=torch.float64)) @ H.T
    t = truncated_svd(M, 3)
    for seed in range(20):
        r = randomized_svd(M, 3, generator=seed)  # width 8 = min(m, n): the exact subspace
        torch.testing.assert_close(r.U, t.U)
        torch.testing.assert_close(r.Vh, t.Vh)


def test_the_sign_tie_rule_leaves_ordinary_columns_to_the_largest_entry() -> None:
    """A 0.1% margin re-signed columns whose two largest entries were merely close (and with
    them LoRA-GA's B0): only rounding-level ties go to the first index."""
    from rankwise.linalg.svd import _fix_signs

    U = torch.tensor([[0.5, -0.5], [-0.50004, 0.5 * (1 + 1e-14)]], dtype=torch.float64)
    signed, _ = _fix_signs(U, torch.eye(2, dtype=torch.float64))
    # column 0: the larger |entry| (row 1, negative) is made positive: the column flips;
    # column 1: a rounding-level tie, the first entry decides (it is made positive)
    assert signed[1, 0] > 0 and signed[0, 1] > 0
