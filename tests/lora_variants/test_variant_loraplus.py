"""LoRA+ parameter groups: B at lr·ratio, embeddings apart, the same groups as PEFT."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from lora_testkit import tiny_bert_cls

from rankwise.lora import LoraConfig, inject
from rankwise.lora.loraplus import create_loraplus_optimizer, loraplus_param_groups

TARGETS = ["query", "value", "word_embeddings"]


def _summary(groups: list[dict]) -> Counter:
    return Counter(
        (tuple(p.shape), float(g["lr"]), float(g["weight_decay"]))
        for g in groups
        for p in g["params"]
    )


@pytest.mark.parametrize("use_dora", [False, True])  # DoRA: an embedding's magnitude is group B
def test_groups_match_peft(use_dora: bool) -> None:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from peft.optimizers import create_loraplus_optimizer as peft_create

    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, task_type="SEQ_CLS", use_dora=use_dora)
    theirs = peft_create(
        get_peft_model(tiny_bert_cls(), PeftConfig(**cfg)),
        torch.optim.AdamW,
        lr=1e-3,
        loraplus_lr_ratio=8.0,
        loraplus_weight_decay=0.1,
    )
    ours = create_loraplus_optimizer(
        inject(tiny_bert_cls(), LoraConfig(**cfg)),
        torch.optim.AdamW,
        1e-3,
        ratio=8.0,
        weight_decay=0.1,
    )
    assert _summary(ours.param_groups) == _summary(theirs.param_groups)


def test_peft_call_works_as_it_is() -> None:
    """PEFT's keyword names (loraplus_lr_ratio, ...; other keywords to the optimizer) were a
    TypeError: a ported call now gives PEFT's groups and optimizer defaults."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from peft.optimizers import create_loraplus_optimizer as peft_create

    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, task_type="SEQ_CLS")
    call = dict(lr=1e-3, loraplus_lr_ratio=8.0, loraplus_weight_decay=0.1,
                loraplus_lr_embedding=1e-5, betas=(0.8, 0.9))  # fmt: skip
    theirs = peft_create(get_peft_model(tiny_bert_cls(), PeftConfig(**cfg)), torch.optim.AdamW,
                         **call)  # fmt: skip
    ours = create_loraplus_optimizer(inject(tiny_bert_cls(), LoraConfig(**cfg)),
                                     torch.optim.AdamW, **call)  # fmt: skip
    assert _summary(ours.param_groups) == _summary(theirs.param_groups)
    assert {g["betas"] for g in ours.param_groups} == {(0.8, 0.9)}
    model = inject(tiny_bert_cls(), LoraConfig(**cfg))
    with pytest.raises(TypeError, match="ratio= and loraplus_lr_ratio="):
        create_loraplus_optimizer(model, torch.optim.AdamW, 1e-3, ratio=2, loraplus_lr_ratio=8)
    with pytest.raises(TypeError, match="'betas' is given both"):
        create_loraplus_optimizer(model, torch.optim.AdamW, 1e-3, betas=(0.8, 0.9),
                                  optimizer_kwargs={"betas": (0.9, 0.99)})  # fmt: skip
    with pytest.raises(ValueError, match="'weight_decay' .*pass weight_decay="):
        create_loraplus_optimizer(model, torch.optim.AdamW, 1e-3, weight_decay=0.1,
                                  optimizer_kwargs={"weight_decay": 0.3})  # fmt: skip
    with pytest.raises(ValueError, match="the optimizer keyword 'params' is set by"):
        create_loraplus_optimizer(model, torch.optim.AdamW, 1e-3, params=[])
    # PEFT takes weight_decay= beside loraplus_weight_decay= (its groups override the former)
    theirs = peft_create(get_peft_model(tiny_bert_cls(), PeftConfig(**cfg)), torch.optim.AdamW,
                         weight_decay=0.3, **call)  # fmt: skip
    with pytest.warns(RuntimeWarning, match="weight_decay=0.3 is overridden by loraplus_weight"):
        ours = create_loraplus_optimizer(inject(tiny_bert_cls(), LoraConfig(**cfg)),
                                         torch.optim.AdamW, weight_decay=0.3, **call)  # fmt: skip
    assert _summary(ours.param_groups) == _summary(theirs.param_groups)


def test_roles() -> None:
    model = inject(tiny_bert_cls(), LoraConfig(r=4, target_modules=TARGETS, task_type="SEQ_CLS"))
    groups = {g["name"]: g for g in loraplus_param_groups(model, 2e-4, ratio=16)}
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert all("lora_B" in n for n in by_group["B"] if n.endswith("weight") and "lora" in n)
    assert all(n.endswith("lora_A.weight") or n.startswith("classifier") for n in by_group["A"])
    assert all("lora_embedding" in n for n in by_group["embedding"])
    assert groups["B"]["lr"] == pytest.approx(16 * 2e-4) and groups["A"]["lr"] == 2e-4
    assert groups["embedding"]["lr"] == 1e-6
    assert "classifier.bias" in by_group["B_no_decay"] and groups["B_no_decay"]["weight_decay"] == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*by_group.values()) == trainable


def test_bad_values_are_named() -> None:
    model = inject(tiny_bert_cls(), LoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(ValueError, match="ratio"):
        loraplus_param_groups(model, 1e-3, ratio=0)
    with pytest.raises(ValueError, match="lr: expected a finite positive number"):
        loraplus_param_groups(model, float("inf"))
    with pytest.raises(ValueError, match="weight_decay: expected a finite number"):
        loraplus_param_groups(model, 1e-3, weight_decay=float("nan"))
    with pytest.raises(ValueError, match="lr"):
        create_loraplus_optimizer(model, torch.optim.SGD, 1e-3, optimizer_kwargs={"lr": 1.0})
    # every group sets weight_decay (default 0): the optimizer's default was never read
    with pytest.raises(ValueError, match="'weight_decay' .*pass weight_decay="):
        create_loraplus_optimizer(
            model, torch.optim.AdamW, 1e-3, optimizer_kwargs={"weight_decay": 0.3}
        )
