"""Every LoRA variant the engine offers trains, merges exactly, reloads to the same metrics and
resumes bit-identically (tiny BERT built from a config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankwise.train import TrainConfig, train
from rankwise.train.inference import evaluate_file, load_trained
from rankwise.train.methods import AVAILABLE


def _quiet(_: str) -> None:
    pass


def _config(model: Path, data: Path, out: Path, method: str, **changes) -> TrainConfig:
    options = {"model": str(model), "data": str(data), "eval_data": str(data),
               "output": str(out), "method": method, "batch_size": 8, "lr": 5e-3,
               "max_steps": 4, "save_every": 2, "dropout": 0.0}  # fmt: skip
    return TrainConfig(**{**options, **changes})


# rslora, loraplus and adalora (resumed mid-schedule): test_train_hook_methods.py
@pytest.mark.parametrize(
    "method", [m for m in AVAILABLE if m not in ("lora", "full", "rslora", "loraplus", "adalora")]
)
def test_variant_trains_merges_reloads_and_resumes(
    method: str, tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    whole = train(_config(tiny_bert, toy_tsv, tmp_path / "whole", method), echo=_quiet)
    assert whole.merge_check is not None and whole.merge_check.identical
    assert 0 < whole.trainable < whole.total
    reloaded = evaluate_file(load_trained(tmp_path / "whole" / "adapter"), str(toy_tsv))
    assert whole.after is not None
    assert reloaded.predictions == whole.after.predictions
    assert reloaded.loss == pytest.approx(whole.after.loss, rel=1e-5)

    train(_config(tiny_bert, toy_tsv, tmp_path / "cut", method), echo=_quiet, stop_after=3)
    train(_config(tiny_bert, toy_tsv, tmp_path / "cut", method, resume=True), echo=_quiet)
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if method == "lora-fa":  # A never moves from its initialization, whatever the lr; B does
        other = train(
            _config(tiny_bert, toy_tsv, tmp_path / "lr2", method, lr=2e-2), echo=_quiet
        ).saved
        c = load_file(str(other / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], c[k]) for k in a if ".lora_A." in k)
        assert any(not torch.equal(a[k], c[k]) for k in a if ".lora_B." in k)
