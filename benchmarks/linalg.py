"""Benchmark ``rankwise.linalg`` against its peers and against its own floor, in one run.

* ``randomized_svd`` vs ``sklearn.utils.extmath.randomized_svd`` — with its defaults
  (``n_iter="auto"``: 7 power iterations here) and matched (``n_iter`` = the ``q`` rankwise's
  ``"auto"`` chose, the same oversampling, LU normalization) — and
  ``torch.svd_lowrank(q=rank+oversample, niter=2)`` on an n×n float32 matrix, rank k, three
  spectra (geometric, 1/j, flat tail): median time, spectral error ÷ σ_{k+1}, and paired
  (per-round) ratios to rankwise.
* ``interpolative`` (randomized and deterministic) vs ``scipy.linalg.interpolative
  .interp_decomp`` (defaults) at rank 200 on a 3000×3000 float64 matrix.
* Floors: the matrix products a routine cannot avoid, timed in the same run (orthonormalizing
  QRs, LU and Ritz values are *not* in any floor):

  - randomized SVD: ``2q + 2`` passes of M against an n×(k+p) block (HMT 2011, Alg. 4.4 +
    5.1), timed for each ``q`` a rankwise row ran (the ``"auto"`` choice, and 2); each row is
    divided by the floor of its own ``q``, as a median of per-round ratios.
  - ID, both variants — forming ``Z`` from a column-pivoted QR (QRCP) of the matrix ``A``
    pivoted on: ``k`` GEMVs ``qᵀA`` plus the triangular solve ``R11⁻¹ R`` (k×k into k×n).
    The GEMVs cannot be blocked into BLAS-3: the pivot of step ``j+1`` is the column of largest
    residual norm, and those norms are only known once row ``j`` of ``R`` (= ``q_jᵀA``) has
    been read off *all* columns; every Businger–Golub QRCP (LAPACK's xGEQP3/xLAQP2 included)
    pays these ``k`` BLAS-2 sweeps, and xGEQP3 pays BLAS-3 trailing updates on top (rankwise
    never updates ``A``). Memory-bound (3000² float64 is 72 MB, above the L3), so ``k`` GEMVs
    is a strict floor — a "blocked QR of a k-column panel" would be no floor at all, since
    it never looks at the other columns and cannot choose pivots.
  - deterministic ID: the above with ``A = M`` (``k`` GEMVs of M + the solve).
  - randomized ID: ``2q + 2`` passes of M against an n×(k+20) block (the sketch ``Y = QᵀM``,
    with the same "auto" ``q``), plus the above with ``A = Y`` ((k+20)×n, cache-resident):
    sketch + power passes + the products needed to form ``Z``. (Before 2026-11-22 this floor
    had the passes only; the ``Y`` terms are ~5% of it; the passes-only ratio is still
    reported.) The ID ÷ floor ratios are medians of per-round ratios (peer and floor run back
    to back in each round), which a shared machine's load spikes move far less than a ratio
    of two medians.

Singular vectors are orthonormal DCT-II bases with random signs and permutations: every
method here sketches with a Gaussian matrix, whose error distribution depends on the
spectrum only, and the bases cost O(n²) to build instead of an O(n³) QR.

Run: ``python benchmarks/linalg.py`` (``--quick``: small sizes, same repeats and warm-up, for a
smoke run, written to ``linalg_quick.*``); writes
``benchmarks/results/linalg.json`` and ``linalg.md``. ``--threads`` (default 1) pins torch,
MKL and OpenBLAS to the same thread count for every peer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankwise.io.files import atomic_write_bytes
from rankwise.linalg import ID, id_reconstruct, interpolative, randomized_svd
from rankwise.linalg.interpolative import SKETCH_OVERSAMPLE
from rankwise.linalg.svd import _range_and_projection

RESULTS = Path(__file__).resolve().parent / "results"


def orthonormal(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """An n×n orthogonal matrix: the DCT-II basis with random row signs and column order."""
    gen = torch.Generator().manual_seed(seed)
    i = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    basis = torch.cos(torch.pi * (2 * i + 1) * j / (2 * n)) * (2.0 / n) ** 0.5
    basis[:, 0] /= 2**0.5
    signs = torch.randint(0, 2, (n, 1), generator=gen, dtype=torch.float64) * 2 - 1
    return (basis * signs)[:, torch.randperm(n, generator=gen)].to(dtype)


def with_spectrum(sigma: torch.Tensor, seed: int, dtype: torch.dtype) -> torch.Tensor:
    n = sigma.numel()
    U, V = orthonormal(n, seed, dtype), orthonormal(n, seed + 1, dtype)
    return (U * sigma.to(dtype)) @ V.T  # (n, n)


def spectra(n: int, k: int) -> dict[str, torch.Tensor]:
    j = torch.arange(1, n + 1, dtype=torch.float64)
    return {
        "geometric (0.95^j)": 0.95 ** (j - 1),
        "1/j": 1.0 / j,
        "flat tail (1, then 0.1)": torch.where(j <= k, 1.0, 0.1),
    }


def spectral_norm(E: torch.Tensor, steps: int = 80, seed: int = 0) -> float:
    """‖E‖₂ by Lanczos on EᵀE with full reorthogonalization (float64), accurate to ~1e-8 here."""
    E = E.to(torch.float64)
    n = E.shape[1]
    steps = min(steps, n)
    basis = torch.zeros(steps, n, dtype=torch.float64)
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v /= v.norm()
    alphas, betas = [], []
    for j in range(steps):
        basis[j] = v
        w = E.T @ (E @ v)
        alphas.append(float(w @ v))
        for _ in range(2):  # full reorthogonalization against every Lanczos vector so far
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.norm())
        if beta < 1e-12 * abs(alphas[0]) or j == steps - 1:
            break
        betas.append(beta)
        v = w / beta
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
    T += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(T)[-1].clamp_min(0).sqrt())


def race(
    peers: dict[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: bool = True,
    rounds: dict[str, list[float]] | None = None,
) -> dict[str, tuple[float, Any]]:
    """Median wall time and last result of each peer, the repeats interleaved round-robin.

    Interleaving makes a busy machine's load fall on every peer alike; torch's global RNG is
    re-seeded before each call so peers without a generator (``torch.svd_lowrank``) are
    reproducible too. ``rounds``, if given, receives every peer's per-round times.
    """
    results: dict[str, Any] = {}
    times: dict[str, list[float]] = {name: [] for name in peers} if rounds is None else rounds
    times.update({name: [] for name in peers})
    if warmup:  # allocations, lazy imports
        for name, fn in peers.items():
            torch.manual_seed(0)
            results[name] = fn()
    for _ in range(repeats):
        for name, fn in peers.items():
            torch.manual_seed(0)
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in peers}


def svd_error(M: torch.Tensor, U: Any, S: Any, Vh: Any, k: int) -> float:
    U, S, Vh = (
        torch.as_tensor(np.asarray(x)) if isinstance(x, np.ndarray) else x for x in (U, S, Vh)
    )
    approx = (U[:, :k].double() * S[:k].double()) @ Vh[:k].double()
    return spectral_norm(M.double() - approx)


def floor_passes(M: torch.Tensor, width: int, passes: int) -> Callable[[], None]:
    """``passes`` products of M (alternately Mᵀ) with a thin block of ``width``.

    Written in the fastest layout we found, a wide (width, n) block times M or Mᵀ, so the
    floor is the best the BLAS can do, not a strawman.
    """
    block_t = torch.randn(width, M.shape[0], dtype=M.dtype)

    def run() -> None:
        for p in range(passes):
            _ = block_t @ (M if p % 2 == 0 else M.T)

    return run


def floor_coefficients(A: torch.Tensor, k: int) -> Callable[[], None]:
    """What a QRCP-based ID of ``A`` (m, n) cannot avoid: ``k`` GEMVs ``qᵀA`` and ``R11⁻¹R``.

    One GEMV per pivot, each reading all of ``A`` (the next pivot depends on it), then the
    triangular solve for the coefficients, k×k into k×n (a BLAS-3 TRSM).
    """
    gen = torch.Generator().manual_seed(1)
    vector = torch.randn(A.shape[0], generator=gen, dtype=A.dtype)
    R = torch.randn(k, A.shape[1], generator=gen, dtype=A.dtype)  # (k, n)
    R11 = torch.randn(k, k, generator=gen, dtype=A.dtype).triu() + k * torch.eye(k, dtype=A.dtype)

    def run() -> None:
        for _ in range(k):
            _ = vector @ A  # (n,)
        torch.linalg.solve_triangular(R11, R, upper=True)  # (k, n)

    return run


SK_DEFAULTS = "sklearn randomized_svd (defaults)"
AUTO = "rankwise randomized_svd (auto)"


def bench_rsvd(n: int, k: int, oversample: int, repeats: int) -> list[dict[str, Any]]:
    """Every peer and one floor per power-iteration count, interleaved round by round.

    Ratios are medians of per-round ratios (``rounds``): a peer and rankwise, or a rankwise row
    and the floor of *its* ``q``, ran back to back in each round.
    """
    from sklearn.utils.extmath import randomized_svd as sk_randomized_svd

    rows = []
    for name, sigma in spectra(n, k).items():
        M = with_spectrum(sigma, seed=0, dtype=torch.float32)
        M_np = M.numpy()
        floor_sigma = float(sigma[k])
        q = _range_and_projection(M, k + oversample, k, None, torch.Generator().manual_seed(0))
        q = q.power_iters
        sk_default_iters = 7 if k < 0.1 * min(M.shape) else 4  # sklearn's n_iter="auto"
        peers: dict[str, Callable[[], Any]] = {
            AUTO: lambda M=M: randomized_svd(M, k, oversample=oversample, generator=0),
            "rankwise randomized_svd (power_iters=2)": lambda M=M: randomized_svd(
                M, k, oversample=oversample, power_iters=2, generator=0
            ),
            SK_DEFAULTS: lambda M_np=M_np: sk_randomized_svd(M_np, k, random_state=0),
            # Matched: the q rankwise's "auto" chose on this matrix (an oracle sklearn does not
            # have), the same oversampling, and LU normalization after every power step
            # (sklearn's own choice for n_iter > 2; rankwise re-normalizes every step too).
            f"sklearn randomized_svd (matched: n_iter={q}, n_oversamples={oversample}, LU)": (
                lambda M_np=M_np, q=q: sk_randomized_svd(
                    M_np,
                    k,
                    n_oversamples=oversample,
                    n_iter=q,
                    power_iteration_normalizer="LU",
                    random_state=0,
                )
            ),
            "torch.svd_lowrank (q=k+p, niter=2)": lambda M=M: _svd_lowrank(M, k + oversample),
        }
        iters = {AUTO: q, "rankwise randomized_svd (power_iters=2)": 2}
        floors = {
            f"floor q={i}": floor_passes(M, k + oversample, 2 * i + 2) for i in sorted({q, 2})
        }
        rounds: dict[str, list[float]] = {}
        timed = race({**peers, **floors}, repeats, rounds=rounds)

        def paired(a: str, b: str, rounds: dict[str, list[float]] = rounds) -> float:
            return statistics.median(x / y for x, y in zip(rounds[a], rounds[b]))

        for peer in peers:
            seconds, (U, S, Vh) = timed[peer]
            row = {
                "spectrum": name,
                "method": peer,
                "seconds": seconds,
                "error_over_sigma_k1": svd_error(M, U, S, Vh, k) / floor_sigma,
                "auto_power_iters": q,
                "sklearn_default_n_iter": sk_default_iters,
                "paired_ratio_to_auto": paired(peer, AUTO),
                "round_seconds": rounds[peer],
            }
            if peer in iters:
                floor = f"floor q={iters[peer]}"
                row.update(
                    power_iters=iters[peer],
                    floor_seconds=timed[floor][0],
                    floor_passes=2 * iters[peer] + 2,
                    floor_ratio=paired(peer, floor),
                )
            rows.append(row)
        print_rows(
            [
                {key: v for key, v in r.items() if key != "round_seconds"}
                for r in rows[-len(peers) :]
            ]
        )
    return rows


def _svd_lowrank(M: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, V = torch.svd_lowrank(M, q=q, niter=2)  # returns q triplets, not k: the "q trap"
    return U, S, V.T


def bench_id(n: int, k: int, repeats: int) -> list[dict[str, Any]]:
    import scipy.linalg.interpolative as sli

    sigma = 0.98 ** torch.arange(n, dtype=torch.float64)
    M = with_spectrum(sigma, seed=5, dtype=torch.float64)
    M_np = M.numpy()
    floor_sigma = float(sigma[k])

    def scipy_id() -> tuple[np.ndarray, np.ndarray]:
        idx, proj = sli.interp_decomp(M_np, k, rng=0)  # defaults otherwise: rand=True
        Z = np.zeros((k, n))
        Z[:, idx[:k]] = np.eye(k)
        Z[:, idx[k:]] = proj
        return idx[:k], Z

    peers: dict[str, Callable[[], Any]] = {
        "rankwise interpolative (randomized)": lambda: interpolative(
            M, k, randomized=True, generator=0
        ),
        "rankwise interpolative (deterministic)": lambda: interpolative(M, k),
        "scipy interp_decomp (defaults, rng=0)": scipy_id,
    }
    width = k + SKETCH_OVERSAMPLE
    sketch = _range_and_projection(M, width, k, None, torch.Generator().manual_seed(0))
    q = sketch.power_iters
    passes = floor_passes(M, width, 2 * q + 2)
    from_sketch = floor_coefficients(sketch.Z.mT.contiguous(), k)  # Y = QᵀM, (k+20, n)
    peers["floor randomized"] = lambda: (passes(), from_sketch())
    peers["floor randomized, passes only"] = passes
    peers["floor deterministic"] = floor_coefficients(M, k)
    rounds: dict[str, list[float]] = {}
    timed = race(peers, repeats, rounds=rounds)
    floors = [timed.pop("floor randomized")[0], timed.pop("floor deterministic")[0]]
    passes_only = timed.pop("floor randomized, passes only")[0]

    def ratio(peer: str, floor: str) -> float:
        # Median of the per-round ratios: a peer and its floor ran back to back in each
        # round, so a load spike on a shared machine cancels instead of moving one median.
        return statistics.median(a / b for a, b in zip(rounds[peer], rounds[floor]))

    rows = []
    for peer, (seconds, (idx, Z)) in timed.items():
        idx, Z = torch.as_tensor(np.asarray(idx)), torch.as_tensor(np.asarray(Z))
        error = spectral_norm(M - id_reconstruct(M, ID(idx, Z)))
        rows.append(
            {
                "method": peer,
                "seconds": seconds,
                "error_over_sigma_k1": error / floor_sigma,
                "max_abs_Z": float(Z.abs().max()),
            }
        )
    rows[0]["floor_seconds"], rows[0]["auto_power_iters"] = floors[0], q
    rows[0]["passes_only_floor_seconds"] = passes_only
    rows[1]["floor_seconds"] = floors[1]
    randomized, deterministic = (row["method"] for row in rows[:2])
    rows[0]["floor_ratio"] = ratio(randomized, "floor randomized")
    rows[0]["passes_only_floor_ratio"] = ratio(randomized, "floor randomized, passes only")
    rows[1]["floor_ratio"] = ratio(deterministic, "floor deterministic")
    print_rows(rows)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        print({key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()})


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# rankwise.linalg benchmark",
        "",
        f"{report['machine']}; torch {report['torch']}, {report['threads']} thread(s); "
        f"medians of {report['repeats']} interleaved runs (ID: {report['id_repeats']}). Ratios: peer time ÷ rankwise time (>1 means "
        "rankwise is faster); floor ratio: rankwise time ÷ floor time.",
        "",
        f"## randomized SVD: {report['svd_size']}² float32, rank {report['svd_rank']}",
        "",
        "| spectrum | method | time (s) | error ÷ σ_{k+1} | peer ÷ rankwise (auto) | ÷ floor |",
        "|---|---|---|---|---|---|",
    ]
    svd_rows = report["randomized_svd"]
    for spectrum in dict.fromkeys(r["spectrum"] for r in svd_rows):
        rows = [r for r in svd_rows if r["spectrum"] == spectrum]
        for r in rows:
            floor = f"{r['floor_ratio']:.2f} (q = {r['power_iters']})" if "floor_ratio" in r else ""
            lines.append(
                f"| {spectrum} | {r['method']} | {r['seconds']:.3f} | "
                f"{r['error_over_sigma_k1']:.4f} | {r['paired_ratio_to_auto']:.2f}× | {floor} |"
            )
        floors = {r["power_iters"]: r["floor_seconds"] for r in rows if "floor_seconds" in r}
        for q in sorted(floors):
            lines.append(
                f"| {spectrum} | floor: {2 * q + 2} passes (q = {q}) | {floors[q]:.3f} | | | |"
            )
    if svd_rows:
        q_auto = sorted({r["auto_power_iters"] for r in svd_rows})
        lines += [
            "",
            '"peer ÷ rankwise (auto)" and "÷ floor" are medians of per-round ratios (each '
            "round runs every peer and every floor back to back); each rankwise row is divided "
            "by the floor of its own q (2q + 2 passes of M against an n×(k+p) block). scikit-"
            f"learn's defaults run n_iter = {svd_rows[0]['sklearn_default_n_iter']} power "
            f"iterations (n_iter='auto'), rankwise's \"auto\" chose q = "
            f"{', '.join(map(str, q_auto))} here: the default-vs-default ratio compares those "
            "iteration counts as much as the implementations. The matched row runs scikit-learn "
            "with rankwise's q on that matrix (which scikit-learn cannot know in advance), the "
            "same oversampling and LU normalization.",
        ]
    if report["interpolative"]:
        lines += [
            "",
            f"## interpolative decomposition: {report['id_size']}² float64 (σ_j = 0.98^j), "
            f"rank {report['id_rank']}",
            "",
            "| method | time (s) | error ÷ σ_{k+1} | max abs Z | scipy time ÷ this | ÷ floor |",
            "|---|---|---|---|---|---|",
        ]
        scipy_time = report["interpolative"][-1]["seconds"]
        for r in report["interpolative"]:
            floor = f"{r['floor_ratio']:.2f}" if "floor_ratio" in r else ""
            lines.append(
                f"| {r['method']} | {r['seconds']:.3f} | {r['error_over_sigma_k1']:.3f} | "
                f"{r['max_abs_Z']:.2f} | {scipy_time / r['seconds']:.1f}× | {floor} |"
            )
        randomized, deterministic = report["interpolative"][:2]
        q, k = randomized["auto_power_iters"], report["id_rank"]
        passes_only = randomized["passes_only_floor_seconds"]
        lines += [
            f"| floor randomized: {2 * q + 2} passes (q = {q}) + {k} GEMVs of the sketch + solve "
            f"| {randomized['floor_seconds']:.3f} | | | | |",
            f"| floor deterministic: {k} GEMVs of M + solve | {deterministic['floor_seconds']:.3f} "
            "| | | | |",
            "",
            "Floors: the products an ID cannot avoid (see the module docstring): the sketch and "
            "power passes, then, on the matrix the QRCP pivots on (the sketch, or M), one GEMV per "
            "pivot — the next pivot needs every residual column norm — and the triangular solve "
            f"for Z. Against the passes alone ({passes_only:.3f} s) the randomized ID is at "
            f"{randomized['passes_only_floor_ratio']:.2f}×. ID ÷ floor ratios are medians of "
            "per-round ratios (each round runs every peer and floor back to back).",
        ]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    from rankwise.lora.linear_ops import cpuinfo_field

    return cpuinfo_field("model name") or platform.processor() or "CPU unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--part", choices=("all", "svd", "id"), default="all")
    args = parser.parse_args()
    # Load every BLAS (numpy's, scipy's, torch's) before limiting threads: threadpoolctl only
    # limits libraries that are already loaded.
    import scipy.linalg.interpolative  # noqa: F401
    import sklearn.utils.extmath  # noqa: F401
    from threadpoolctl import threadpool_info, threadpool_limits

    torch.set_num_threads(args.threads)
    svd_size, svd_rank, id_size, id_rank = (
        (512, 16, 400, 40) if args.quick else (4096, 64, 3000, 200)
    )
    repeats = args.repeats  # --quick shrinks the sizes only; every race warms up first
    id_repeats = max(1, min(repeats, 5))
    with threadpool_limits(limits=args.threads):
        rsvd = bench_rsvd(svd_size, svd_rank, 10, repeats) if args.part != "id" else []
        ids = bench_id(id_size, id_rank, id_repeats) if args.part != "svd" else []
        pools = [(p["internal_api"], p["num_threads"]) for p in threadpool_info()]
    report = {
        # the CPU's name: torch runs MKL and numpy/scipy OpenBLAS here, and which one is faster
        # for these shapes depends on the CPU (platform.processor() is empty on Linux)
        "machine": f"{platform.machine()} {_cpu_name()} ({os.cpu_count()} CPUs)",
        "torch": torch.__version__,
        "threads": args.threads,
        "thread_pools": pools,
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
        "repeats": repeats,
        "id_repeats": id_repeats,
        "svd_size": svd_size,
        "svd_rank": svd_rank,
        "id_size": id_size,
        "id_rank": id_rank,
        "randomized_svd": rsvd,
        "interpolative": ids,
    }
    if args.part != "all":
        return  # partial runs only print
    stem = "linalg_quick" if args.quick else "linalg"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / f"{stem}.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(args.out / f"{stem}.md", markdown(report).encode("utf-8"))
    print(markdown(report))


if __name__ == "__main__":
    main()
