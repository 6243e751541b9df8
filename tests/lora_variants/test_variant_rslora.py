"""rsLoRA: the scale α/√r on every layer (rank_pattern included) and PEFT's logits both ways."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from lora_testkit import logits, tiny_bert_cls

from rankwise.io import load_adapter, save_adapter
from rankwise.lora import LoraConfig, inject, lora_layers

KW = dict(
    r=4,
    lora_alpha=8,
    use_rslora=True,
    target_modules=["query", "value"],
    rank_pattern={"value": 2},
    init_lora_weights=False,
)


def test_scale_is_alpha_over_sqrt_r() -> None:
    model = inject(tiny_bert_cls(), LoraConfig(**KW), generator=0)
    for name, layer in lora_layers(model):
        r = 2 if name.endswith("value") else 4
        assert layer.r == r
        assert math.isclose(layer.scaling, 8 / math.sqrt(r))


def test_same_logits_as_peft_both_ways(tmp_path: Path) -> None:
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model

    ours = inject(tiny_bert_cls(), LoraConfig(**KW), generator=0).eval()
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, "bert"), logits(ours, "bert"), atol=1e-5, rtol=0)

    peft_model = get_peft_model(tiny_bert_cls(), PeftConfig(**KW)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    back = load_adapter(tiny_bert_cls(), tmp_path / "peft")
    torch.testing.assert_close(logits(back, "bert"), logits(peft_model, "bert"), atol=1e-5, rtol=0)
    assert all(
        math.isclose(layer.scaling, 8 / math.sqrt(layer.r)) for _, layer in lora_layers(back)
    )
