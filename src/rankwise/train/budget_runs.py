"""The runs of an equal-budget comparison (LoRA paper Sec. 7.1, Table 5): one fine-tuning run
per set of adapted weight types, each at the rank its plan gives
(:func:`rankwise.analysis.budget.budget_plan`), with ``alpha = 2r`` (scaling 2 in every run).
``rankwise analyze budget`` plans and prints; this module runs and records.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rankwise.analysis.budget import BudgetPlan
from rankwise.io.files import atomic_write_bytes
from rankwise.train.config import from_mapping
from rankwise.train.evaluate import EvalResult

SUMMARY_FILE = "budget.json"


def budget_runs(
    plans: Sequence[BudgetPlan],
    output: Path,
    options: Mapping[str, Any],
    *,
    progress: Callable[[str], None] = print,
) -> list[EvalResult | None]:
    """Fine-tune once per plan into ``output/<types>`` (``options``: the finetune options every
    run shares, e.g. model, data, max_steps, seed); returns each run's held-out result.

    Every run directory and ``output/budget.json`` are checked before the first run starts
    (none may hold another run's files), and the summary is rewritten atomically after every
    run, so finished runs survive a later failure."""
    from rankwise.train import train

    names = ["".join(plan.types) for plan in plans]  # distinct: check_sets
    for name in names:
        target = output / name
        if target.is_file() or (target.is_dir() and any(target.iterdir())):
            raise FileExistsError(
                f"--output: {str(target)!r} exists and is not empty; choose another --output"
            )
    summary = output / SUMMARY_FILE
    if summary.exists():  # another comparison's table: replacing it would lose its rows
        raise FileExistsError(
            f"--output: {str(summary)!r} already holds another comparison; choose another --output"
        )
    results: list[EvalResult | None] = []
    for plan, name in zip(plans, names, strict=True):
        progress(
            f"[budget] {name}: rank {plan.rank} on {plan.layers} layers, {plan.params} parameters"
        )
        config = from_mapping(
            {
                **options,
                "r": plan.rank,
                "alpha": 2.0 * plan.rank,  # scaling alpha / r = 2 in every run
                "targets": list(plan.targets),
                "save_every": 0,
                "output": str(output / name),
            }
        )
        results.append(train(config, echo=lambda _line: None).after)
        rows = [
            {**p._asdict(), "accuracy": getattr(r, "accuracy", None),
             "loss": getattr(r, "loss", None)}
            for p, r in zip(plans, results)
        ]  # fmt: skip
        atomic_write_bytes(summary, json.dumps(rows, indent=2).encode("utf-8"))
    return results
