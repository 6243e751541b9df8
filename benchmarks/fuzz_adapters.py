"""Fuzz adapter loading and config parsing with >= 10,000 mutated adapter directories (issue 8).

The mutations, seeds and oracle are those of ``tests/reliability/rel_fuzzkit.py`` (the test
suite runs a few hundred of the same cases): a valid adapter directory written by rankwise gets
one mutation — bit flips, truncation, inserted bytes, an edit of the safetensors JSON header
(shapes, dtypes, offsets, key names incl. ``../``, metadata, the length prefix), an edit of
``adapter_config.json`` (any field set to any JSON value, deleted, or the whole document
replaced), or a deleted file — and goes to three targets: ``rankwise.io.read_adapter_config``,
``rankwise.io.load_adapter`` (into a fresh model; a refusal must leave it unchanged, a success
must hold finite values only) and ``rankwise.analysis.read_factors``.

A *failure* is any exception that is not a :class:`rankwise.errors.RankwiseError`, a target
taking more than 5 s (SIGALRM per target), or a memory error: the process runs under an
address-space limit (``RLIMIT_AS`` = its size at start + ``--memory-gb``), so a blow-up fails
fast instead of swapping. Failures already reported to the owners (``KNOWN_BUGS``) are counted
separately; distinct failure signatures are listed with one mutation that triggers each.

Hypothesis draws the cases (generate phase only: no shrinking, no database, fixed seed), so a
run is reproducible: ``python benchmarks/fuzz_adapters.py --cases 10000 --seed 0``.
Writes ``benchmarks/results/fuzz.json`` and ``fuzz.md``; exits 1 if any failure (known bugs
included: they are still bugs) or hang was found.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from rel_fuzzkit import KNOWN_BUGS, TIMEOUT_S, Mutation, make_seeds, mutations, run_case  # noqa: E402

from rankwise.io.files import atomic_write_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def limit_memory(extra_gb: float) -> int:
    """Cap the address space at its current size + ``extra_gb``; returns the limit in bytes."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[0])
    limit = pages * resource.getpagesize() + int(extra_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit


def signature(detail: str) -> str:
    """A failure's signature: exception type + message with paths and numbers blanked."""
    text = re.sub(r"/\S+", "<path>", detail)
    return re.sub(r"\d+", "N", text)[:160]


def fuzz(cases: int, seed_value: int, workdir: Path) -> dict[str, Any]:
    seeds = make_seeds(workdir)
    case_dir = workdir / "case" / "adapter"
    counts: Counter[tuple[str, str]] = Counter()
    kinds: Counter[str] = Counter()
    slowest: dict[str, float] = {}
    times: list[float] = []
    failures: dict[str, dict[str, Any]] = {}
    slow: list[tuple[float, str, int, Mutation]] = []  # (seconds, target, seed, mutation) > 1 s
    done = 0

    @seed(seed_value)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(index=st.integers(0, len(seeds) - 1), mutation=mutations())
    def one(index: int, mutation: Mutation) -> None:
        nonlocal done
        done += 1
        kinds[mutation.kind] += 1
        start = time.perf_counter()
        for outcome in run_case(seeds[index], mutation, case_dir, analysis=True):
            counts[(outcome.target, outcome.status)] += 1
            slowest[outcome.target] = max(slowest.get(outcome.target, 0.0), outcome.seconds)
            if outcome.seconds > 1.0:
                slow.append((outcome.seconds, outcome.target, index, mutation))
            if outcome.status in ("failure", "known"):
                key = f"{outcome.target} | {signature(outcome.detail)}"
                entry = failures.setdefault(
                    key,
                    {"count": 0, "known": outcome.status == "known", "seed": seeds[index].name,
                     "mutation": mutation._asdict(), "detail": outcome.detail},
                )  # fmt: skip
                entry["count"] += 1
        times.append(time.perf_counter() - start)

    one()
    retimed = retime(slow, seeds, case_dir)
    targets = sorted({t for t, _ in counts})
    per_target = {
        t: {s: counts[(t, s)] for s in ("ok", "refused", "known", "failure")} for t in targets
    }
    return {
        "cases": done,
        "target_calls": sum(counts.values()),
        "by_target": per_target,
        "mutation_kinds": dict(kinds),
        "case_seconds_median": statistics.median(times),
        "case_seconds_max": max(times),
        "slowest_target_seconds": slowest,
        "timeout_seconds": TIMEOUT_S,
        "calls_over_1s": len(slow),
        "calls_over_timeout": sum(t > TIMEOUT_S for t, *_ in slow),
        "retimed_slow_calls": retimed,
        "hangs": sum(r["retimed_min_seconds"] > TIMEOUT_S for r in retimed),
        "failures": failures,
    }


def retime(
    slow: list[tuple[float, str, int, Mutation]], seeds: list[Any], case_dir: Path
) -> list[dict[str, Any]]:
    """Run each call that took > 1 s again, 3 times: a real hang stays slow, a stall of the
    shared CPU does not. (A SIGALRM that lands in a GC callback is swallowed by Python, so
    the first run's time is what counts as a timeout, not the exception alone.)"""
    out = []
    for seconds, target, index, mutation in sorted(slow, key=lambda s: -s[0])[:20]:
        times = []
        for _ in range(3):
            for outcome in run_case(seeds[index], mutation, case_dir, analysis=True):
                if outcome.target == target:
                    times.append(outcome.seconds)
        out.append({"target": target, "first_seconds": seconds, "retimed_min_seconds": min(times),
                    "mutation": mutation._asdict()})  # fmt: skip
    return out


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        "# Fuzzing adapter loading and config parsing",
        "",
        f"`{command}` — {result['cases']:,} mutated adapter directories, "
        f"{result['target_calls']:,} target calls, peak RSS {result['peak_rss_mb']:.0f} MB "
        f"(address-space limit {result['memory_limit_gb']:.1f} GB), {result['seconds']:.0f} s.",
        "",
        "| target | loaded / parsed | refused (rankwise error) | known bugs | other failures | slowest (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for target, row in result["by_target"].items():
        slow = result["slowest_target_seconds"][target]
        lines.append(
            f"| `{target}` | {row['ok']:,} | {row['refused']:,} | {row['known']:,} | "
            f"{row['failure']:,} | {slow:.3f} |"
        )
    lines += [
        "",
        "Mutations: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(result["mutation_kinds"].items())),
        "",
    ]
    if result["failures"]:
        lines += [
            "## Failure signatures",
            "",
            "| count | known | target and signature |",
            "|---:|---|---|",
        ]
        for key, entry in sorted(result["failures"].items(), key=lambda kv: -kv[1]["count"]):
            lines.append(f"| {entry['count']:,} | {'yes' if entry['known'] else 'no'} | `{key}` |")
        lines.append("")
    lines += [f"Per-target timeout {result['timeout_seconds']} s; median case "
              f"{1000 * result['case_seconds_median']:.1f} ms, max {result['case_seconds_max']:.2f} s. "
              f"Calls over 1 s: {result['calls_over_1s']}, over {result['timeout_seconds']} s: "
              f"{result['calls_over_timeout']}; re-timed 3 times each, the slowest then took "
              f"{max([r['retimed_min_seconds'] for r in result['retimed_slow_calls']] or [0]):.3f} s "
              f"-> hangs: {result['hangs']}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-gb", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors; one thread keeps per-case timings clean
    limit = limit_memory(args.memory_gb)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rankwise-fuzz-") as tmp:
        result = fuzz(args.cases, args.seed, Path(tmp))
    result |= {
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "memory_limit_gb": limit / 2**30,
        "known_bugs": KNOWN_BUGS,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    command = f"python benchmarks/fuzz_adapters.py --cases {args.cases} --seed {args.seed}"
    args.out.mkdir(parents=True, exist_ok=True)
    data = json.dumps(result, indent=2, default=str) + "\n"
    atomic_write_bytes(args.out / "fuzz.json", data.encode("utf-8"))
    atomic_write_bytes(args.out / "fuzz.md", markdown(result, command).encode("utf-8"))
    print(markdown(result, command))
    return exit_code(result)


def exit_code(result: dict[str, Any]) -> int:
    """1 when the run found anything wrong (a failure signature, known or not, or a hang), as
    ``crash_safety.py`` does, so a script or CI running the fuzzer sees it; else 0."""
    found = [f"{e['count']} x {'known ' if e['known'] else ''}`{key}`"
             for key, e in result["failures"].items()]  # fmt: skip
    if result["hangs"]:
        found.append(f"{result['hangs']} hang(s)")
    if found:
        print("fuzz: FAILED: " + "; ".join(found), file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
