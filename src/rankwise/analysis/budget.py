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

from rankwise.analysis.model import is_linear, linear_weight, matches_name

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


def cost_per_rank(model: nn.Module, targets: Sequence[str]) -> tuple[int, int]:
    """``(layers, Σ (in + out))`` over the linear layers whose names match ``targets``."""
    layers, cost = 0, 0
    for name, module in model.named_modules():
        if is_linear(module) and any(matches_name(name, t) for t in targets):
            out_features, in_features = linear_weight(module).shape
            layers, cost = layers + 1, cost + out_features + in_features
    return layers, cost


def budget_plan(
    model: nn.Module,
    *,
    budget: int | None = None,
    rank: int | None = None,
    sets: Sequence[Sequence[str]] = PAPER_SETS,
    types: Mapping[str, str] = BERT_TYPES,
) -> tuple[BudgetPlan, ...]:
    """The rank of each set of weight types that spends ``budget`` trainable parameters.

    Give ``budget`` directly, or ``rank``: the budget of rank ``rank`` on the first set (the
    paper's 18M = r 8 on one type of GPT-3's matrices). A set that cannot afford rank 1 is an
    error naming it.
    """
    if (budget is None) == (rank is None):
        raise ValueError(f"give exactly one of budget and rank; found budget={budget}, rank={rank}")
    resolved = []
    for group in sets:
        unknown = [t for t in group if t not in types]
        if unknown or not group:
            raise KeyError(f"weight types {list(group)}: unknown {unknown}; known {sorted(types)}")
        targets = tuple(types[t] for t in group)
        layers, cost = cost_per_rank(model, targets)
        if layers == 0:
            raise KeyError(
                f"weight types {list(group)} ({', '.join(targets)}) match no linear layer"
            )
        resolved.append((tuple(group), targets, layers, cost))
    if budget is None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer; found {rank!r}")
        budget = rank * resolved[0][3]
    plans = []
    for group, targets, layers, cost in resolved:
        r = budget // cost
        if r < 1:
            raise ValueError(
                f"budget {budget} cannot give {list(group)} rank 1 (needs {cost} parameters)"
            )
        plans.append(BudgetPlan(group, targets, layers, r, r * cost))
    return tuple(plans)
