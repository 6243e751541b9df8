"""Variant misuse is refused with errors naming the culprit; the model is left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_testkit import assert_unchanged, snapshot, tiny_bert_cls
from torch import nn

from rankwise.errors import ConfigError, InjectionError
from rankwise.io import save_adapter
from rankwise.lora import AdaLoraConfig, LoraConfig, inject


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.proj = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x).mean(dim=(2, 3)))


def test_dora_on_a_grouped_convolution_names_the_module() -> None:
    model = ConvNet()
    model.conv = nn.Conv2d(4, 4, 3, groups=2)  # groups > 1: no LoRA wrapper for it
    model.forward = lambda x: model.proj(model.conv(x).mean(dim=(2, 3)))  # type: ignore[method-assign]
    snap = snapshot(model)
    with pytest.raises(InjectionError, match="'conv'.*groups=2"):
        inject(model, LoraConfig(r=2, target_modules=["conv", "proj"], use_dora=True))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("init", ["pissa", "pissa_exact", "olora"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_svd_init_rank_too_large_is_one_error_model_unchanged(init: str, dry_run: bool) -> None:
    """PiSSA/OLoRA need r <= min(out, in): one InjectionError before anything is touched
    (dry_run too), not the 'r above min(out, in)' warning plain LoRA gets, then an error."""
    import warnings

    model = tiny_bert_cls()
    snap = snapshot(model)
    config = LoraConfig(r=33, target_modules=["query", "value"], init_lora_weights=init)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InjectionError, match=r"needs r <= min\(out, in\) = 32, found r=33"):
            inject(model, config, dry_run=dry_run)
    assert_unchanged(model, snap)


def test_adalora_refuses_dora_and_an_unknown_init() -> None:
    with pytest.raises(ConfigError, match="use_dora"):
        AdaLoraConfig(total_step=10, use_dora=True)
    with pytest.raises(ConfigError, match="init_lora_weights: expected True, False or one of"):
        LoraConfig(init_lora_weights="pissa_niter_")


def test_dora_cannot_be_exported_for_the_original_base(tmp_path: Path) -> None:
    model = inject(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"], use_dora=True))
    with pytest.raises(ConfigError, match="for_original_base"):
        save_adapter(model, tmp_path, for_original_base=True)
    assert not (tmp_path / "adapter_model.safetensors").exists()
