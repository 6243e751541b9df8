"""The LoRA-study script's aggregation, claims and markdown on synthetic adapters (no training).

``benchmarks/lora_study_sst2.py`` is a script, not a package module, so it is loaded from its
path. Factors are random (seeded); only the pure functions run here.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from rankwise.analysis import ModuleAmplification, amplification

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lora_study_sst2.py"


def _load():
    spec = importlib.util.spec_from_file_location("lora_study_sst2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # NamedTuple classes need their module registered
    spec.loader.exec_module(module)
    return module


study = _load()
D_IN, D_OUT, LAYERS = 48, 40, 3


def _name(layer: int, kind: str) -> str:
    return f"bert.encoder.layer.{layer}.attention.self.{kind}"


def _adapter(r: int, seed: int, *, factor: str = "A") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (r, D_IN) if factor == "A" else (D_OUT, r)
    return {
        _name(layer, kind): torch.randn(*shape, generator=gen)
        for layer in range(LAYERS)
        for kind in ("query", "value")
    }


def test_module_key_reads_layer_and_type_from_any_prefix():
    assert study.module_key(_name(3, "value")) == (3, "value")
    assert study.module_key("encoder.layer.12.attention.self.query") == (12, "query")
    with pytest.raises(KeyError, match="no_layer_here"):
        study.module_key("no_layer_here")


def test_identical_adapters_share_every_direction_and_the_claim_says_shared():
    A = _adapter(8, 0)
    rows = study.similarity_rows(A, {k: v.clone() for k, v in A.items()}, factor="A")
    assert [r.module for r in rows] == [
        f"layer.{i}.{k}" for i in range(3) for k in ("query", "value")
    ]
    sims = study.summarize_similarity(rows, comparison="r8 vs r64", factor="A")
    assert {s.kind for s in sims} == {"query", "value"}
    for s in sims:
        assert s.top_phi == pytest.approx((1.0,) * LAYERS, abs=1e-5)
        assert s.shared == LAYERS
        assert s.grid_median == pytest.approx(1.0, abs=1e-5)
    claim = study.similarity_claim(sims, factor="A")
    assert "query: shared" in claim and "value: shared" in claim and "3 of 3" in claim
    half = [s._replace(modules=2 * s.shared) for s in sims]  # exactly half: not a majority
    assert "query: not shared" in study.similarity_claim(half, factor="A")


def test_independent_random_adapters_are_near_the_random_expectation_and_not_shared():
    rows = study.similarity_rows(_adapter(4, 1), _adapter(16, 2), factor="A")
    sims = study.summarize_similarity(rows, comparison="r8 vs r64", factor="A")
    for s in sims:
        assert s.random_median == pytest.approx(study.random_grid_median(4, 16, D_IN))
        assert s.grid_median < 3 * s.random_median  # no planted overlap
    assert "not shared" in study.similarity_claim(sims, factor="A")


def test_random_grid_median_is_the_median_of_max_i_j_over_d():
    # i <= 2, j <= 3: max(i, j) = [[1, 2, 3], [2, 2, 3]] -> median (torch: lower) 2
    assert study.random_grid_median(2, 3, 10) == pytest.approx(0.2)


def test_b_factors_are_compared_by_their_column_space():
    B = _adapter(8, 3, factor="B")
    planted = {k: torch.cat([v[:, :1], _adapter(7, 4, factor="B")[k]], dim=1) for k, v in B.items()}
    rows = study.similarity_rows(B, B, factor="B")
    assert all(r.dim == D_OUT and r.phi.shape == (8, 8) for r in rows)
    # a shared column raises phi(8, 8) well above an unrelated adapter's
    shared = study.similarity_rows(B, planted, factor="B")
    unrelated = study.similarity_rows(B, _adapter(8, 5, factor="B"), factor="B")
    assert all(float(s.phi[-1, -1]) > float(u.phi[-1, -1]) for s, u in zip(shared, unrelated))


def test_init_overlap_and_delta_a():
    large = _adapter(16, 0)
    small = {k: v[:8].clone() for k, v in large.items()}
    small[_name(1, "value")] = small[_name(1, "value")] + 1.0
    assert study.init_overlap(small, large) == [
        "layer.0.query", "layer.0.value", "layer.1.query", "layer.2.query", "layer.2.value"
    ]  # fmt: skip
    before = {k: v.clone() for k, v in small.items()}
    delta = study.delta_A(small, small)
    assert all(float(d.abs().max()) == 0.0 for d in delta.values())
    assert all(torch.equal(small[k], before[k]) for k in small)  # inputs untouched
    assert study.relative_change(small, small) == 0.0


def _amp_rows(scale: float, r: int) -> list[ModuleAmplification]:
    gen = torch.Generator().manual_seed(r)
    rows = []
    for layer in range(LAYERS):
        for kind in ("query", "value"):
            W = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)
            delta = (
                scale
                * torch.randn(D_OUT, r, generator=gen, dtype=torch.float64)
                @ torch.randn(r, D_IN, generator=gen, dtype=torch.float64)
            )
            rows.append(ModuleAmplification(_name(layer, kind), amplification(W, delta, rank=r)))
    return rows


def test_amplification_medians_and_the_small_r_rule():
    amps = []
    for r, scale in ((4, 10.0), (16, 0.1)):
        rows = _amp_rows(scale, r)
        summary = study.summarize_amplification(rows, r=r)
        q = [row.amplification.factor for row in rows if row.module.endswith("query")]
        assert summary[0].kind == "query" and summary[0].factor == pytest.approx(sorted(q)[1])
        amps.extend(summary)
    claim = study.amplification_claim(amps)
    assert claim.count("larger at small r") == 2 and "NOT" not in claim
    flipped = [a._replace(factor=1.0 / a.factor) for a in amps]
    assert "NOT larger at small r" in study.amplification_claim(flipped)


def test_budget_claim_names_the_winner_and_judges_the_margin():
    rows = [
        {"types": ["q"], "accuracy": 0.80},
        {"types": ["q", "v"], "accuracy": 0.86},
        {"types": ["q", "k", "v", "o"], "accuracy": 0.85},
    ]
    claim = study.budget_claim(rows, dev_size=872)
    assert "{q,v} wins (86.00%)" in claim and "agrees with" in claim and "within noise" in claim
    rows[0]["accuracy"] = 0.95
    claim = study.budget_claim(rows, dev_size=872)
    assert "{q} wins" in claim and "differs from" in claim and "beyond two standard errors" in claim
    assert "fewer than two" in study.budget_claim(rows[:1], dev_size=872)
    rows.append({"types": ["o"], "accuracy": None})  # a set not trained yet
    assert study.budget_claim(rows, dev_size=872).endswith("not run yet: {o}.")


def test_markdown_from_a_report_holds_every_table_and_claim():
    A8, A64 = _adapter(8, 0), _adapter(16, 1)
    sims = study.summarize_similarity(
        study.similarity_rows(A8, A8, factor="A"), comparison="r8 vs r64", factor="A"
    )
    amps = study.summarize_amplification(_amp_rows(1.0, 4), r=4)
    budget = [{"types": ["q", "v"], "r": 4, "layers": 12, "params": 36864, "accuracy": 0.8}]
    run = {"name": "r8-s0", "r": 8, "alpha": 16.0, "scaling": 2.0, "seed": 0, "examples": 16000,
           "accuracy_before": 0.5, "accuracy": 0.85, "seconds": 100.0}  # fmt: skip
    report = {
        "command": "python benchmarks/lora_study_sst2.py --work w",
        "date": "today",
        "settings": {
            "max_steps": 1000,
            "batch_size": 16,
            "lr": 5e-4,
            "max_length": 64,
            "dropout": 0.1,
        },  # fmt: skip
        "dev_size": 872,
        "runs": [run],
        "init_check": {
            "modules_with_equal_initial_A_r8_r64": study.init_overlap(A8, A64),
            "median_relative_change_of_A_r8": 0.1,
            "median_relative_change_of_A_r64": 0.2,
        },
        "similarity": [s._asdict() for s in sims],
        "amplification": [a._asdict() for a in amps],
        "budget": budget,
        "claims": study.claims(sims, amps, budget, dev_size=872),
        "figures": ["lora_study_budget.png"],
    }
    text = study.markdown(report)
    assert "16,000 training examples" in text and "| r8-s0 | 8 | 16 | 2 | 0 | 16,000 |" in text
    assert "| r8 vs r64 | A | query | 1.00 1.00 1.00 | 1.00 | 3/3 |" in text
    assert "| {q,v} | 4 | 12 | 36,864 | 80.00 |" in text
    assert "in: no module" in text and "stays near its random initialization" in text
    for claim in report["claims"]:
        assert claim in text
    assert not any(math.isnan(a.factor) for a in amps)
