"""SIGKILL ``save_adapter`` and ``rankwise finetune`` at random moments (issue 8, crash safety).

The trials are those of ``tests/reliability/rel_crashkit.py`` (the test suite runs one of each):

* ``save_adapter``: a child saves a ~2 MB adapter in a loop (every value and ``lora_alpha``
  equal to the version number) and is killed ``U(0, 0.5)`` s after its first complete save.
  Survived = each of the two files is a complete version (the last reported or the next) and
  ``load_adapter`` accepts the directory. Also counted: directories whose two files come from
  different versions (``save_adapter`` swaps the pair in as one directory since that was
  found; before, each file was replaced atomically but not the pair) and temp files left.
* ``rankwise finetune``: a tiny BERT (built from a config) on a 48-row synthetic CSV, 24 steps,
  a checkpoint every step (two kept), killed ``U(0, 1.15) x T`` after its training starts
  (``config.yaml`` written, inputs loaded), where ``T`` is the time an uninterrupted run takes
  from there to writing its final ``adapter/`` — so most kills land in training and checkpoint
  writes, some in the final save, merge check and plot. Survived = every checkpoint left verifies, ``config.yaml`` parses, a final adapter
  (if any) is byte-identical to the uninterrupted run's, and ``--resume`` finishes with an
  ``adapter_model.safetensors`` byte-identical to the uninterrupted run's. A run that exits
  before its kill delay was not killed (its return code is not -SIGKILL): such trials are
  reported apart, not counted as survived kills.

Run: ``python benchmarks/crash_safety.py --trials 20 --seed 0`` (writes
``benchmarks/results/crash.json`` and ``crash.md``). Slow on a shared CPU: each finetune trial
is two process starts and up to two runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))

from rel_crashkit import finetune_trial, make_run_inputs, save_trial, timed_reference  # noqa: E402

from rankwise.io.files import atomic_write_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STEPS = 24  # optimizer steps per run, a checkpoint after each


def save_trials(n: int, rng: random.Random, root: Path) -> dict[str, Any]:
    trials = []
    for i in range(n):
        trial = save_trial(root / f"save-{i}" / "adapter", delay=rng.uniform(0.0, 0.5))
        trials.append(trial._asdict())
        print(f"save_adapter trial {i}: {'ok' if trial.ok else 'FAILED'} {trial}", flush=True)
    return {
        "trials": n,
        "killed": sum(t["killed"] for t in trials),  # the SIGKILL was delivered
        "survived": sum(t["ok"] and t["killed"] for t in trials),  # of the killed ones
        "not_killed": sum(not t["killed"] for t in trials),  # the child died by itself: failed
        "failed": sum(not t["ok"] for t in trials),
        "mixed_versions": sum(t["mixed"] for t in trials),
        "with_leftover_temp_files": sum(t["leftovers"] > 0 for t in trials),
        "versions_saved_before_kill_median": statistics.median(t["reported"] for t in trials),
        "details": trials,
    }


def finetune_trials(n: int, rng: random.Random, root: Path) -> dict[str, Any]:
    inputs = make_run_inputs(root)
    reference, duration = timed_reference(inputs, root / "reference", steps=STEPS)
    trials = []
    for i in range(n):
        delay = rng.uniform(0.0, 1.15) * duration
        trial = finetune_trial(
            inputs, root / f"run-{i}", delay=delay, reference=reference, steps=STEPS
        )
        trials.append(trial._asdict())
        state = (
            "FAILED" if trial.problems else "ok" if trial.killed else "ok, exited before the kill"
        )
        print(f"finetune trial {i}: {state} {trial}", flush=True)
    killed = [t for t in trials if t["killed"]]
    return {
        "trials": n,
        "training_seconds_to_adapter": duration,
        "killed": len(killed),  # the SIGKILL was delivered (returncode -SIGKILL)
        "survived": sum(not t["problems"] for t in killed),  # of the killed ones
        # the run finished before its kill delay: no kill happened, so no survival is claimed
        "not_killed": n - len(killed),
        "not_killed_clean": sum(not t["killed"] and not t["problems"] for t in trials),
        "failed": sum(bool(t["problems"]) for t in trials),
        "resumed_bit_identical": sum(t["resumed_identical"] for t in killed),
        "killed_before_first_checkpoint": sum(t["checkpoints"] == 0 for t in killed),
        "killed_after_final_adapter": sum(t["adapter_after_kill"] for t in killed),
        "with_leftover_temp_files": sum(t["leftovers"] > 0 for t in trials),
        "details": trials,
    }


def markdown(result: dict[str, Any], command: str) -> str:
    s, f = result["save_adapter"], result["finetune"]
    return "\n".join([
        "# Crash safety: SIGKILL at random moments",
        "",
        f"`{command}` — {result['seconds']:.0f} s.",
        "",
        "| process killed | trials | killed (SIGKILL delivered) | survived, of the killed | exited before the kill | notes |",
        "|---|---:|---:|---:|---:|---|",
        f"| `save_adapter` loop | {s['trials']} | {s['killed']} | {s['survived']} | "
        f"{s['not_killed']} (the loop never ends: a failure) | every file a complete version; "
        f"{s['mixed_versions']} directories with weights and config of different versions; "
        f"{s['with_leftover_temp_files']} with a leftover `.tmp` file |",
        f"| `rankwise finetune` | {f['trials']} | {f['killed']} | {f['survived']} | "
        f"{f['not_killed']} ({f['not_killed_clean']} finished cleanly and resumed to the same "
        f"adapter) | of the killed: `--resume` byte-identical adapter "
        f"{f['resumed_bit_identical']}/{f['killed']}, killed before the first checkpoint "
        f"{f['killed_before_first_checkpoint']}, after the final adapter "
        f"{f['killed_after_final_adapter']}; uninterrupted run: {f['training_seconds_to_adapter']:.1f} s from training start to adapter |",
        "",
        "A trial counts as a survived kill only if the process died of the SIGKILL (return code "
        "-9); a run that exited before its random kill delay was never killed and is reported "
        "apart (its files are still checked: an error exit or a bad directory fails it).",
        "",
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    rng = random.Random(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rankwise-crash-") as tmp:
        result: dict[str, Any] = {
            "save_adapter": save_trials(args.trials, rng, Path(tmp)),
            "finetune": finetune_trials(args.trials, rng, Path(tmp)),
        }
    result |= {"seconds": time.perf_counter() - start, "python": platform.python_version()}
    command = f"python benchmarks/crash_safety.py --trials {args.trials} --seed {args.seed}"
    args.out.mkdir(parents=True, exist_ok=True)
    data = json.dumps(result, indent=2, default=str) + "\n"
    atomic_write_bytes(args.out / "crash.json", data.encode("utf-8"))
    atomic_write_bytes(args.out / "crash.md", markdown(result, command).encode("utf-8"))
    print(markdown(result, command))
    # a trial with a problem (killed or not) fails the run; an unkilled clean one does not
    return 1 if result["save_adapter"]["failed"] or result["finetune"]["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
