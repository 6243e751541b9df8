"""Plain-text tables of the per-module reports (what the command line prints).

Each ``*_table`` function turns report rows into ``(headers, rows)`` of strings with the
summary columns that answer the LoRA paper's questions; :func:`format_table` aligns them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rankwise.analysis.adapters import LayerReport, ModuleSimilarity, ModuleSpectrum
from rankwise.analysis.budget import BudgetPlan
from rankwise.analysis.model import ModuleAmplification
from rankwise.linalg import rank_for_energy

Table = tuple[list[str], list[list[str]]]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned (text left, numbers right), a rule under the header."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in rows) and bool(rows) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text in ("inf", "-", "")
    return True


def _g(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}"


def similarity_table(rows: Sequence[ModuleSimilarity]) -> Table:
    """φ(1,1), φ(1,r₂) and φ(r₁,r₂), with ``max(r₁,r₂)/d``: E φ(r₁,r₂) for random subspaces."""
    headers = ["module", "r1", "r2", "phi(1,1)", "phi(1,r2)", "phi(r1,r2)", "random(r1,r2)"]
    body = [
        [
            row.module,
            str(row.rank1),
            str(row.rank2),
            f"{float(row.phi[0, 0]):.3f}",
            f"{float(row.phi[0, -1]):.3f}",
            f"{float(row.phi[-1, -1]):.3f}",
            f"{max(row.rank1, row.rank2) / row.dim:.3f}",
        ]
        for row in rows
    ]
    return headers, body


def spectrum_table(rows: Sequence[ModuleSpectrum]) -> Table:
    """σ₁, stable and effective rank, and the ranks keeping 90% / 99% of ``‖ΔW‖_F²``."""
    headers = [
        "module",
        "shape",
        "r",
        "sigma1",
        "stable_rank",
        "effective_rank",
        "rank@90%",
        "rank@99%",
    ]
    body = []
    for row in rows:
        s = row.spectrum
        zero = float(s.singular_values.max()) == 0.0
        body.append(
            [
                row.module,
                f"{row.shape[0]}x{row.shape[1]}",
                str(row.rank),
                _g(float(s.singular_values[0])),
                _g(s.stable_rank),
                _g(s.effective_rank),
                "-" if zero else str(rank_for_energy(s.singular_values, 0.9)),
                "-" if zero else str(rank_for_energy(s.singular_values, 0.99)),
            ]
        )
    return headers, body


def amplification_table(rows: Sequence[ModuleAmplification]) -> Table:
    """The LoRA paper's Table 7 per module: ‖UᵀWV‖_F on ΔW's, W's own and random directions."""
    headers = ["module", "r", "|dW|", "|U'WV| dW", "|U'WV| W", "|U'WV| random", "|W|", "factor"]
    body = [
        [
            row.module,
            str(a.rank),
            _g(a.delta_norm),
            _g(a.delta_directions),
            _g(a.weight_directions),
            _g(a.random_directions),
            _g(a.weight_norm),
            _g(a.factor),
        ]
        for row in rows
        for a in [row.amplification]
    ]
    return headers, body


def budget_table(plans: Sequence[BudgetPlan], results: Sequence[Any]) -> Table:
    """The LoRA paper's Table 5: held-out accuracy (and loss) per set of adapted weight types.

    ``results`` are the engine's held-out evaluations (fields ``accuracy``, ``loss``), one per plan.
    """
    headers = ["types", "rank", "layers", "params", "accuracy", "loss"]
    body = []
    for plan, result in zip(plans, results):
        accuracy = getattr(result, "accuracy", None)
        loss = getattr(result, "loss", None)
        body.append(
            [
                "{" + ",".join(plan.types) + "}",
                str(plan.rank),
                str(plan.layers),
                str(plan.params),
                "-" if accuracy is None else f"{100 * accuracy:.2f}",
                "-" if loss is None else f"{loss:.4f}",
            ]
        )
    return headers, body


def layer_table(rows: Sequence[LayerReport]) -> Table:
    """Per-module rank before/after and the relative Frobenius error of the new update."""
    headers = ["module", "shape", "source_rank", "rank", "rel_error"]
    body = [
        [
            r.module,
            f"{r.shape[0]}x{r.shape[1]}",
            str(r.source_rank),
            str(r.rank),
            f"{r.relative_error:.3e}",
        ]
        for r in rows
    ]
    return headers, body
