"""Files PEFT writes for configs whose module matching has PEFT's own quirks; swaps that
would keep another adapter's base tensors; saving a merged model with embedding weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_testkit import BUILDERS, logits, perturb, token_batch
from safetensors.torch import load_file
from torch import nn

from rankwise.errors import AdapterFormatError
from rankwise.io import load_adapter, save_adapter
from rankwise.lora import LoraConfig, inject, lora_layers, merge

WEIGHTS = "adapter_model.safetensors"


def _peft_saved(family: str, tmp_path: Path, seed: int = 3, **kwargs) -> torch.Tensor:
    """Save a perturbed PEFT adapter of ``kwargs`` to ``tmp_path``; its logits."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    theirs = get_peft_model(
        BUILDERS[family](), PeftConfig(**{"r": 4, "lora_alpha": 8, **kwargs})
    ).eval()
    perturb(theirs, seed)
    theirs.save_pretrained(tmp_path)
    return logits(theirs, family)


def _adapted(model: nn.Module) -> set[str]:
    return {n for n, _ in lora_layers(model)}


def test_modules_to_save_matches_by_plain_suffix_as_peft(tmp_path: Path) -> None:
    # PEFT keeps every module whose name ends with the entry, dot or not: "norm" also keeps
    # each layer's input_layernorm / post_attention_layernorm (the file holds them all).
    expected = _peft_saved("llama", tmp_path, target_modules=["q_proj"], modules_to_save=["norm"])
    saved = set(load_file(tmp_path / WEIGHTS))
    assert "base_model.model.model.layers.0.input_layernorm.weight" in saved
    ours = load_adapter(BUILDERS["llama"](), tmp_path)
    torch.testing.assert_close(logits(ours, "llama"), expected, rtol=0, atol=1e-5)
    # inject selects the same modules PEFT does, so a rankwise save has the same keys
    mine = inject(BUILDERS["llama"](), LoraConfig(r=4, target_modules=["q_proj"],
                                                  modules_to_save=["norm"]))  # fmt: skip
    save_adapter(mine, tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / WEIGHTS)) == saved


def test_a_full_name_is_adapted_outside_layers_to_transform_as_peft(tmp_path: Path) -> None:
    targets = ["model.layers.0.self_attn.q_proj", "v_proj"]
    expected = _peft_saved("llama", tmp_path, target_modules=targets, layers_to_transform=[1])
    ours = load_adapter(BUILDERS["llama"](), tmp_path)
    assert _adapted(ours) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    torch.testing.assert_close(logits(ours, "llama"), expected, rtol=0, atol=1e-5)


def test_load_accepts_target_entries_that_match_nothing_here(tmp_path: Path) -> None:
    # A generic list for several architectures: PEFT loads it when some entry matches.
    targets = ["q_proj", "v_proj", "query", "value"]
    with pytest.raises(Exception, match="'query' matches no module"):
        inject(BUILDERS["llama"](), LoraConfig(r=4, target_modules=targets))  # a typo guard
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    theirs = get_peft_model(BUILDERS["llama"](), PeftConfig(r=4, target_modules=targets[:2]))
    perturb(theirs, 5)
    theirs.peft_config["default"].target_modules = set(targets)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(BUILDERS["llama"](), tmp_path)
    assert {n.rsplit(".", 1)[-1] for n in _adapted(ours)} == {"q_proj", "v_proj"}


@pytest.mark.parametrize("init", ["orthogonal", "mica"])
def test_peft_inits_that_keep_the_base_load(init: str, tmp_path: Path) -> None:
    expected = _peft_saved("llama", tmp_path, target_modules=["q_proj"], init_lora_weights=init)
    ours = load_adapter(BUILDERS["llama"](), tmp_path)
    torch.testing.assert_close(logits(ours, "llama"), expected, rtol=0, atol=1e-5)


def test_a_peft_eva_adapter_loads_as_the_lora_it_is(tmp_path: Path) -> None:
    # EVA only initializes A from activations (B = 0, base untouched): once trained it is a
    # plain LoRA, but its eva_config was refused as an unimplemented feature
    from peft import EvaConfig, get_peft_model
    from peft import LoraConfig as PeftConfig
    from peft.tuners.lora import initialize_lora_eva_weights

    config = PeftConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="eva",
        eva_config=EvaConfig(rho=2.0),
    )  # fmt: skip
    theirs = get_peft_model(BUILDERS["llama"](), config)
    batches = [{"input_ids": token_batch(seed)} for seed in (5, 6, 7)]
    initialize_lora_eva_weights(theirs, batches, show_progress_bar=False)
    perturb(theirs.eval(), 3)
    theirs.save_pretrained(tmp_path)
    expected = logits(theirs, "llama")
    ours = load_adapter(BUILDERS["llama"](), tmp_path)
    torch.testing.assert_close(logits(ours, "llama"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["all", "lora_only"])
def test_swap_refuses_to_keep_another_adapters_biases(mode: str, tmp_path: Path) -> None:
    config = dict(target_modules=["query", "value"], task_type="SEQ_CLS")
    _peft_saved("bert", tmp_path / "plain", seed=1, **config)
    _peft_saved("bert", tmp_path / "biased", seed=2, bias=mode, **config)
    model = load_adapter(BUILDERS["bert"](), tmp_path / "plain")
    load_adapter(model, tmp_path / "biased")  # sets every bias it trained: fine
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFormatError, match=rf"bias='{mode}'.*changed base tensors"):
        load_adapter(model, tmp_path / "plain")  # would keep the other adapter's biases
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    load_adapter(model, tmp_path / "biased")  # the same mode sets them all again


def test_swap_refuses_after_training_biases(tmp_path: Path) -> None:
    config = dict(target_modules=["query", "value"], task_type="SEQ_CLS")
    _peft_saved("bert", tmp_path, **config)
    model = inject(BUILDERS["bert"](), LoraConfig(r=4, lora_alpha=8, bias="all", **config))
    with pytest.raises(AdapterFormatError, match="changed base tensors"):
        load_adapter(model, tmp_path)


def test_save_after_merge_writes_the_unmerged_embedding(tmp_path: Path) -> None:
    from peft import PeftModel

    model = inject(
        BUILDERS["llama"](),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False
        ),  # fmt: skip
        generator=0,
    ).eval()
    expected = logits(model, "llama")
    save_adapter(model, tmp_path / "before")
    merge(model)
    save_adapter(model, tmp_path / "after")
    a, b = load_file(tmp_path / "before" / WEIGHTS), load_file(tmp_path / "after" / WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    ours = load_adapter(BUILDERS["llama"](), tmp_path / "after")
    torch.testing.assert_close(logits(ours, "llama"), expected, rtol=0, atol=1e-5)
    theirs = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "after").eval()
    torch.testing.assert_close(logits(theirs, "llama"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("first", "second"),
    [(False, "pissa"), ("pissa", False), ("olora", True), ("olora", "olora")],
    ids=["plain-to-pissa", "pissa-to-plain", "olora-to-plain", "olora-to-olora"],
)
def test_swap_refuses_residual_initializers(first, second, tmp_path: Path) -> None:
    # PiSSA/OLoRA keep W - s·B0 A0 in the base layer: swapping only the factors paired them
    # with the other adapter's base (logits 4e-2 to 2.8e-1 off a fresh load, silently)
    config = dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    _peft_saved("llama", tmp_path / "one", seed=1, init_lora_weights=first, **config)
    alpha = {"lora_alpha": 32} if first == second else {}
    expected = _peft_saved("llama", tmp_path / "two", seed=2, init_lora_weights=second,
                           **config, **alpha)  # fmt: skip
    model = load_adapter(BUILDERS["llama"](), tmp_path / "one")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFormatError, match="cannot swap adapters in place.*residual"):
        load_adapter(model, tmp_path / "two")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    fresh = load_adapter(BUILDERS["llama"](), tmp_path / "two")
    torch.testing.assert_close(logits(fresh, "llama"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_swap_between_checkpoints_of_one_residual_adapter_works(init: str, tmp_path: Path) -> None:
    # The same initializer at the same rank and scale leaves the same residual base: another
    # checkpoint of the run swaps in (a rollback), exactly as a fresh load.
    config = dict(
        target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=init
    )
    _peft_saved("llama", tmp_path / "one", seed=1, **config)
    expected = _peft_saved("llama", tmp_path / "two", seed=2, **config)
    model = load_adapter(BUILDERS["llama"](), tmp_path / "one")
    load_adapter(model, tmp_path / "two")
    torch.testing.assert_close(logits(model, "llama"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("task", "head_cls", "head"),
    [
        ("TOKEN_CLS", "BertForTokenClassification", "classifier"),
        ("QUESTION_ANS", "BertForQuestionAnswering", "qa_outputs"),
    ],
)
def test_token_cls_and_qa_heads_train_and_save_as_peft(
    task: str, head_cls: str, head: str, tmp_path: Path
) -> None:
    import peft
    import transformers

    def make() -> nn.Module:
        torch.manual_seed(0)
        cfg = transformers.BertConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=100, num_labels=3 if task == "TOKEN_CLS" else 2,
        )  # fmt: skip
        return getattr(transformers, head_cls)(cfg).eval()

    kw = dict(r=4, target_modules=["query", "value"], task_type=task)
    model = inject(make(), LoraConfig(**kw), generator=0)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(head + "."))
    perturb(model, seed=1)  # factors and the head: the head must be in the file
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == theirs.peft_config["default"].modules_to_save
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    with torch.no_grad():
        want, got = model(input_ids=ids), loaded(input_ids=ids)
    for key in ("logits",) if task == "TOKEN_CLS" else ("start_logits", "end_logits"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)


def test_unknown_config_fields_warn_only_when_set(tmp_path: Path) -> None:
    import warnings

    expected = _peft_saved("llama", tmp_path, target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's own file: every field known, no warning
        ours = load_adapter(BUILDERS["llama"](), tmp_path)
    torch.testing.assert_close(logits(ours, "llama"), expected, rtol=0, atol=1e-5)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "future_off": None, "future_feature": {"mode": "x"}}))
    with pytest.warns(UserWarning, match=r"ignoring field\(s\) future_feature that") as seen:
        load_adapter(BUILDERS["llama"](), tmp_path)
    assert "future_off" not in str(seen[0].message)
