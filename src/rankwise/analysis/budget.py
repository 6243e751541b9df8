"""Which weight matrices to adapt under a fixed parameter budget (LoRA paper, Sec. 7.1).

Hu et al. 2021 (Table 5) fix the number of trainable parameters and compare adapting
``{W_q}``, ``{W_k}``, ``{W_v}``, ``{W_o}``, ``{W_q, W_k}``, ``{W_q, W_v}`` and all four, at the
rank that spends the budget (r = 8, 4, 2 for one, two, four types of ``d × d`` matrices).
:func:`budget_plan` computes those ranks for any model: a LoRA of rank ``r`` on a linear
layer ``(out, in)`` trains ``r·(in + out)`` parameters, so the set ``S`` of types gets
``r_S = ⌊budget / Σ_{layers of S} (in + out)⌋``. Training each plan is the engine's job
(``rankwise analyze budget`` runs :mod:`rankwise.train` for every row).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from torch import nn

from rankwise.analysis.model import is_linear, linear_weight

# Short weight-type names -> module-name suffixes (BERT-style attention, as in MiniLM).
BERT_TYPES: dict[str, str] = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
}
# The sets of Table 5 of the LoRA paper.
PAPER_SETS: tuple[tuple[str, ...], ...] = (
    ("q",),
    ("k",),
    ("v",),
    ("o",),
    ("q", "k"),
    ("q", "v"),
    ("q", "k", "v", "o"),
)


class BudgetPlan(NamedTuple):
    """One row of the comparison: which types, which modules, at which rank, for how many params."""

    types: tuple[str, ...]  # e.g. ("q", "v")
    targets: tuple[str, ...]  # module-name suffixes for LoraConfig.target_modules
    layers: int  # number of adapted linear layers
    rank: int
    params: int  # trainable LoRA parameters: rank · Σ (in + out)


def _adapted(model: nn.Module, targets: Sequence[str], task_type: str | None) -> list[str]:
    """The modules a LoRA with these targets adapts (``inject``'s own resolution, dry run:
    a classification head under ``task_type="SEQ_CLS"`` is trained in full, not adapted)."""
    from rankwise.lora import LoraConfig, inject

    config = LoraConfig(r=1, target_modules=list(targets), task_type=task_type)
    return list(inject(model, config, dry_run=True))


def _linear_shapes(
    model: nn.Module, targets: Sequence[str], task_type: str | None
) -> list[tuple[int, int]]:
    """``(out, in)`` of each layer LoRA adapts for ``targets``; they must all be linear
    (``nn.Linear`` or ``Conv1D``)."""
    modules = dict(model.named_modules())
    shapes = []
    for name in _adapted(model, targets, task_type):
        if not is_linear(modules[name]):
            raise KeyError(
                f"module {name!r} is a {type(modules[name]).__name__}; the budget plan covers "
                "linear layers (nn.Linear, Conv1D)"
            )
        out_features, in_features = linear_weight(modules[name]).shape
        shapes.append((int(out_features), int(in_features)))
    return shapes


def cost_per_rank(
    model: nn.Module, targets: Sequence[str], *, task_type: str | None = None
) -> tuple[int, int]:
    """``(layers, Σ (in + out))`` over the layers LoRA adapts for ``targets`` (all linear)."""
    shapes = _linear_shapes(model, targets, task_type)
    return len(shapes), sum(o + i for o, i in shapes)


def check_sets(sets: Sequence[Sequence[str]]) -> None:
    """A ValueError for a type named twice in one set (``qq``) or a set given twice, in any
    order (``qv`` and ``vq``): each would train and report the same runs again."""
    seen: dict[frozenset[str], str] = {}
    for group in sets:
        name = "".join(group)
        twice = sorted({t for t in group if list(group).count(t) > 1})
        if twice:
            raise ValueError(f"set {name!r} names {', '.join(twice)} more than once")
        key = frozenset(group)
        if key in seen:
            same = "given twice" if seen[key] == name else f"is the set {seen[key]!r} again"
            raise ValueError(f"set {name!r} {same}")
        seen[key] = name


def budget_plan(
    model: nn.Module,
    *,
    budget: int | None = None,
    rank: int | None = None,
    sets: Sequence[Sequence[str]] = PAPER_SETS,
    types: Mapping[str, str] = BERT_TYPES,
    task_type: str | None = None,
) -> tuple[BudgetPlan, ...]:
    """The rank of each set of weight types that spends ``budget`` trainable parameters.

    Give ``budget`` directly, or ``rank``: the budget of rank ``rank`` on the first set (the
    paper's 18M = r 8 on one type of GPT-3's matrices). Layers are those ``inject`` adapts on
    ``model`` (with ``task_type``, as the training run will). Refused by name: a type that
    matches no layer (also inside a set), a set that cannot afford rank 1, and a rank above
    ``min(out, in)`` of one of the set's layers.
    """
    if (budget is None) == (rank is None):
        raise ValueError(f"give exactly one of budget and rank; found budget={budget}, rank={rank}")
    for name, value in (("budget", budget), ("rank", rank)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be a positive integer; found {value!r}")
    if len(sets) == 0:
        raise ValueError("sets must hold at least one set of weight types; found none")
    check_sets(sets)
    resolved = []
    for group in sets:
        unknown = [t for t in group if t not in types]
        if unknown or not group:
            raise KeyError(f"weight types {list(group)}: unknown {unknown}; known {sorted(types)}")
        for t in group:  # each type on its own: a typo must not vanish inside a set
            try:
                _adapted(model, [types[t]], task_type)
            except ValueError as err:
                raise KeyError(
                    f"weight type {t!r} ({types[t]}) in {list(group)} matches no layer: {err}"
                ) from None
        targets = tuple(types[t] for t in group)
        shapes = _linear_shapes(model, targets, task_type)
        cost, side = sum(o + i for o, i in shapes), min(min(shape) for shape in shapes)
        resolved.append((tuple(group), targets, len(shapes), cost, side))
    smaller = "a smaller budget"
    if budget is None:
        budget = rank * resolved[0][3]  # type: ignore[operator]
        smaller = f"a smaller rank (the budget is rank {rank} on {list(resolved[0][0])})"
    plans = []
    for group, targets, layers, cost, side in resolved:
        r = budget // cost
        if r < 1:
            raise ValueError(
                f"budget {budget} cannot give {list(group)} rank 1 (needs {cost} parameters)"
            )
        if r > side:
            raise ValueError(
                f"budget {budget} gives {list(group)} rank {r}, above min(out, in) = {side} of "
                f"one of its layers; choose {smaller}"
            )
        plans.append(BudgetPlan(group, targets, layers, r, r * cost))
    return tuple(plans)
