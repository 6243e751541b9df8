"""The parameter-budget plan of the LoRA paper's Table 5 on a tiny BERT."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rankwise.analysis.budget import PAPER_SETS, budget_plan  # noqa: E402


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=99,
    )
    return transformers.BertModel(config)


def test_paper_ranks_for_square_attention_matrices() -> None:
    plans = budget_plan(_bert(), rank=8)
    assert [p.types for p in plans] == list(PAPER_SETS)
    assert [p.rank for p in plans] == [8, 8, 8, 8, 4, 4, 2]  # Table 5: 8 / 4 / 2
    assert {p.params for p in plans} == {8 * 3 * 64}  # every row spends the same budget
    assert all(p.layers == 3 * len(p.types) for p in plans)


def test_plan_counts_real_lora_parameters() -> None:
    peft = pytest.importorskip("peft")
    model = _bert()
    for plan in budget_plan(model, budget=1000, sets=[("q", "v"), ("o",)]):
        config = peft.LoraConfig(r=plan.rank, target_modules=list(plan.targets))
        wrapped = peft.get_peft_model(model, config)
        trainable = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
        assert trainable == plan.params <= 1000
        model = wrapped.unload()


def test_budget_errors_name_the_culprit() -> None:
    model = _bert()
    with pytest.raises(ValueError, match="cannot give"):
        budget_plan(model, budget=10)
    with pytest.raises(KeyError, match="unknown"):
        budget_plan(model, rank=2, sets=[("x",)])
    with pytest.raises(ValueError, match="exactly one"):
        budget_plan(model)
