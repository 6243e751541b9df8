"""How much of a model trains: ``trainable 0.34M / 22.7M (1.49%)``, with a per-type split."""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from rankwise.lora.layers import LoraLayer


class TypeCount(NamedTuple):
    """Trainable and total parameters owned by one kind of module."""

    trainable: int
    total: int


class TrainableReport(NamedTuple):
    """Trainable vs total parameters (shared parameters counted once).

    ``by_type`` maps a category to its counts: ``"lora"`` for adapter factors, otherwise the
    class name of the module that owns the parameter (``"Linear"``, ``"LayerNorm"``, …).
    """

    trainable: int
    total: int
    by_type: dict[str, TypeCount]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        scale, unit = _unit(self.total)
        t, n = self.trainable / scale, self.total / scale
        t_text = f"{t:.3g}{unit}" if t >= 1 or t == 0 else f"{t:.2f}{unit}"
        if 0 < t < 0.1:  # 0.00M or two digits at most: in its own unit (1.09K / 1M)
            t_text = _own_unit(self.trainable)
        pct = self.percent
        pct_text = f"{pct:.2f}" if pct >= 0.01 or pct == 0 else f"{pct:.2g}"
        return f"trainable {t_text} / {n:.3g}{unit} ({pct_text}%)"

    def table(self) -> str:
        """One line per category: ``name  trainable / total``."""
        rows = sorted(self.by_type.items(), key=lambda kv: -kv[1].total)
        return "\n".join(f"{k:<24} {v.trainable:>12,} / {v.total:>12,}" for k, v in rows)


def _own_unit(n: int) -> str:
    """``n`` to 3 significant figures in the smallest unit that keeps it below 1000 once
    rounded (999,999 is 1M, not 1e+03K)."""
    for scale, unit in ((1.0, ""), (1e3, "K"), (1e6, "M")):
        text = f"{n / scale:.3g}"
        if float(text) < 1000:
            return text + unit
    return f"{n / 1e9:.3g}B"


def _unit(n: int) -> tuple[float, str]:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return scale, unit
    return 1.0, ""


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count trainable vs total parameters of ``model``, split by owning module type."""
    by_type: dict[str, list[int]] = {}
    seen: set[int] = set()
    for module in model.modules():  # parents before children
        if isinstance(module, LoraLayer):
            # the adapter's own tensors (lora_A / lora_B / lora_embedding_*), not the base layer's
            owned = [p for n, p in module.named_parameters() if not n.startswith("base_layer.")]
            key = "lora"
        else:
            owned = list(module.parameters(recurse=False))
            key = type(module).__name__
        for p in owned:
            if id(p) in seen:
                continue
            seen.add(id(p))
            counts = by_type.setdefault(key, [0, 0])
            counts[1] += p.numel()
            counts[0] += p.numel() if p.requires_grad else 0
    trainable = sum(c[0] for c in by_type.values())
    total = sum(c[1] for c in by_type.values())
    return TrainableReport(trainable, total, {k: TypeCount(*v) for k, v in by_type.items()})
