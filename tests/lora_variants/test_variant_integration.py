"""Variants wired end to end: step-0 invariance, PEFT interop (DoRA, AdaLoRA), exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_testkit import BUILDERS, logits, token_batch
from safetensors.torch import load_file
from torch import nn

from rankwise.io import load_adapter, save_adapter
from rankwise.lora import LoraConfig, inject
from rankwise.lora.adalora import AdaLoraConfig
from rankwise.lora.adalora_alloc import RankAllocator
from rankwise.lora.lora_ga import lora_ga_init

FAMILIES = {
    "bert": dict(
        target_modules=["query", "value", "dense", "word_embeddings"], task_type="SEQ_CLS"
    ),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "wte"], task_type="CAUSAL_LM"),
    "llama": dict(target_modules="all-linear", task_type="CAUSAL_LM"),
}
LINEAR_ONLY = {
    "bert": dict(target_modules=["query", "value", "dense"], task_type="SEQ_CLS"),
    "gpt2": dict(target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM"),
    "llama": dict(target_modules="all-linear", task_type="CAUSAL_LM"),
}


def _perturb(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(
    "extra",
    [
        dict(init_lora_weights="gaussian"),
        dict(init_lora_weights="pissa"),
        dict(init_lora_weights="pissa_exact", use_dora=True),
        dict(init_lora_weights="olora", use_rslora=True),
        dict(init_lora_weights=True, use_dora=True),
        dict(use_lora_fa=True),
    ],
    ids=["gaussian", "pissa", "pissa+dora", "olora+rslora", "kaiming+dora", "lora_fa"],
)
def test_output_unchanged_at_step_0(family: str, extra: dict) -> None:
    base = BUILDERS[family]()
    expected = logits(base, family)
    model = inject(
        BUILDERS[family](), LoraConfig(r=4, lora_alpha=8, **FAMILIES[family], **extra), generator=0
    )
    torch.testing.assert_close(logits(model, family), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(LINEAR_ONLY))
def test_adalora_and_lora_ga_unchanged_at_step_0(family: str) -> None:
    expected = logits(BUILDERS[family](), family)
    ada = inject(
        BUILDERS[family](),
        AdaLoraConfig(init_r=4, target_r=2, total_step=10, **LINEAR_ONLY[family]),
        generator=0,
    )
    torch.testing.assert_close(logits(ada, family), expected, atol=1e-5, rtol=0)
    ids = token_batch(3)
    batch = {"input_ids": ids, "labels": torch.tensor([0, 1]) if family == "bert" else ids}
    ga = lora_ga_init(
        BUILDERS[family](),
        LoraConfig(r=2, lora_alpha=4, **LINEAR_ONLY[family]),
        [batch],
        generator=0,
    )
    torch.testing.assert_close(logits(ga, family), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dora_interop_with_peft_both_ways(family: str, tmp_path: Path) -> None:
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model

    kw = dict(r=4, lora_alpha=8, use_dora=True, **FAMILIES[family])
    ours = inject(BUILDERS[family](), LoraConfig(**kw), generator=0)
    _perturb(ours, 3)
    ours.eval()
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(BUILDERS[family](), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, family), logits(ours, family), atol=1e-5, rtol=0)

    peft_model = get_peft_model(BUILDERS[family](), PeftConfig(**kw))
    _perturb(peft_model, 5)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    back = load_adapter(BUILDERS[family](), tmp_path / "peft")
    torch.testing.assert_close(logits(back, family), logits(peft_model, family), atol=1e-5, rtol=0)
    ours_keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert ours_keys == set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert any(k.endswith("lora_magnitude_vector") for k in ours_keys)
    if family == "gpt2":
        return  # wte is tied to lm_head: merging is refused by design
    from rankwise.lora import merge_and_unload  # merged = unmerged

    torch.testing.assert_close(
        logits(merge_and_unload(back), family), logits(peft_model, family), atol=1e-5, rtol=0
    )


def _adalora_train(model: nn.Module, family: str, alloc_step: object, steps: int) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        out = logits_with_grad(model, family)
        out.square().mean().backward()
        opt.step()
        alloc_step(step)  # type: ignore[operator]
        opt.zero_grad()


def logits_with_grad(model: nn.Module, family: str) -> torch.Tensor:
    return model(input_ids=token_batch(1)).logits


@pytest.mark.parametrize("family", list(LINEAR_ONLY))
def test_adalora_interop_with_peft_both_ways(family: str, tmp_path: Path) -> None:
    from peft import AdaLoraConfig as PeftAda
    from peft import PeftModel, get_peft_model

    kw = dict(
        init_r=4, target_r=2, lora_alpha=8, total_step=6, tinit=1, tfinal=2, **LINEAR_ONLY[family]
    )
    cfg = AdaLoraConfig(**kw)
    ours = inject(BUILDERS[family](), cfg, generator=0)
    alloc = RankAllocator(ours, cfg)
    _adalora_train(ours, family, alloc.update_and_allocate, 6)
    assert cfg.rank_pattern and any(not all(m) for m in cfg.rank_pattern.values())
    ours.eval()
    save_adapter(ours, tmp_path / "ours")
    assert (
        json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"]
        == "ADALORA"
    )
    theirs = PeftModel.from_pretrained(BUILDERS[family](), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, family), logits(ours, family), atol=1e-5, rtol=0)
    back = load_adapter(BUILDERS[family](), tmp_path / "ours")
    torch.testing.assert_close(logits(back, family), logits(ours, family), atol=1e-5, rtol=0)

    peft_model = get_peft_model(BUILDERS[family](), PeftAda(**kw))
    _adalora_train(peft_model, family, peft_model.base_model.update_and_allocate, 6)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    mine = load_adapter(BUILDERS[family](), tmp_path / "peft")
    torch.testing.assert_close(logits(mine, family), logits(peft_model, family), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora", "lora_ga"])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_export_for_original_base_reproduces_the_trained_model(
    init: str, family: str, tmp_path: Path
) -> None:
    from peft import PeftModel

    kw = dict(r=2, lora_alpha=4, **LINEAR_ONLY[family])
    if init == "lora_ga":
        ids = token_batch(3)
        batch = {"input_ids": ids, "labels": torch.tensor([0, 1]) if family == "bert" else ids}
        model = lora_ga_init(BUILDERS[family](), LoraConfig(**kw), [batch], generator=0)
    else:
        model = inject(BUILDERS[family](), LoraConfig(**kw, init_lora_weights=init), generator=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # train a little
        logits_with_grad(model, family).square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    expected = logits(model, family)
    save_adapter(model, tmp_path, for_original_base=True)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["init_lora_weights"] is True
    theirs = PeftModel.from_pretrained(BUILDERS[family](), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, family), expected, atol=1e-5, rtol=0)
    mine = load_adapter(BUILDERS[family](), tmp_path)
    torch.testing.assert_close(logits(mine, family), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa_exact", "olora", "lora_ga"])
def test_export_for_original_base_with_lm_head_targeted(init: str, tmp_path: Path) -> None:
    # lm_head targeted: the file carries its base weight (PEFT's save_embedding_layers rule),
    # which held the residual W - s·B0 A0: loaded on the original base it replaced W, and the
    # rank-2r update meant for W came on top (logits off by 0.1-2)
    from peft import PeftModel

    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    if init == "lora_ga":
        ids = token_batch(3)
        batch = {"input_ids": ids, "labels": ids}
        model = lora_ga_init(BUILDERS["llama"](), LoraConfig(**kw), [batch], generator=0)
    else:
        model = inject(BUILDERS["llama"](), LoraConfig(**kw, init_lora_weights=init), generator=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        logits_with_grad(model, "llama").square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    expected = logits(model, "llama")
    save_adapter(model, tmp_path, for_original_base=True)
    original = BUILDERS["llama"]().lm_head.weight
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    torch.testing.assert_close(
        saved["base_model.model.lm_head.base_layer.weight"], original, atol=1e-6, rtol=0
    )
    theirs = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, "llama"), expected, atol=1e-5, rtol=0)
    mine = load_adapter(BUILDERS["llama"](), tmp_path)
    torch.testing.assert_close(logits(mine, "llama"), expected, atol=1e-5, rtol=0)


def test_pissa_exact_file_loads_in_peft_on_the_original_base(tmp_path: Path) -> None:
    from peft import PeftModel

    model = inject(
        BUILDERS["bert"](),
        LoraConfig(r=2, lora_alpha=4, init_lora_weights="pissa_exact", **LINEAR_ONLY["bert"]),
    )
    _perturb(model, 1, scale=0.01)
    model.eval()
    save_adapter(model, tmp_path)
    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    )
    theirs = PeftModel.from_pretrained(BUILDERS["bert"](), tmp_path).eval()  # PEFT redoes the SVD
    torch.testing.assert_close(logits(theirs, "bert"), logits(model, "bert"), atol=1e-4, rtol=0)


def test_lora_fa_trains_only_b() -> None:
    model = inject(
        BUILDERS["bert"](), LoraConfig(r=4, use_lora_fa=True, **LINEAR_ONLY["bert"]), generator=0
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        logits_with_grad(model, "bert").square().mean().backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_B" in n or n.startswith("classifier") for n in changed)


def test_lora_fa_stays_frozen_when_a_file_is_swapped_in(tmp_path: Path) -> None:
    # Files do not record LoRA-FA; a swap in place took the file's config whole and made
    # every lora_A trainable again.
    from rankwise.lora import get_config

    config = LoraConfig(r=4, use_lora_fa=True, **LINEAR_ONLY["bert"])
    model = inject(BUILDERS["bert"](), config, generator=0)
    save_adapter(model, tmp_path)
    load_adapter(model, tmp_path, is_trainable=True)
    assert get_config(model).use_lora_fa
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("lora_A" in n for n in trainable)
    assert any("lora_B" in n for n in trainable)


def test_export_for_original_base_keeps_a_float64_lm_head_in_float64(tmp_path: Path) -> None:
    # the restored base weight was summed in float32: 3e-8 off in a float64 model
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(50, 16)
            self.lm_head = nn.Linear(16, 50, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lm_head(self.embed_tokens(x))

        def get_input_embeddings(self) -> nn.Module:
            return self.embed_tokens

        def get_output_embeddings(self) -> nn.Module:
            return self.lm_head

    torch.manual_seed(0)
    model = Tiny().double()
    original = model.lm_head.weight.detach().clone()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights="pissa_exact")
    save_adapter(inject(model, cfg, generator=0), tmp_path, for_original_base=True)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    weight = saved["base_model.model.lm_head.base_layer.weight"]
    assert weight.dtype == torch.float64
    torch.testing.assert_close(weight, original, atol=1e-13, rtol=0)
