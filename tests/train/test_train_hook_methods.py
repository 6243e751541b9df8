"""The methods with loop hooks (rslora, loraplus, lora-ga, adalora): PEFT reloads what they
save, LoRA+'s groups, LoRA-GA's unchanged start, AdaLoRA's budget and penalty, bad options.
(Training, merging, rankwise reloading and bit-identical resume: test_train_methods.py.)"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.train import TrainConfig, train
from rankwise.train.config import resolve
from rankwise.train.evaluate import loss_sum
from rankwise.train.hooks import lora_ga_prepare, make_hooks
from rankwise.train.inference import evaluate_file, load_trained
from rankwise.train.methods import lora_config_for, prepare
from rankwise.train.models import load_pretrained

HOOKED = ("rslora", "loraplus", "lora-ga", "adalora")


def _quiet(_: str) -> None:
    pass


def _config(model: Path, data: Path, out: Path, method: str, **changes: Any) -> TrainConfig:
    options = {"model": str(model), "data": str(data), "eval_data": str(data),
               "output": str(out), "method": method, "batch_size": 8, "lr": 5e-3,
               "max_steps": 4, "save_every": 0, "dropout": 0.0, "r": 4}  # fmt: skip
    return TrainConfig(**{**options, **changes})


def _model(tiny_bert: Path) -> Any:
    torch.manual_seed(0)
    return load_pretrained(str(tiny_bert), task="classification", label_names=("0", "1")).model


def _batch(tiny_bert: Path, n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    rng = random.Random(seed)
    words = (("bad", "awful", "dull"), ("good", "great", "superb"))
    rows = [(y, f"the film was {rng.choice(words[y])}" + " really" * rng.randint(0, 6))
            for y in (rng.randint(0, 1) for _ in range(n))]  # fmt: skip
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    enc = tok([t for _, t in rows], padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([y for y, _ in rows])}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_bert: Path, toy_tsv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hooked")
    return {m: train(_config(tiny_bert, toy_tsv, root / m, m), echo=_quiet) for m in HOOKED}


@pytest.mark.parametrize("method", HOOKED)
def test_peft_loads_the_saved_adapter_and_reproduces_the_trained_model(
    method: str, runs: dict, toy_tsv: Path
) -> None:
    from peft import PeftModel

    run = runs[method]
    assert run.after is not None and run.merge_check is not None and run.merge_check.identical
    ours = load_trained(run.saved)
    base = load_pretrained(str(json.loads((run.saved / "rankwise_task.json").read_text())
                               ["base_model"]), task="classification",
                           label_names=ours.label_names).model  # fmt: skip
    theirs = PeftModel.from_pretrained(base, str(run.saved)).eval()
    for model in (ours.model, theirs):
        found = evaluate_file(ours._replace(model=model), str(toy_tsv))
        torch.testing.assert_close(found.logits, run.after.logits, rtol=1e-4, atol=1e-5)
    saved = json.loads((run.saved / "adapter_config.json").read_text())
    assert saved["peft_type"] == ("ADALORA" if method == "adalora" else "LORA")
    assert saved["use_rslora"] is (method == "rslora")
    if method == "lora-ga":  # a plain rank-2r LoRA relative to the original base
        assert saved["r"] == 8 and saved["init_lora_weights"] is True


def test_adalora_keeps_the_target_budget_and_is_repeatable(
    runs: dict, tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    saved = json.loads((runs["adalora"].saved / "adapter_config.json").read_text())
    pattern = saved["rank_pattern"]
    layers = 2 * 6 + 1  # 2 BERT layers x (query, key, value, 3 dense) + the pooler's dense
    assert len(pattern) == layers and all(len(v) == 6 for v in pattern.values())  # init_r 6
    assert sum(sum(v) for v in pattern.values()) == 4 * layers  # target_r x #layers
    again = train(_config(tiny_bert, toy_tsv, tmp_path / "again", "adalora"), echo=_quiet)
    a = (runs["adalora"].output / "metrics.jsonl").read_text().splitlines()
    b = (again.output / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(x).items() if k != "examples_per_s"} for x in a]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "examples_per_s"} for x in b]


def test_adalora_resume_restores_the_allocator(
    runs: dict, tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    # 6 steps: tinit 0, tfinal 1, deltaT 1: masks change every step from the EMAs restored
    cut = _config(tiny_bert, toy_tsv, tmp_path / "cut", "adalora", max_steps=6, save_every=2)
    whole_config = dataclasses.replace(cut, output=str(tmp_path / "whole"), save_every=0)
    whole = train(whole_config, echo=_quiet)
    train(cut, echo=_quiet, stop_after=3)
    resumed = train(dataclasses.replace(cut, resume=True), echo=_quiet)
    assert resumed.resumed_from == 2
    name = "adapter_model.safetensors"
    assert (resumed.saved / name).read_bytes() == (whole.saved / name).read_bytes()
    config = json.loads((resumed.saved / "adapter_config.json").read_text())
    assert config == json.loads((whole.saved / "adapter_config.json").read_text())


def test_loraplus_groups_b_at_ratio_a_and_head_at_lr(tiny_bert: Path) -> None:
    config = resolve(TrainConfig(method="loraplus", data="x", lr=1e-3, loraplus_ratio=8.0))
    model = _model(tiny_bert)
    prepare(model, config, generator=0)
    groups = make_hooks(config, model).param_groups(model)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(lr_of) == {id(p) for p in named.values()}  # every trainable tensor, once
    assert sum(len(g["params"]) for g in groups) == len(named)
    for name, p in named.items():
        expected = 8e-3 if "lora_B" in name else 1e-3  # lora_A and the classifier: lr
        assert lr_of[id(p)] == pytest.approx(expected), name
    assert any("classifier" in n for n in named)


def test_lora_ga_starts_at_the_base_model_output(tiny_bert: Path) -> None:
    config = resolve(TrainConfig(method="lora-ga", data="x", r=4, dropout=0.0))
    base, model = _model(tiny_bert).eval(), _model(tiny_bert).eval()
    batches = [_batch(tiny_bert, seed=s) for s in range(2)]
    lora_ga_prepare(model, lora_config_for(config), batches, config, generator=0)
    probe = _batch(tiny_bert, n=16, seed=9)
    inputs = {k: probe[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    layer = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert (
        float(layer.lora_B.weight.detach().abs().max()) > 0
    )  # B is not zero: the base was changed
    assert not torch.equal(
        layer.base_layer.weight, base.bert.encoder.layer[0].attention.self.query.weight
    )


def test_adalora_orthogonality_term_is_in_the_loss(tiny_bert: Path) -> None:
    config = resolve(TrainConfig(method="adalora", data="x", r=2))
    model = _model(tiny_bert)
    prepare(model, config, generator=0, total_steps=10)
    hooks = make_hooks(config, model)
    batch = _batch(tiny_bert)
    grads = []
    for with_penalty in (False, True):
        model.zero_grad(set_to_none=True)
        loss, _ = loss_sum(model, batch, "classification")
        extra = hooks.extra_loss(model) if with_penalty else None
        (loss / 8 + (extra if extra is not None else 0.0)).backward()
        grads.append(model.get_submodule("bert.encoder.layer.0.attention.self.query").lora_A.grad)
    # λ = 0 at step 0: the task loss gives P and Q no gradient; the penalty does
    assert grads[0] is None or float(grads[0].abs().max()) == 0.0
    assert float(grads[1].abs().max()) > 0


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"loraplus_ratio": 0.0}, "loraplus_ratio"),
        (
            {"init_r": 3, "r": 4, "method": "adalora"},
            r"init_r in a config file\): expected an integer >= r",
        ),
        ({"init_r": 12}, "init_r.*for --method adalora only; found --method lora"),
        ({"ga_batches": 0}, "ga_batches"),
    ],  # fmt: skip
)
def test_bad_hook_options_are_refused(changes: dict, option: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=option):
        train(TrainConfig(data="x", output=str(tmp_path / "o"), **changes), echo=_quiet)
    assert not (tmp_path / "o").exists()
