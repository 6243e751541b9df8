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
    # the advice names what was given: it said "a smaller budget" to a caller who gave a rank
    with pytest.raises(ValueError, match=r"choose a smaller rank \(the budget is rank 40 on"):
        budget_plan(model, rank=40)
    with pytest.raises(ValueError, match="above min.*choose a smaller budget$"):
        budget_plan(model, budget=40 * 64 * 3)


def test_plan_refuses_a_type_that_matches_nothing_inside_a_set_and_bad_values() -> None:
    model = _bert()
    types = {"q": "attention.self.query", "o": "out_proj"}  # a typo for this model
    with pytest.raises(KeyError, match="weight type 'o' \\(out_proj\\) in \\['q', 'o'\\]"):
        budget_plan(model, rank=1, sets=[("q",), ("q", "o")], types=types)
    for bad in (100.0, True, 0):
        with pytest.raises(ValueError, match="budget must be a positive integer"):
            budget_plan(model, budget=bad)
    with pytest.raises(ValueError, match="at least one set"):
        budget_plan(model, rank=2, sets=[])
    # 32x32 matrices: rank 41 would train more than the matrices themselves
    with pytest.raises(ValueError, match="rank 41, above min\\(out, in\\) = 32"):
        budget_plan(model, budget=8000, sets=[("q", "k", "v", "o"), ("q",)])


def test_plan_counts_what_inject_adapts_on_a_classification_model() -> None:
    from rankwise.lora import LoraConfig, inject

    config = transformers.RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=100,
    )  # fmt: skip
    model = transformers.RobertaForSequenceClassification(config)
    (plan,) = budget_plan(model, rank=2, sets=[("d",)], types={"d": "dense"}, task_type="SEQ_CLS")
    assert plan.layers == 6  # classifier.dense is the trained head, not adapted
    inject(model, LoraConfig(r=plan.rank, target_modules=["dense"], task_type="SEQ_CLS"))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == plan.params


def test_plan_refuses_a_set_repeated_in_another_order_or_with_a_type_twice() -> None:
    """Only a literally repeated set was refused (by the CLI): ``qv,vq`` and ``qq,q`` trained
    and reported the same runs twice."""
    model = _bert()
    for sets, message in (
        ([("q", "v"), ("v", "q")], "set 'vq' is the set 'qv' again"),
        ([("q", "q"), ("q",)], "set 'qq' names q more than once"),
        ([("q",), ("q",)], "set 'q' given twice"),
    ):
        with pytest.raises(ValueError, match=message):
            budget_plan(model, rank=1, sets=sets)
