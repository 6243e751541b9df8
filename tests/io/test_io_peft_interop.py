"""PEFT interop both ways: same logits, same key names, same config fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_testkit import (
    BUILDERS,
    load_minilm,
    logits,
    low_rank_path,
    perturb,
    tiny_bert_cls,
    token_batch,
)
from safetensors.torch import load_file
from torch import nn

from rankwise.errors import ConfigError, ShapeMismatchError
from rankwise.io import load_adapter, read_adapter_config, save_adapter
from rankwise.lora import LoraConfig, LoraLayer, get_config, inject, lora_layers, merge, unload

CASES = {
    "bert": dict(
        target_modules=["query", "key", "value", "dense", "word_embeddings"], task_type="SEQ_CLS"
    ),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc", "wte"], task_type="CAUSAL_LM"),
    "llama": dict(target_modules="all-linear", task_type="CAUSAL_LM", use_rslora=True),
    "t5": dict(target_modules=["q", "v", "wo"], task_type="SEQ_2_SEQ_LM"),
    "bert-patterns": dict(
        target_modules=["query", "value", "dense"],
        rank_pattern={"layer.1.*query": 2},
        alpha_pattern={"value": 3},
        layers_to_transform=[1],
        layers_pattern="layer",
        task_type="SEQ_CLS",
    ),
    "vit": dict(target_modules=["q_proj", "v_proj", "projection"], modules_to_save=["classifier"]),
    # PEFT's default save also writes the adapted embed_tokens' full base weight
    "llama-embed": dict(target_modules=["q_proj", "v_proj", "embed_tokens"], task_type="CAUSAL_LM"),
}

WEIGHTS = "adapter_model.safetensors"


def _peft_adapted(family: str, kwargs: dict, seed: int) -> nn.Module:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    fam = family.split("-")[0]  # "bert-patterns" -> "bert"

    model = get_peft_model(BUILDERS[fam](), PeftConfig(r=4, lora_alpha=8, **kwargs))
    perturb(model, seed)
    return model.eval()


@pytest.mark.parametrize("family", list(CASES))
def test_rankwise_save_loads_in_peft(family: str, tmp_path: Path) -> None:
    from peft import PeftModel

    fam = family.split("-")[0]  # "bert-patterns" -> "bert"

    ours = inject(BUILDERS[fam](), LoraConfig(r=4, lora_alpha=8, **CASES[family]))
    perturb(ours, 3)
    expected = logits(ours, fam)
    save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(BUILDERS[fam](), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, fam), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(CASES))
def test_peft_save_loads_in_rankwise(family: str, tmp_path: Path) -> None:
    fam = family.split("-")[0]  # "bert-patterns" -> "bert"
    theirs = _peft_adapted(family, CASES[family], seed=5)
    expected = logits(theirs, fam)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(BUILDERS[fam](), tmp_path)
    torch.testing.assert_close(logits(ours, fam), expected, rtol=0, atol=1e-5)
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training


@pytest.mark.parametrize(
    ("family", "bias"),
    [(f, "none") for f in CASES]
    + [(f, b) for f in ("bert", "gpt2", "llama") for b in ("all", "lora_only")],
)
def test_keys_and_config_equal_peft_own_save(family: str, bias: str, tmp_path: Path) -> None:
    fam = family.split("-")[0]  # "bert-patterns" -> "bert"
    kwargs = {**CASES[family], "bias": bias}
    theirs = _peft_adapted(family, kwargs, seed=0)
    theirs.save_pretrained(tmp_path / "peft")
    ours = inject(BUILDERS[fam](), LoraConfig(r=4, lora_alpha=8, **kwargs))
    save_adapter(ours, tmp_path / "ours")
    peft_keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    # PEFT's bias="all" also writes its ModulesToSaveWrapper copies; everything else is equal
    peft_keys = {
        k for k in peft_keys if ".original_module." not in k and ".modules_to_save." not in k
    }
    assert set(our_file) == peft_keys
    ref = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    got = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    ref.pop("peft_version")
    assert set(got) == set(ref)
    for key in ("target_modules", "modules_to_save"):
        ref[key], got[key] = sorted(set(ref[key] or [])), sorted(set(got[key] or []))
    assert got == ref


def test_round_trip_keeps_values_and_swaps_in_place(tmp_path: Path) -> None:
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    a = inject(tiny_bert_cls(), cfg, generator=1)
    perturb(a, 1)
    save_adapter(a, tmp_path / "a")
    b = inject(tiny_bert_cls(), cfg.replace(lora_alpha=4, lora_dropout=0.1), generator=2)
    perturb(b, 2)
    save_adapter(b, tmp_path / "b")
    expected_b = logits(b, "bert")
    model = load_adapter(tiny_bert_cls(), tmp_path / "a", is_trainable=True)
    assert logits(model, "bert").allclose(logits(a, "bert"), atol=1e-6)
    layers = [id(layer) for _, layer in lora_layers(model)]
    load_adapter(model, tmp_path / "b", is_trainable=True)
    assert [id(layer) for _, layer in lora_layers(model)] == layers  # swapped, not re-injected
    torch.testing.assert_close(logits(model, "bert"), expected_b, rtol=0, atol=1e-6)
    assert all(layer.dropout.p == 0.1 for _, layer in lora_layers(model))
    assert get_config(model).lora_alpha == 4 and read_adapter_config(tmp_path / "b").lora_alpha == 4
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)


def test_minilm_interop_both_ways(minilm_path: Path, tmp_path: Path) -> None:
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model

    kwargs = dict(
        r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS"
    )
    ours = inject(load_minilm(minilm_path), LoraConfig(**kwargs))
    perturb(ours, 11)
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), low_rank_path(ours):
        expected = ours(input_ids=ids).logits
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(load_minilm(minilm_path), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    peft_model = get_peft_model(load_minilm(minilm_path), PeftConfig(**kwargs)).eval()
    perturb(peft_model, 12)
    peft_model.save_pretrained(tmp_path / "peft")
    back = load_adapter(load_minilm(minilm_path), tmp_path / "peft")
    with torch.no_grad(), low_rank_path(back):
        torch.testing.assert_close(
            back(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-5
        )
    assert sum(isinstance(m, LoraLayer) for m in back.modules()) == 6 * 6 + 1
    assert (
        read_adapter_config(tmp_path / "ours").base_model_name_or_path
        == json.loads((tmp_path / "peft" / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
    )


def _changed_embeddings(model: nn.Module, seed: int, *, output: bool) -> None:
    """Change the base input (and output) embedding, as a retrained vocabulary would."""
    g = torch.Generator().manual_seed(seed)
    layers = [model.get_input_embeddings()] + ([model.get_output_embeddings()] if output else [])
    with torch.no_grad():
        for layer in layers:
            weight = getattr(layer, "base_layer", layer).weight
            weight.add_(torch.randn(weight.shape, generator=g))


@pytest.mark.parametrize("targets", [["q_proj", "embed_tokens"], ["q_proj"]])
def test_embedding_weights_saved_by_peft_are_loaded(targets: list[str], tmp_path: Path) -> None:
    """Targeted embed_tokens: PEFT writes ``<m>.base_layer.weight``; with
    save_embedding_layers=True and no adapted embedding, ``<m>.weight`` and ``lm_head.weight``.
    rankwise loads both into the base layers (plain model and swap in place), as PEFT does."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    theirs = get_peft_model(BUILDERS["llama"](), PeftConfig(r=4, target_modules=targets)).eval()
    perturb(theirs, 4)
    # targeted: PEFT writes the adapted embed_tokens only (lm_head is not adapted, not written)
    _changed_embeddings(theirs.get_base_model(), 5, output=len(targets) == 1)
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    keys = {k.removeprefix("base_model.model.") for k in load_file(tmp_path / "peft" / WEIGHTS)}
    expected = logits(theirs, "llama")
    embeds = (
        {"model.embed_tokens.base_layer.weight"}
        if len(targets) == 2
        else {"model.embed_tokens.weight", "lm_head.weight"}
    )
    assert embeds <= keys
    ours = load_adapter(BUILDERS["llama"](), tmp_path / "peft")
    torch.testing.assert_close(logits(ours, "llama"), expected, rtol=0, atol=1e-5)
    swapped = inject(BUILDERS["llama"](), LoraConfig(r=4, target_modules=targets))
    load_adapter(swapped, tmp_path / "peft")
    torch.testing.assert_close(logits(swapped, "llama"), expected, rtol=0, atol=1e-5)
    # and back: rankwise writes the same keys, PEFT loads them to the same logits
    save_adapter(ours, tmp_path / "ours", save_embedding_layers=True)
    assert {
        k.removeprefix("base_model.model.") for k in load_file(tmp_path / "ours" / WEIGHTS)
    } == keys
    from peft import PeftModel

    back = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, "llama"), expected, rtol=0, atol=1e-5)


def test_auto_saves_embeddings_of_a_resized_vocabulary_as_peft(tmp_path: Path) -> None:
    """save_embedding_layers="auto" against a local base_model_name_or_path: a resized
    vocabulary writes both embeddings (PEFT's rule and keys); an unchanged one writes none."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    BUILDERS["llama"]().config.save_pretrained(tmp_path / "base")
    kwargs = dict(r=4, target_modules=["q_proj"])
    for resize, embeds in ((None, set()), (120, {"model.embed_tokens.weight", "lm_head.weight"})):
        files = []
        for who in ("peft", "ours"):
            model = BUILDERS["llama"]()
            model.name_or_path = str(tmp_path / "base")  # as from_pretrained(local dir) sets it
            if resize:
                model.resize_token_embeddings(resize)
            if who == "peft":
                get_peft_model(model, PeftConfig(**kwargs)).save_pretrained(tmp_path / who)
            else:
                save_adapter(inject(model, LoraConfig(**kwargs)), tmp_path / who)
            files.append(
                {k.removeprefix("base_model.model.") for k in load_file(tmp_path / who / WEIGHTS)}
            )
        assert files[0] == files[1]
        assert {k for k in files[1] if ".lora_" not in k} == embeds
    # the resized adapter does not fit the original vocabulary: the error names the module
    with pytest.raises(
        ShapeMismatchError, match=r"'model.embed_tokens'.*\(99, 32\), found \(120, 32\)"
    ):
        load_adapter(BUILDERS["llama"](), tmp_path / "ours")


def test_auto_with_a_hub_id_reads_the_cached_config_or_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id as base_model_name_or_path: "auto" assumed "not resized" silently, so a
    resized model's new-token rows were not saved. It now reads the config from the local
    Hugging Face cache, and without one says it assumes (as PEFT does)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--someone--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    BUILDERS["llama"]().config.save_pretrained(repo / "snapshots" / "abc123")
    for name, warns in (("someone/tiny-llama", False), ("someone/not-cached", True)):
        model = BUILDERS["llama"]()
        model.name_or_path = name
        model.resize_token_embeddings(120)
        adapted = inject(model, LoraConfig(r=4, target_modules=["q_proj"]))
        out = tmp_path / name.replace("/", "_")
        if warns:
            with pytest.warns(RuntimeWarning, match="assuming the vocabulary was not resized"):
                save_adapter(adapted, out)
        else:
            save_adapter(adapted, out)
        keys = {k.removeprefix("base_model.model.") for k in load_file(out / WEIGHTS)}
        saved = {k for k in keys if ".lora_" not in k}
        assert saved == (set() if warns else {"model.embed_tokens.weight", "lm_head.weight"})


def test_tied_modules_to_save_trains_a_copy_as_peft(tmp_path: Path) -> None:
    """GPT-2 ties lm_head to wte. modules_to_save=["lm_head"] trains and loads lm_head's own
    copy (PEFT's ModulesToSaveWrapper does), so wte never changes; logits agree both ways."""
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model

    kwargs = dict(r=4, lora_alpha=8, target_modules=["c_attn"], modules_to_save=["lm_head"])
    ours = inject(BUILDERS["gpt2"]().train(), LoraConfig(**kwargs), generator=0)
    wte = ours.transformer.wte.weight.detach().clone()
    assert ours.lm_head.weight is not ours.transformer.wte.weight
    assert ours.config.tie_word_embeddings is False  # so a merged save is not re-tied
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    ids = token_batch(0)
    ours(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(ours.transformer.wte.weight, wte)
    assert not torch.equal(ours.lm_head.weight, wte)
    ours.eval()
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(BUILDERS["gpt2"](), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, "gpt2"), logits(ours, "gpt2"), rtol=0, atol=1e-5)

    peft_model = get_peft_model(BUILDERS["gpt2"](), PeftConfig(**kwargs))
    perturb(peft_model, 6)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    back = load_adapter(BUILDERS["gpt2"](), tmp_path / "peft", is_trainable=True)
    torch.testing.assert_close(logits(back, "gpt2"), logits(peft_model, "gpt2"), rtol=0, atol=1e-5)
    assert torch.equal(back.transformer.wte.weight, wte)
    # unload keeps the trained, untied head (as PEFT's) and the flags from before injection
    unload(back)
    assert back.lm_head.weight.requires_grad and back.transformer.wte.weight.requires_grad
    assert not torch.equal(back.lm_head.weight, wte)


@pytest.mark.parametrize(
    ("family", "bias"), [(f, b) for f in ("bert", "gpt2", "llama") for b in ("all", "lora_only")]
)
def test_peft_save_with_trained_biases_loads_in_rankwise(
    family: str, bias: str, tmp_path: Path
) -> None:
    """PEFT files of bias="all" (with a SEQ_CLS head: its ModulesToSaveWrapper copies
    ``.modules_to_save.``/``.original_module.`` too) and "lora_only", biases perturbed."""
    theirs = _peft_adapted(family, {**CASES[family], "bias": bias}, seed=7)
    expected = logits(theirs, family)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(BUILDERS[family](), tmp_path)
    torch.testing.assert_close(logits(ours, family), expected, rtol=0, atol=1e-5)
    # exactly the non-LoRA tensors the file holds changed in the base model
    base = dict(BUILDERS[family]().named_parameters())
    live = {n.replace(".base_layer.", "."): p for n, p in ours.named_parameters()}
    changed = {n for n, p in base.items() if not torch.equal(live[n], p)}
    in_file = {
        k.removeprefix("base_model.model.").replace(".modules_to_save.", ".")
        for k in load_file(tmp_path / WEIGHTS)
        if ".lora_" not in k and ".original_module." not in k
    }
    assert changed == {k.replace(".base_layer.", ".") for k in in_file}


def test_second_peft_adapter_swaps_in_place(tmp_path: Path) -> None:
    first = _peft_adapted("bert", CASES["bert"], seed=8)
    first.save_pretrained(tmp_path / "a")
    second = _peft_adapted("bert", {**CASES["bert"], "lora_dropout": 0.1}, seed=9)
    second.save_pretrained(tmp_path / "b")
    model = load_adapter(BUILDERS["bert"](), tmp_path / "a")
    torch.testing.assert_close(logits(model, "bert"), logits(first, "bert"), rtol=0, atol=1e-5)
    layers = [id(m) for _, m in lora_layers(model)]
    load_adapter(model, tmp_path / "b")
    assert [id(m) for _, m in lora_layers(model)] == layers
    torch.testing.assert_close(logits(model, "bert"), logits(second, "bert"), rtol=0, atol=1e-5)
    assert all(m.lora_dropout == 0.1 for _, m in lora_layers(model) if m.kind != "embedding")


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).unsqueeze(-1)  # (b, 8, 6, 1)
        return self.head(self.conv2(h).flatten(1))


def test_peft_adapter_on_convolutions_both_ways(tmp_path: Path) -> None:
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model

    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
    kwargs = dict(r=2, lora_alpha=4, target_modules=["conv", "conv2"], modules_to_save=["head"])
    theirs = get_peft_model(_ConvNet(), PeftConfig(**kwargs))
    perturb(theirs, 10)
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = load_adapter(_ConvNet(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
    save_adapter(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(_ConvNet(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x), rtol=0, atol=1e-5)


def test_save_embedding_layers_argument_is_checked(tmp_path: Path) -> None:
    model = inject(_ConvNet(), LoraConfig(r=2, target_modules=["conv"]))
    with pytest.warns(UserWarning, match="no get_input_embeddings"):
        save_adapter(model, tmp_path / "a", save_embedding_layers=True)
    with pytest.raises(ValueError, match="save_embedding_layers: expected True, False or 'auto'"):
        save_adapter(model, tmp_path / "b", save_embedding_layers="yes")
    assert not (tmp_path / "b").exists()


def _tied_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = BUILDERS["llama"]().config
    cfg = LlamaConfig(**{**cfg.to_dict(), "tie_word_embeddings": True})
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    ("builder", "targets", "select"),
    [
        (BUILDERS["gpt2"], ["c_attn"], True),  # wte and lm_head tied, neither adapted
        (_tied_llama, ["q_proj", "embed_tokens", "lm_head"], "auto"),  # both adapted, tied
    ],
)
def test_tied_embeddings_are_written_as_separate_copies(
    builder, targets: list[str], select: bool | str, tmp_path: Path
) -> None:
    """safetensors refuses tensors sharing memory; PEFT's save clones them: so does ours."""
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model

    kwargs = dict(r=4, lora_alpha=8, target_modules=targets)
    theirs = get_peft_model(builder(), PeftConfig(**kwargs))
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=select)
    ours = inject(builder(), LoraConfig(**kwargs), generator=0)
    perturb(ours, 12)
    ours.eval()
    save_adapter(ours, tmp_path / "ours", save_embedding_layers=select)
    ours_file = load_file(tmp_path / "ours" / WEIGHTS)
    assert set(ours_file) == set(load_file(tmp_path / "peft" / WEIGHTS))
    assert sum(".lora_" not in k for k in ours_file) == 2  # both embeddings, each its own copy
    back = PeftModel.from_pretrained(builder(), tmp_path / "ours").eval()
    fam = "gpt2" if builder is BUILDERS["gpt2"] else "llama"
    torch.testing.assert_close(logits(back, fam), logits(ours, fam), rtol=0, atol=1e-5)
    again = load_adapter(builder(), tmp_path / "ours")
    torch.testing.assert_close(logits(again, fam), logits(ours, fam), rtol=0, atol=1e-5)


def test_two_tied_modules_to_save_train_apart(tmp_path: Path) -> None:
    """modules_to_save=["wte", "lm_head"] on GPT-2 (tied): each saved module gets its own copy,
    as each of PEFT's ModulesToSaveWrappers does; files agree both ways."""
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model

    kwargs = dict(r=4, lora_alpha=8, target_modules=["c_attn"], modules_to_save=["wte", "lm_head"])
    ours = inject(BUILDERS["gpt2"](), LoraConfig(**kwargs), generator=0)
    assert ours.lm_head.weight is not ours.transformer.wte.weight
    perturb(ours, 13)
    ours.eval()
    save_adapter(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(BUILDERS["gpt2"](), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, "gpt2"), logits(ours, "gpt2"), rtol=0, atol=1e-5)
    theirs = get_peft_model(BUILDERS["gpt2"](), PeftConfig(**kwargs))
    perturb(theirs, 14)
    theirs.eval().save_pretrained(tmp_path / "peft")
    loaded = load_adapter(BUILDERS["gpt2"](), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, "gpt2"), logits(theirs, "gpt2"), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "targets"),
    [
        ("bert", ["query", "dense", "word_embeddings"]),  # Linear, Embedding (hidden 32)
        ("gpt2", ["c_attn", "c_proj"]),  # Conv1D
        ("conv", ["conv", "conv2"]),  # Conv1d (3·3 = 9 inputs), Conv2d
    ],
)
def test_r_above_the_weight_dims_works_as_in_peft(
    family: str, targets: list[str], tmp_path: Path
) -> None:
    """PEFT accepts r > min(out, in) (the update's rank stays capped); rankwise refused it.
    Now it warns, and both libraries give the same model and read each other's file."""
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model

    build = _ConvNet if family == "conv" else BUILDERS[family]
    if family == "conv":
        x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))

        def run(model: nn.Module) -> torch.Tensor:
            with torch.no_grad():
                return model(x)
    else:

        def run(model: nn.Module) -> torch.Tensor:
            return logits(model, family)

    kwargs = dict(r=40, lora_alpha=16, target_modules=targets)
    base = run(build())
    with pytest.warns(UserWarning, match=r"r=40 > min\(out, in\)"):
        ours = inject(build(), LoraConfig(**kwargs))
    torch.testing.assert_close(run(ours), base, rtol=0, atol=0)  # B = 0 at the start
    perturb(ours, 4)
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    torch.testing.assert_close(run(theirs), run(ours), rtol=0, atol=1e-5)
    peft_model = get_peft_model(build(), PeftConfig(**kwargs))
    perturb(peft_model, 6)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    back = load_adapter(build(), tmp_path / "peft")
    torch.testing.assert_close(run(back), run(peft_model), rtol=0, atol=1e-5)
    ours_keys = load_file(tmp_path / "ours" / WEIGHTS)
    peft_keys = load_file(tmp_path / "peft" / WEIGHTS)
    assert {k: v.shape for k, v in ours_keys.items()} == {k: v.shape for k, v in peft_keys.items()}


@pytest.mark.parametrize("adapter_name", ["default", "mine"])
def test_peft_bias_all_with_a_nested_module_to_save_loads(
    adapter_name: str, tmp_path: Path
) -> None:
    """bias="all" with a module to save that has children (BERT's pooler): PEFT writes
    ``pooler.modules_to_save.<adapter>.dense.bias`` (the adapter name kept, not being just
    before the last part); rankwise read it as ``pooler.<adapter>.dense.bias`` and refused."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    kwargs = dict(r=4, target_modules=["query", "value"], modules_to_save=["pooler"], bias="all")
    theirs = get_peft_model(
        BUILDERS["bert"](), PeftConfig(task_type="SEQ_CLS", **kwargs), adapter_name=adapter_name
    )
    perturb(theirs, 12)
    theirs.eval().save_pretrained(tmp_path)
    where = tmp_path if adapter_name == "default" else tmp_path / adapter_name
    keys = load_file(where / WEIGHTS)
    assert f"base_model.model.bert.pooler.modules_to_save.{adapter_name}.dense.bias" in keys
    ours = load_adapter(BUILDERS["bert"](), where)
    torch.testing.assert_close(logits(ours, "bert"), logits(theirs, "bert"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa_exact", "olora"])
def test_svd_inits_on_a_convolution_warn_that_peft_cannot_load_the_plain_save(
    init: str, tmp_path: Path
) -> None:
    """PEFT refuses PiSSA/OLoRA on convolutions, so a plain save of such an adapter is a file
    PEFT cannot open: save_adapter says so; for_original_base=True gives one it loads."""
    import warnings

    from peft import PeftModel

    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
    ours = inject(
        _ConvNet(), LoraConfig(r=2, target_modules=["conv", "head"], init_lora_weights=init)
    )
    perturb(ours, 13)
    with pytest.warns(RuntimeWarning, match=r"convolution layers \('conv'\).*for_original_base"):
        save_adapter(ours, tmp_path / "plain")
    with pytest.raises(ValueError, match="init"):  # the refusal the warning speaks of
        PeftModel.from_pretrained(_ConvNet(), tmp_path / "plain")
    assert torch.equal(load_adapter(_ConvNet(), tmp_path / "plain")(x), ours(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        save_adapter(ours, tmp_path / "original", for_original_base=True)
        linear_only = inject(
            _ConvNet(), LoraConfig(r=2, target_modules=["head"], init_lora_weights=init)
        )
        save_adapter(linear_only, tmp_path / "linear")  # no convolution: no warning
    theirs = PeftModel.from_pretrained(_ConvNet(), tmp_path / "original").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-5)


def test_dora_with_an_svd_init_on_a_convolution_is_not_told_to_save_for_the_original_base(
    tmp_path: Path,
) -> None:
    """The warning advised for_original_base=True, which a DoRA adapter refuses."""
    ours = inject(
        _ConvNet(),
        LoraConfig(r=2, target_modules=["conv"], init_lora_weights="pissa_exact", use_dora=True),
    )
    with pytest.warns(RuntimeWarning, match="convolution") as record:
        save_adapter(ours, tmp_path / "plain")
    message = str(record[0].message)
    assert "no for_original_base form" in message and "save with for_original_base" not in message
    with pytest.raises(ConfigError, match="cannot be re-expressed"):  # what the advice led to
        save_adapter(ours, tmp_path / "original", for_original_base=True)


def test_olora_on_conv1d_warns_that_peft_cannot_load_the_plain_save(tmp_path: Path) -> None:
    """PEFT 0.21.2's OLoRA ignores GPT-2's transposed Conv1D weight (its factors have the wrong
    shapes), so it could not open a plain save, silently; PiSSA it handles."""
    import warnings

    from lora_testkit import tiny_gpt2
    from peft import PeftModel

    ours = inject(
        tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights="olora")
    )
    perturb(ours, 13)
    with pytest.warns(RuntimeWarning, match=r"OLoRA on Conv1D layers \('.*c_attn'.*for_original"):
        save_adapter(ours, tmp_path / "plain")
    with pytest.raises(RuntimeError, match="size mismatch"):  # the failure the warning names
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "plain")
    want = logits(ours, "gpt2")
    torch.testing.assert_close(logits(load_adapter(tiny_gpt2(), tmp_path / "plain"), "gpt2"), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        save_adapter(ours, tmp_path / "original", for_original_base=True)
        pissa = inject(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"],
                                               init_lora_weights="pissa_exact"))  # fmt: skip
        save_adapter(pissa, tmp_path / "pissa")  # PEFT's PiSSA transposes: no warning
    theirs = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "original").eval()
    torch.testing.assert_close(logits(theirs, "gpt2"), want, rtol=0, atol=1e-5)


def test_peft_dora_embedding_saved_with_its_embedding_layers_loads(tmp_path: Path) -> None:
    """PEFT's save_embedding_layers=True writes a DoRA embedding's magnitude twice
    (``….lora_magnitude_vector`` and ``….lora_magnitude_vector.weight``); rankwise refused the
    second as an unexpected key. A copy that differs is still refused."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from safetensors.torch import save_file

    from rankwise.errors import AdapterFormatError

    config = PeftConfig(r=4, lora_alpha=8, target_modules=["word_embeddings"], use_dora=True,
                        init_lora_weights=False)  # fmt: skip
    theirs = get_peft_model(BUILDERS["bert"](), config)
    theirs.eval().save_pretrained(tmp_path, save_embedding_layers=True)
    keys = load_file(tmp_path / WEIGHTS)
    twice = "base_model.model.bert.embeddings.word_embeddings.lora_magnitude_vector"
    assert twice in keys and twice + ".weight" in keys
    ours = load_adapter(BUILDERS["bert"](), tmp_path)
    torch.testing.assert_close(logits(ours, "bert"), logits(theirs, "bert"), rtol=0, atol=1e-5)
    keys[twice + ".weight"] = keys[twice + ".weight"] + 1.0
    save_file(keys, tmp_path / WEIGHTS)
    with pytest.raises(AdapterFormatError, match="their values differ"):
        load_adapter(BUILDERS["bert"](), tmp_path)


def test_overlapping_patterns_keep_their_order_in_the_file(tmp_path: Path) -> None:
    # The first matching key wins (PEFT's get_pattern_key). The file used to be written with
    # sorted keys: layer 0's query then reloaded with α = 30 instead of 3 (logits 1e-2 off,
    # silently), and an overlapping rank_pattern gave a file neither loader could read.
    from peft import PeftModel

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        rank_pattern={"query": 2, r"layer\.0\.attention\.self\.query": 6},
        alpha_pattern={"value": 3, r"layer\.0\.attention\.self\.value": 30},
        task_type="SEQ_CLS",
    )
    ours = inject(BUILDERS["bert"](), config)
    assert {n: layer.r for n, layer in lora_layers(ours) if "query" in n} == {
        "bert.encoder.layer.0.attention.self.query": 2,
        "bert.encoder.layer.1.attention.self.query": 2,
    }
    perturb(ours, 3)
    expected = logits(ours, "bert")
    save_adapter(ours, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(written["rank_pattern"]) == list(config.rank_pattern)
    assert list(written["alpha_pattern"]) == list(config.alpha_pattern)
    assert list(written) == sorted(written)  # the rest stays sorted
    mine = load_adapter(BUILDERS["bert"](), tmp_path)
    torch.testing.assert_close(logits(mine, "bert"), expected, rtol=0, atol=1e-6)
    theirs = PeftModel.from_pretrained(BUILDERS["bert"](), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, "bert"), expected, rtol=0, atol=1e-5)


def test_a_peft_file_whose_sorted_rank_pattern_reorders_matches_says_why(tmp_path: Path) -> None:
    """PEFT 0.21 saves rank_pattern with sorted keys: {"layer\\.0\\..*": 2, "key": 6} comes
    back as {"key": 6, ...}, so layer 0's key reads as rank 6 against 2 in the weights. PEFT
    refuses its own file; the refusal here names the module and now says why."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    kwargs = dict(r=4, lora_alpha=8, target_modules=["query", "key"], task_type="SEQ_CLS")
    get_peft_model(
        BUILDERS["bert"](), PeftConfig(**kwargs, rank_pattern={r"layer\.0\..*": 2, "key": 6})
    ).save_pretrained(tmp_path)
    assert (
        list(json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"])[0] == "key"
    )
    model = BUILDERS["bert"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ShapeMismatchError, match=r"layer\.0\.attention\.self\.key.*PEFT saves them"
    ):
        load_adapter(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # a model of another width is not a rank_pattern matter: no hint (it was added to any
    # lora_ mismatch)
    from transformers import BertConfig, BertForSequenceClassification

    wide = BertForSequenceClassification(
        BertConfig(**{**model.config.to_dict(), "hidden_size": 2 * model.config.hidden_size})
    )
    with pytest.raises(ShapeMismatchError) as info:
        load_adapter(wide, tmp_path)
    assert "PEFT saves them" not in str(info.value)


@pytest.mark.parametrize("dora", [False, True])
def test_a_merged_model_saves_its_unmerged_embedding_and_can_still_unmerge(
    tmp_path: Path, dora: bool
) -> None:
    """An embedding adapted under a name PEFT does not count as an embedding target
    ("model.embed_tokens"): a merged model's file held the merged weight under the wrapper's
    name (".base_layer.weight") beside a stray ".weight" (load_adapter refused it, PEFT applied
    the update twice). A merged DoRA model lost its merge-time norm to the save: unmerge and a
    second save then failed with "no weight norm recorded"."""
    from peft import PeftModel

    from rankwise.lora import unmerge

    base = BUILDERS["llama"]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["model.embed_tokens", "q_proj"],
                     use_dora=dora)  # fmt: skip
    model = inject(base(), cfg, generator=0)
    perturb(model, 1)
    want = logits(model, "llama")
    merge(model)
    for round_ in range(2):  # a second save of the merged model works too
        save_adapter(model, tmp_path / f"a{round_}", save_embedding_layers=True)
    keys = load_file(tmp_path / "a0" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.weight" not in keys
    stored = keys["base_model.model.model.embed_tokens.base_layer.weight"]
    torch.testing.assert_close(stored, base().model.embed_tokens.weight, rtol=0, atol=1e-6)
    for folder in ("a0", "a1"):
        again = load_adapter(base(), tmp_path / folder)
        torch.testing.assert_close(logits(again, "llama"), want, rtol=0, atol=1e-5)
    theirs = PeftModel.from_pretrained(base(), str(tmp_path / "a0")).eval()
    torch.testing.assert_close(logits(theirs, "llama"), want, rtol=0, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(logits(model, "llama"), want, rtol=0, atol=1e-5)


def test_a_compiled_model_saves_as_the_model_it_wraps(tmp_path: Path) -> None:
    # keys were written under base_model.model._orig_mod.…: neither rankwise nor PEFT loaded it
    from peft import PeftModel

    model = inject(BUILDERS["bert"](), LoraConfig(r=4, lora_alpha=8, target_modules=["query"],
                                                  task_type="SEQ_CLS"), generator=0)  # fmt: skip
    perturb(model, 3)
    expected = logits(model, "bert")
    save_adapter(torch.compile(model), tmp_path)  # nothing compiles until a forward
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys and not any("_orig_mod" in k for k in keys)
    theirs = PeftModel.from_pretrained(BUILDERS["bert"](), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, "bert"), expected, atol=1e-5, rtol=0)
    mine = load_adapter(BUILDERS["bert"](), tmp_path)
    torch.testing.assert_close(logits(mine, "bert"), expected, atol=1e-5, rtol=0)


def test_a_compiled_model_loads_into_the_model_it_wraps(tmp_path: Path) -> None:
    # load_adapter(torch.compile(model), d) refused every key (it expected _orig_mod.…)
    model = inject(BUILDERS["bert"](), LoraConfig(r=4, lora_alpha=8, target_modules=["query"],
                                                  task_type="SEQ_CLS"), generator=0)  # fmt: skip
    perturb(model, 3)
    expected = logits(model, "bert")
    save_adapter(model, tmp_path)
    compiled = torch.compile(BUILDERS["bert"]())
    assert load_adapter(compiled, tmp_path) is compiled  # the wrapper, as given
    inner = compiled._orig_mod
    assert not inner.training
    torch.testing.assert_close(logits(inner, "bert"), expected, atol=1e-5, rtol=0)
    # a second adapter of the same shapes swaps in place through the wrapper too
    perturb(model, 4)
    save_adapter(model, tmp_path / "second")
    load_adapter(compiled, tmp_path / "second")
    torch.testing.assert_close(logits(inner, "bert"), logits(model, "bert"), atol=1e-5, rtol=0)
