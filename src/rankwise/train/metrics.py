"""``metrics.jsonl`` (one JSON object per logged step) and ``training_curve.png``.

Each line holds ``step`` and some of ``loss``, ``lr``, ``examples_per_s``, ``epoch`` and
evaluation metrics prefixed ``eval_`` (``eval_accuracy``, ``eval_loss``, ``eval_perplexity``).
Lines are appended and flushed as they come, so a killed run keeps its history; on resume the
lines after the checkpoint's step are dropped (they will be produced again, identically).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rankwise.io.files import default_file_mode
from rankwise.train.config import atomic_write_text

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "training_curve.png"


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``: JSON objects with an integer ``step``. Anything else
    (a torn last line from a kill, bytes that are not UTF-8, a hand-edited line) is skipped,
    and so is a value that is not a number under a numeric key (``loss``, ``lr``, ``eval_*``).
    """
    file = Path(path)
    if not file.is_file():
        return []
    records = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            continue
        if not isinstance(record, dict) or not _is_int(record.get("step")):
            continue
        records.append({k: v for k, v in record.items() if k not in NUMERIC or _is_number(v)})
    return records


NUMERIC = ("loss", "lr", "eval_loss", "eval_accuracy", "eval_perplexity")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsLog:
    """Appends records to ``<dir>/metrics.jsonl``; inactive (writes nothing) when ``enabled`` is False."""

    def __init__(self, directory: str | os.PathLike[str], *, enabled: bool = True) -> None:
        self.path = Path(directory) / METRICS_FILE
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (atomically), before a resumed run appends."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(record)) + "\n")
            handle.flush()


def plot_training_curve(metrics: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Loss (and evaluation metrics) against step, saved as a PNG (matplotlib's Agg canvas on
    a ``Figure``, never pyplot: the caller's backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = {
        key: [(r["step"], r[key]) for r in records if key in r]
        for key in ("eval_accuracy", "eval_perplexity")
    }
    evals = {k: v for k, v in evals.items() if v}
    fig = Figure(figsize=(5 * (1 + len(evals)), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(evals), squeeze=False)
    ax = axes[0][0]
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, lw=0.6, alpha=0.5, label="per step")
        window = max(1, len(losses) // 20)  # moving average over ~5% of the run
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1])
            / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, smooth, lw=1.6, label=f"mean of {window}")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    for ax, (key, points) in zip(axes[0][1:], evals.items()):
        ax.plot(*zip(*points), marker="o")
        ax.set_xlabel("optimizer step")
        ax.set_title(key.replace("eval_", "held-out "))
    fig.tight_layout()
    target = Path(out)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
