"""Adapter algebra in factored form against the dense route, in the same run.

``rankwise.analysis.resize(B, A, k)`` gives the best rank-k approximation of ``B @ A`` from QR
factorizations of ``B`` and ``Aᵀ`` and the SVD of an ``r × r`` core, never forming the product.
The dense route is what PEFT 0.21.2 does to resize or SVD-combine adapters
(``add_weighted_adapter(..., combination_type="svd")``): form ``ΔW = B @ A`` and call
``torch.linalg.svd(ΔW, full_matrices=svd_full_matrices)``, then keep the top-k triplets.
PEFT's default is ``svd_full_matrices=True`` (square U and Vh); both that and the cheaper thin
SVD (``full_matrices=False``, what a careful caller would pass) are timed.

For each shape (out × in, adapter rank r → k), float32, ``--threads`` threads, the two routes run
interleaved for ``--repeats`` rounds; medians, the speed-up (dense time ÷ factored time) and the
Frobenius errors of both results against the dense rank-k truncation computed in float64 (they
must agree: both are Eckart–Young optimal).

Run: ``python benchmarks/algebra.py`` (writes benchmarks/results/algebra.json and algebra.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from lora import interleaved  # the timing harness of benchmarks/lora.py
from rankwise.io.files import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((1024, 1024, 64, 16), (2048, 2048, 64, 16), (4096, 1024, 128, 32))


def dense_resize(
    B: torch.Tensor, A: torch.Tensor, k: int, *, full_matrices: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's route: the dense product, an SVD of it, the top-k triplets (√S split)."""
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=full_matrices)
    root = S[:k].sqrt()
    return U[:, :k] * root, root[:, None] * Vh[:k]


def one_shape(out_f: int, in_f: int, r: int, k: int, *, repeats: int) -> dict[str, object]:
    from rankwise.analysis import resize

    g = torch.Generator().manual_seed(0)
    B = torch.randn(out_f, r, generator=g) / r**0.5
    A = torch.randn(r, in_f, generator=g) * torch.logspace(0, -2, r)[:, None]
    fns = {
        "factored": lambda: resize(B, A, k),
        "dense": lambda: dense_resize(B, A, k),
        "dense_full": lambda: dense_resize(B, A, k, full_matrices=True),
    }
    times, _ = interleaved(fns, repeats=repeats, warmup=1)  # wall seconds, round-robin
    # error of each result against the float64 optimum
    U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    err = {}
    for name, fn in fns.items():
        Bk, Ak = fn()
        err[name] = float(torch.linalg.norm(Bk.double() @ Ak.double() - best))
    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "shape": [out_f, in_f],
        "r": r,
        "k": k,
        "median_seconds": med,
        "speedup": med["dense"] / med["factored"],
        "speedup_full": med["dense_full"] / med["factored"],
        "paired_speedup": statistics.median(
            d / f for d, f in zip(times["dense"], times["factored"])
        ),
        "paired_speedup_full": statistics.median(
            d / f for d, f in zip(times["dense_full"], times["factored"])
        ),
        "frobenius_distance_to_optimum": err,
        "optimum_error": float(S[k:].square().sum().sqrt()),
        "samples_seconds": times,
    }


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        "# Adapter algebra: factored resize against the dense routes (PEFT's), same run",
        "",
        f"float32, {s['threads']} thread(s), medians of {s['repeats']} interleaved runs; torch "
        f"{s['torch']}. Dense thin = ΔW = B A then torch.linalg.svd(full_matrices=False); "
        "dense full = the same with full_matrices=True, PEFT 0.21.2's default in "
        "add_weighted_adapter (svd_full_matrices=True); speed-ups are medians of per-round "
        "ratios (dense ÷ factored); distance = ‖B'A' − best rank-k‖_F against the float64 "
        "optimum.",
        "",
        "| ΔW shape | r → k | factored (ms) | dense thin (ms) | dense full, PEFT default (ms) "
        "| speed-up vs thin | vs full | distance factored | distance dense thin "
        "| distance dense full | optimal error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        m, d = row["median_seconds"], row["frobenius_distance_to_optimum"]
        lines.append(
            f"| {row['shape'][0]}×{row['shape'][1]} | {row['r']} → {row['k']} | "
            f"{m['factored'] * 1e3:.1f} | {m['dense'] * 1e3:.1f} | {m['dense_full'] * 1e3:.1f} | "
            f"{row['paired_speedup']:.0f}× | {row['paired_speedup_full']:.0f}× | "
            f"{d['factored']:.1e} | {d['dense']:.1e} | {d['dense_full']:.1e} | "
            f"{row['optimum_error']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [one_shape(*shape, repeats=args.repeats) for shape in SHAPES]
    result = {
        "setup": {
            "threads": args.threads,
            "repeats": args.repeats,
            "dtype": "float32",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average": list(os.getloadavg()),
        },
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    for name, data in (("algebra.json", json.dumps(result, indent=2) + "\n"), ("algebra.md", text)):
        atomic_write_bytes(args.out / name, data.encode("utf-8"))  # temp file + rename
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
