"""Every fine-tuning method on SST-2 with the bundled MiniLM: one table, one convergence plot.

Each (method, seed) is one run of :func:`rankwise.train.train` in a fresh child process, so the
child's peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that run alone.
Runs go seed-outer (every method for seed 0, then seed 1, ...) so machine contention spreads
evenly over the methods. Defaults (all flags):

* data: SST-2 ``train.tsv`` (67,349 phrases), evaluation on ``dev.tsv`` (872 sentences), once,
  at the end; ``--max-steps 500`` x ``--batch-size 16`` = 8,000 training examples, max length
  64, warmup 6%, linear decay, seeds 0, 1, 2.
* lr: the engine defaults, 5e-4 for every adapter method and 5e-5 for full fine-tuning; no
  per-method tuning.
* matched budgets (trainable parameters of LoRA r=8 on query, key, value, dense + the
  classifier head): lora / loraplus (ratio 16) / dora (+ magnitudes) / pissa / olora / lora-ga
  r=8, adalora target r=8 from init_r=12, lora-fa r=16 (B only: on BERT sum(out) = sum(in)
  over the targets, so 16 x sum(out) = 8 x (sum(in) + sum(out))). rslora r=64 (alpha 16, scale
  16/sqrt(64) = 2, Kalajdzievski 2023) and, to judge it, ``lora-r64`` (plain LoRA r=64, alpha
  16, scale 16/64 = 0.25). ``full`` trains every parameter.
* loss "after N steps" = mean training loss over steps N-W+1..N (W = ``--window``, 20).
* wall time per epoch = 67,349 / training examples per second of the run (training only,
  extrapolated from the 8,000-example run).
* adapter size = bytes of the weight and config files (``adapter_model.safetensors`` +
  ``adapter_config.json``; for full fine-tuning ``model.safetensors`` + ``config.json``);
  the tokenizer files saved beside them are the same for every method and are not counted.

Outputs: ``benchmarks/results/methods_sst2.{json,md,png}``. With ``--keep DIR`` every run stays
in ``DIR/<method>-s<seed>/`` (the adapters are reused by the analysis study) and a finished run
(its ``result.json``) is skipped when the sweep is started again, so a killed sweep continues.
A kept run is reused only if it trained with this sweep's options (else the sweep stops, naming
the option); its loss@N values are recomputed from its stored loss curve with this sweep's
``--loss-at`` and ``--window``, and it must have run with the same ``--threads``.

    python benchmarks/methods_sst2.py --keep runs/methods_sst2        # the full sweep (~1 h)
    python benchmarks/methods_sst2.py --quick                         # smoke test (minutes)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_EXAMPLES = 67_349  # SST-2 train.tsv: one epoch
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
FULL_FILES = ("model.safetensors", "config.json")
RESULT_FILE = "result.json"
MIN_SEEDS = 3  # a claim is judged only when both sides have a seed range of >= 3 runs


class Row(NamedTuple):
    """One method of the table: the ``--method`` it runs and its TrainConfig fields."""

    name: str
    method: str
    fields: dict[str, Any]


# Row name -> method and options. Options of methods added later (loraplus_ratio, ga_batches,
# init_r) are left at the engine's defaults except AdaLoRA's initial rank.
ROWS: dict[str, Row] = {
    row.name: row
    for row in (
        Row("full", "full", {}),
        Row("lora", "lora", {"r": 8}),
        Row("lora-r64", "lora", {"r": 64}),
        Row("rslora", "rslora", {"r": 64}),
        Row("loraplus", "loraplus", {"r": 8}),
        Row("dora", "dora", {"r": 8}),
        Row("pissa", "pissa", {"r": 8}),
        Row("olora", "olora", {"r": 8}),
        Row("lora-ga", "lora-ga", {"r": 8}),
        Row("adalora", "adalora", {"r": 8, "init_r": 12}),
        Row("lora-fa", "lora-fa", {"r": 16}),
    )
}


class RunRecord(NamedTuple):
    """What one child run measured (the JSON it writes, field for field)."""

    row: str
    method: str
    seed: int
    r: int
    lr: float
    steps: int
    dev_accuracy: float
    loss_at: dict[str, float | None]  # "100" -> mean loss over steps 81..100 (window 20)
    window: int  # the --window loss_at was computed with
    threads: int  # the --threads the run trained with (its timings and memory depend on it)
    trainable: int
    total: int
    examples_per_s: float
    seconds_per_epoch: float
    peak_rss_mib: float
    adapter_bytes: int
    saved_dir_bytes: int
    wall_seconds: float
    curve: list[float]  # training loss of steps 1..steps


class Spread(NamedTuple):
    median: float
    low: float
    high: float
    values: tuple[float, ...]


class Summary(NamedTuple):
    """One row of the table: medians (and spreads) over the seeds of a method."""

    row: str
    method: str
    r: int
    lr: float
    seeds: int
    trainable: int
    accuracy: Spread
    loss_at: dict[str, Spread | None]
    seconds_per_epoch: float
    peak_rss_mib: float
    adapter_bytes: int
    wall_seconds: float


class Claim(NamedTuple):
    claim: str
    rule: str
    evidence: str
    verdict: str  # "reproduces", "not reproduced", "contradicted", "not judged" or "not run"


# ---------------------------------------------------------------- numbers from one run


def loss_after(losses: Sequence[float], step: int, window: int) -> float | None:
    """Mean training loss over steps ``step-window+1 .. step`` (1-based); None if not reached."""
    if step < 1 or window < 1:
        raise ValueError(f"loss_after: step and window must be >= 1, found {step}, {window}")
    if len(losses) < step:
        return None
    chunk = losses[max(0, step - window) : step]
    return sum(chunk) / len(chunk)


def saved_bytes(directory: Path) -> tuple[int, int]:
    """(bytes of the adapter's weight + config files, bytes of every file in the directory)."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    names = ADAPTER_FILES if (directory / ADAPTER_FILES[0]).is_file() else FULL_FILES
    weights = sum(p.stat().st_size for p in files if p.name in names and p.parent == directory)
    return weights, sum(p.stat().st_size for p in files)


def run_child(spec: dict[str, Any]) -> None:
    """Train one (method, seed) in this process and write its :class:`RunRecord` JSON."""
    import resource

    import torch

    from rankwise.train import TrainConfig, train
    from rankwise.train.config import atomic_write_text, from_mapping
    from rankwise.train.metrics import METRICS_FILE, read_metrics

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    config = from_mapping(spec["config"], base=TrainConfig())
    result = train(config, echo=lambda _: None)
    wall = time.perf_counter() - start
    if result.after is None or result.after.accuracy is None or result.saved is None:
        raise RuntimeError(f"run {spec['row']} seed {spec['seed']}: no final evaluation or save")
    records = read_metrics(result.output / METRICS_FILE)
    curve = [float(r["loss"]) for r in sorted(records, key=lambda r: r["step"]) if "loss" in r]
    adapter, whole = saved_bytes(result.saved)
    # ru_maxrss is in KiB on Linux: the peak of this child process, i.e. of this run alone.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record = RunRecord(
        row=spec["row"], method=config.method, seed=config.seed, r=config.r,
        lr=float(result_lr(result.output)), steps=result.steps,
        dev_accuracy=float(result.after.accuracy),
        loss_at={str(n): loss_after(curve, n, spec["window"]) for n in spec["loss_at"]},
        window=spec["window"], threads=spec["threads"],
        trainable=result.trainable, total=result.total, examples_per_s=result.examples_per_s,
        seconds_per_epoch=TRAIN_EXAMPLES / result.examples_per_s, peak_rss_mib=peak,
        adapter_bytes=adapter, saved_dir_bytes=whole, wall_seconds=wall, curve=curve,
    )  # fmt: skip
    atomic_write_text(Path(spec["result"]), json.dumps(record._asdict()) + "\n")


def result_lr(output: Path) -> float:
    """The learning rate the run resolved to (from the ``config.yaml`` written beside it)."""
    import yaml

    return float(yaml.safe_load((output / "config.yaml").read_text(encoding="utf-8"))["lr"])


# ---------------------------------------------------------------- the sweep (parent)


def run_config(row: Row, seed: int, args: argparse.Namespace, train_dir: Path) -> dict[str, Any]:
    """The TrainConfig fields of one run (YAML names)."""
    return {
        "data": str(args.train), "eval_data": str(args.dev), "method": row.method,
        "alpha": 16.0, "dropout": 0.1, "batch_size": args.batch_size,
        "max_steps": args.max_steps, "max_length": args.max_length, "warmup": 0.06,
        "seed": seed, "eval_every": 0, "save_every": 0, "output": str(train_dir), **row.fields,
    }  # fmt: skip


def plan(args: argparse.Namespace) -> list[tuple[Row, int]]:
    """Seed-outer order: every method for the first seed, then every method for the next."""
    return [(ROWS[name], seed) for seed in args.seeds for name in args.methods]


def check_configs(args: argparse.Namespace, work: Path) -> None:
    """Resolve every row's TrainConfig before any training, so an option or method this version
    of rankwise lacks fails in seconds (naming the row) rather than mid-sweep."""
    from rankwise.train import TrainConfig, resolve
    from rankwise.train.config import from_mapping

    for name in args.methods:
        try:
            resolve(
                from_mapping(run_config(ROWS[name], 0, args, work / "check"), base=TrainConfig())
            )
        except ValueError as err:
            raise SystemExit(f"--methods {name}: {err}") from None


def check_kept(train_dir: Path, wanted: dict[str, Any]) -> None:
    """A finished run kept in ``--keep`` is reused only if it ran with this sweep's options."""
    import yaml

    found = yaml.safe_load((train_dir / "config.yaml").read_text(encoding="utf-8"))
    for key, value in wanted.items():
        if key != "output" and found.get(key) != value:
            raise SystemExit(
                f"--keep: {train_dir} was run with {key} = {found.get(key)!r}, this sweep asks "
                f"for {value!r}; choose another --keep directory"
            )


def reuse_kept(result: Path, args: argparse.Namespace) -> RunRecord:
    """A finished run's record for this sweep: loss@N is recomputed from the run's stored loss
    curve with this sweep's ``--loss-at`` and ``--window`` (so the table's labels hold), while
    a run trained with other ``--threads`` is refused (its timings and memory cannot be)."""
    found = json.loads(result.read_text(encoding="utf-8"))
    if "threads" not in found:  # made before the field existed: unknown, so not reused blindly
        raise SystemExit(
            f"--threads: {result} does not record the threads its run trained with; delete "
            f"{result.parent} to run it again, or, if you know it ran with --threads "
            f'{args.threads}, add "threads": {args.threads} to that file'
        )
    if found["threads"] != args.threads:
        raise SystemExit(
            f"--threads: {result.parent} was run with --threads {found['threads']}, this sweep "
            f"asks for --threads {args.threads}; choose another --keep directory (or the run's "
            "--threads)"
        )
    found["loss_at"] = {str(n): loss_after(found["curve"], n, args.window) for n in args.loss_at}
    found["window"] = args.window
    return RunRecord(**found)


def launch(row: Row, seed: int, args: argparse.Namespace, work: Path) -> RunRecord | str:
    """Run one child (or reuse its finished result); the record, or the failure's log tail."""
    run_dir = work / f"{row.name}-s{seed}"
    result = run_dir / RESULT_FILE
    spec = {
        "row": row.name, "seed": seed, "threads": args.threads, "window": args.window,
        "loss_at": args.loss_at, "result": str(result),
        "config": run_config(row, seed, args, run_dir / "train"),
    }  # fmt: skip
    if result.is_file():
        check_kept(run_dir / "train", spec["config"])
        return reuse_kept(result, args)
    shutil.rmtree(run_dir, ignore_errors=True)  # a killed, unfinished run starts again
    run_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    log = run_dir / "child.log"
    with log.open("w", encoding="utf-8") as handle:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0 or not result.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        return f"exit {code}: " + " | ".join(tail)
    return RunRecord(**json.loads(result.read_text(encoding="utf-8")))


def sweep(args: argparse.Namespace, work: Path) -> tuple[list[RunRecord], dict[str, str]]:
    records: list[RunRecord] = []
    failed: dict[str, str] = {}
    todo = plan(args)
    for k, (row, seed) in enumerate(todo, 1):
        tick = time.perf_counter()
        got = launch(row, seed, args, work)
        name = f"{row.name}-s{seed}"
        if isinstance(got, str):
            failed[name] = got
            print(f"[{k}/{len(todo)}] {name}: FAILED {got}", flush=True)
            continue
        records.append(got)
        print(f"[{k}/{len(todo)}] {name}: dev {100 * got.dev_accuracy:.2f}%, loss@ "
              f"{got.loss_at}, {got.examples_per_s:.1f} ex/s, {got.peak_rss_mib:.0f} MiB "
              f"({time.perf_counter() - tick:.0f} s)", flush=True)  # fmt: skip
    return records, failed


# ---------------------------------------------------------------- aggregation and claims


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("spread: expected at least one value, found none")
    return Spread(statistics.median(values), min(values), max(values), tuple(values))


def aggregate(records: Sequence[RunRecord]) -> dict[str, Summary]:
    """Per row (in first-seen order): medians over seeds, and the spread of accuracy and loss."""
    by_row: dict[str, list[RunRecord]] = {}
    for record in records:
        by_row.setdefault(record.row, []).append(record)
    out = {}
    for name, runs in by_row.items():
        keys = list(runs[0].loss_at)
        loss = {}
        for key in keys:
            found = [r.loss_at.get(key) for r in runs]
            loss[key] = spread([v for v in found if v is not None]) if None not in found else None
        out[name] = Summary(
            row=name, method=runs[0].method, r=runs[0].r, lr=runs[0].lr, seeds=len(runs),
            trainable=int(statistics.median(r.trainable for r in runs)),
            accuracy=spread([r.dev_accuracy for r in runs]), loss_at=loss,
            seconds_per_epoch=statistics.median(r.seconds_per_epoch for r in runs),
            peak_rss_mib=statistics.median(r.peak_rss_mib for r in runs),
            adapter_bytes=int(statistics.median(r.adapter_bytes for r in runs)),
            wall_seconds=statistics.median(r.wall_seconds for r in runs),
        )  # fmt: skip
    return out


def compare(a: Spread, b: Spread, *, higher_is_better: bool) -> str:
    """A better than B if A's median lies beyond B's whole seed range in the good direction;
    contradicted if beyond it in the bad direction; otherwise not reproduced (within spread)."""
    sign = 1.0 if higher_is_better else -1.0
    if sign * a.median > sign * (b.high if higher_is_better else b.low):
        return "reproduces"
    if sign * a.median < sign * (b.low if higher_is_better else b.high):
        return "contradicted"
    return "not reproduced"


def at_least(a: Spread, b: Spread) -> str:
    """A >= B (higher is better): A's median at or above B's median; contradicted if below
    B's whole seed range; otherwise not reproduced."""
    if a.median >= b.median:
        return "reproduces"
    return "contradicted" if a.median < b.low else "not reproduced"


def _too_few_seeds(summaries: dict[str, Summary], *rows: str) -> str:
    """Why a claim cannot be judged (a seed range of fewer than MIN_SEEDS runs), or ''."""
    few = [f"{r}: {summaries[r].seeds}" for r in rows if summaries[r].seeds < MIN_SEEDS]
    return f"fewer than {MIN_SEEDS} seeds ({', '.join(few)})" if few else ""


def _fmt_spread(s: Spread | None, scale: float = 1.0, digits: int = 3) -> str:
    if s is None:
        return "n/a"
    return f"{scale * s.median:.{digits}f} [{scale * s.low:.{digits}f}-{scale * s.high:.{digits}f}]"


def _loss_claim(
    claim: str, summaries: dict[str, Summary], a: str, b: str, key: str, paper: str
) -> Claim:
    rule = (f"{a} loss@{key} median below {b}'s whole seed range (lower = faster); "
            f"above it = contradicted ({paper})")  # fmt: skip
    if a not in summaries or b not in summaries:
        return Claim(claim, rule, f"{a} or {b} not run", "not run")
    if few := _too_few_seeds(summaries, a, b):
        return Claim(claim, rule, few, "not judged")
    sa, sb = summaries[a].loss_at.get(key), summaries[b].loss_at.get(key)
    if sa is None or sb is None:
        return Claim(claim, rule, f"loss@{key} not reached", "not run")
    evidence = f"{a} {_fmt_spread(sa)} vs {b} {_fmt_spread(sb)}"
    return Claim(claim, rule, evidence, compare(sa, sb, higher_is_better=False))


def _acc_claim(
    claim: str, summaries: dict[str, Summary], a: str, b: str, *, strict: bool, paper: str
) -> Claim:
    if strict:
        rule = f"{a} dev accuracy median above {b}'s whole seed range; below it = contradicted ({paper})"
    else:
        rule = (f"{a} dev accuracy median >= {b}'s median; below {b}'s whole seed range = "
                f"contradicted; otherwise not reproduced ({paper})")  # fmt: skip
    if a not in summaries or b not in summaries:
        return Claim(claim, rule, f"{a} or {b} not run", "not run")
    if few := _too_few_seeds(summaries, a, b):
        return Claim(claim, rule, few, "not judged")
    sa, sb = summaries[a].accuracy, summaries[b].accuracy
    evidence = f"{a} {_fmt_spread(sa, 100, 2)}% vs {b} {_fmt_spread(sb, 100, 2)}%"
    verdict = compare(sa, sb, higher_is_better=True) if strict else at_least(sa, sb)
    return Claim(claim, rule, evidence, verdict)


def _full_gap_claim(summaries: dict[str, Summary], points: float = 1.0) -> Claim:
    claim = f"LoRA (r=8) within ~{points:g} point of full fine-tuning"
    rule = (f"full's dev accuracy median minus LoRA's <= {points:g} point (Hu et al. 2021, "
            f"Table 2: LoRA matches full fine-tuning on GLUE)")  # fmt: skip
    if "lora" not in summaries or "full" not in summaries:
        return Claim(claim, rule, "lora or full not run", "not run")
    if few := _too_few_seeds(summaries, "lora", "full"):
        return Claim(claim, rule, few, "not judged")
    gap = 100 * (summaries["full"].accuracy.median - summaries["lora"].accuracy.median)
    verdict = "reproduces" if gap <= points else "not reproduced"
    return Claim(claim, rule, f"full - lora = {gap:+.2f} points (medians)", verdict)


def claims(summaries: dict[str, Summary], loss_keys: Sequence[str]) -> list[Claim]:
    """The paper claims, judged by fixed rules from the medians and seed ranges."""
    early, last = str(loss_keys[0]), str(loss_keys[-1])
    s = summaries
    return [
        _loss_claim("PiSSA converges faster than LoRA", s, "pissa", "lora", early,
                    "Meng et al. 2024, PiSSA, Fig. 1/§5"),
        _loss_claim("LoRA-GA converges faster than LoRA", s, "lora-ga", "lora", early,
                    "Wang et al. 2024, LoRA-GA, Fig. 1"),
        _loss_claim("LoRA+ (ratio 16) converges faster than LoRA", s, "loraplus", "lora", early,
                    "Hayou et al. 2024, LoRA+"),
        _acc_claim("LoRA+ (ratio 16) is more accurate than LoRA", s, "loraplus", "lora",
                   strict=True, paper="Hayou et al. 2024, LoRA+"),
        _acc_claim("DoRA is at least as accurate as LoRA", s, "dora", "lora", strict=False,
                   paper="Liu et al. 2024, DoRA"),
        _loss_claim("rsLoRA r=64 (alpha/sqrt r) trains better than LoRA r=64 (alpha/r)", s,
                    "rslora", "lora-r64", last, "Kalajdzievski 2023, rsLoRA, Fig. 2"),
        _acc_claim("rsLoRA r=64 is more accurate than LoRA r=64", s, "rslora", "lora-r64",
                   strict=True, paper="Kalajdzievski 2023, rsLoRA"),
        _acc_claim("AdaLoRA is at least as accurate as LoRA at the same final rank", s,
                   "adalora", "lora", strict=False, paper="Zhang et al. 2023, AdaLoRA, Table 1"),
        _full_gap_claim(s),
    ]  # fmt: skip


# ---------------------------------------------------------------- outputs


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(summaries: dict[str, Summary], loss_keys: Sequence[str]) -> list[str]:
    """The markdown table: one row per method, medians over seeds."""
    keys = [str(k) for k in loss_keys]
    head = ["method", "r", "lr", "trainable", "dev acc % median [min-max]"]
    head += [f"loss@{k} median" for k in keys]
    head += ["s/epoch", "run wall s", "peak MiB", "adapter size"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries.values():
        losses = [f"{s.loss_at[k].median:.4f}" if s.loss_at.get(k) else "n/a" for k in keys]
        cells = [s.row, "-" if s.method == "full" else str(s.r), f"{s.lr:g}", f"{s.trainable:,}",
                 _fmt_spread(s.accuracy, 100, 2), *losses, f"{s.seconds_per_epoch:.0f}",
                 f"{s.wall_seconds:.0f}", f"{s.peak_rss_mib:.0f}", _size(s.adapter_bytes)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def budget_lines(summaries: dict[str, Summary]) -> list[str]:
    """Trainable parameters of each method as a ratio to LoRA r=8 (the matched budget)."""
    if "lora" not in summaries or len(summaries) < 2:
        return []
    base = summaries["lora"].trainable
    parts = [f"{s.row} {s.trainable / base:.3f}" for s in summaries.values() if s.row != "lora"]
    note = (" AdaLoRA is counted at its initial rank (init_r; its allocator prunes to an "
            "average of r by the end).") if "adalora" in summaries else ""  # fmt: skip
    return [f"Trainable parameters / LoRA r=8 ({base:,}): " + ", ".join(parts) + "." + note]


def markdown(report: dict[str, Any], summaries: dict[str, Summary], found: list[Claim]) -> str:
    flags, cond = report["flags"], report["conditions"]
    keys = flags["loss_at"]
    lines = [
        f"# Every method on SST-2 (MiniLM-L6), {cond['date']}",
        "",
        f"{flags['max_steps']} steps x batch {flags['batch_size']} = "
        f"{flags['max_steps'] * flags['batch_size']:,} training examples from SST-2 train "
        f"(max length {flags['max_length']}, warmup 6%, linear decay), dev = "
        f"{report['dev_examples']} sentences, evaluated once at the end; seeds "
        f"{', '.join(map(str, flags['seeds']))}. lr 5e-4 for every adapter method, 5e-5 for "
        "full fine-tuning (engine defaults, no per-method tuning). Loss@N = mean training loss "
        f"over steps N-{flags['window'] - 1}..N. s/epoch = 67,349 / training examples per "
        "second (training only, extrapolated); run wall s = the whole run (loading, "
        "initialization such as PiSSA's SVD or LoRA-GA's gradient pass, training, evaluation, "
        "saving). Peak MiB = the run's process peak RSS. Adapter "
        "size = weight + config files (tokenizer not counted). "
        f"{cond['machine']}, {flags['threads']} threads per run, load average "
        f"{cond['load_average_start'][0]:.2f} at start, {cond['load_average_end'][0]:.2f} at end.",
        "",
        *table(summaries, keys),
        "",
        *budget_lines(summaries),
        "",
        "## Paper claims on this model (3 seeds: conservative rules)",
        "",
        "| claim | rule | evidence (median [min-max]) | verdict |",
        "|---|---|---|---|",
        *(f"| {c.claim} | {c.rule} | {c.evidence} | **{c.verdict}** |" for c in found),
        "",
        "Verdicts: *reproduces* = the rule holds; *not reproduced* = the difference is within "
        "the seed spread (or the gap is too large); *contradicted* = outside the spread in the "
        "opposite direction; *not judged* = fewer than 3 seeds. One model, one task, one "
        "budget, untuned lr: a verdict here is about this setting only.",
    ]
    if report["failed"]:
        lines += ["", "Failed runs: " + "; ".join(f"{k}: {v}" for k, v in report["failed"].items())]
    lines += ["", f"Regenerate: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(records: Sequence[RunRecord], path: Path, *, window: int) -> None:
    """Training loss vs step per method: median over seeds at each step, then a moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[list[float]]] = {}
    for record in records:
        curves.setdefault(record.row, []).append(record.curve)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in curves.items():
        n = min(len(c) for c in runs)
        median = [statistics.median(c[i] for c in runs) for i in range(n)]
        ax.plot(range(1, n + 1), moving_average(median, window), lw=1.2, label=name,
                ls="--" if name in ("full", "lora-r64") else "-")  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (median over seeds, moving average {window})")
    ax.set_title("SST-2, MiniLM-L6: training loss by method")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def conditions(load_start: tuple[float, float, float]) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    import rankwise

    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "rankwise": rankwise.__version__,
            "git": commit,
        },  # fmt: skip
    }


def write_outputs(
    records: list[RunRecord], failed: dict[str, str], args: argparse.Namespace, out: Path,
    load_start: tuple[float, float, float],
) -> str:  # fmt: skip
    from rankwise.train.config import atomic_write_text

    summaries = aggregate(records)
    found = claims(summaries, args.loss_at) if summaries else []
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "conditions": conditions(load_start), "flags": flags, "command": args.command,
        "dev_examples": len(args.dev.read_text(encoding="utf-8").splitlines()) - 1,
        "failed": failed, "summaries": {k: s._asdict() for k, s in summaries.items()},
        "claims": [c._asdict() for c in found], "runs": [r._asdict() for r in records],
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    text = markdown(report, summaries, found)
    atomic_write_text(out.with_suffix(".md"), text)
    if records:
        plot(records, out.with_suffix(".png"), window=args.window)
    return text


# ---------------------------------------------------------------- command line


def _csv(kind: type) -> Any:
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", type=_csv(str), default=list(ROWS), help="rows, comma-separated")
    p.add_argument("--seeds", type=_csv(int), default=[0, 1, 2])
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--loss-at", type=_csv(int), default=[100, 500])
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train", type=Path, default=SST2 / "train.tsv")
    p.add_argument("--dev", type=Path, default=SST2 / "dev.tsv")
    p.add_argument("--keep", type=Path, default=None, help="keep runs here (and resume from it)")
    p.add_argument("--out", type=Path, default=None, help="results path without suffix")
    p.add_argument("--quick", action="store_true", help="smoke test: 20 steps, 1 seed, 2 methods")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m not in ROWS]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(ROWS)}")
    if args.quick:  # explicit flags still win over the quick preset
        given = set(argv if argv is not None else sys.argv[1:])
        preset = {"--max-steps": ("max_steps", 20), "--seeds": ("seeds", [0]),
                  "--methods": ("methods", ["lora", "full"]), "--loss-at": ("loss_at", [10, 20]),
                  "--window": ("window", 5)}  # fmt: skip
        for flag, (name, value) in preset.items():
            if not any(g == flag or g.startswith(flag + "=") for g in given):
                setattr(args, name, value)
    if max(args.loss_at) > args.max_steps:
        p.error(f"--loss-at {max(args.loss_at)} is beyond --max-steps {args.max_steps}")
    args.command = "python benchmarks/methods_sst2.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:])
    )
    return args


def quick_dev(dev: Path, work: Path, n: int = 64) -> Path:
    """The first ``n`` dev sentences (smoke test only), written into the work directory."""
    lines = dev.read_text(encoding="utf-8").splitlines(keepends=True)
    path = work / f"dev_first_{n}.tsv"
    path.write_text("".join(lines[: n + 1]), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.child is not None:
        run_child(json.loads(args.child))
        return
    if not args.train.is_file() or not args.dev.is_file():
        raise SystemExit(f"SST-2 not found ({args.train}, {args.dev}); this benchmark needs it")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="methods_sst2-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.quick:
            args.dev = quick_dev(args.dev, work)
        quick = Path(tempfile.gettempdir()) / "methods_sst2_quick"  # never over the real results
        out = args.out or (quick if args.quick else RESULTS / "methods_sst2")
        check_configs(args, work)
        records, failed = sweep(args, work)
        print(write_outputs(records, failed, args, out, load_start))
        print(f"wrote {out.with_suffix('.json')}, .md, .png")
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
