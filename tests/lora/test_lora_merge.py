"""Merge / unmerge / unload / disable on real model families."""

from __future__ import annotations

import pytest
import torch
from lora_testkit import BUILDERS, logits, tiny_bert_cls
from torch import nn

from rankwise.errors import InjectionError, MergeError
from rankwise.lora import (
    LoraConfig,
    LoraLayer,
    disable_adapters,
    inject,
    lora_layers,
    merge,
    merge_and_unload,
    unload,
    unmerge,
)
from rankwise.lora.merge import merge_blocker

TARGETS = {
    "bert": ["query", "value", "dense", "word_embeddings"],
    "gpt2": ["c_attn", "c_proj", "wpe"],
    "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "vit": ["q_proj", "v_proj", "fc1", "projection"],
}


def _adapted(family: str) -> nn.Module:
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=False)
    return inject(BUILDERS[family](), cfg, generator=0)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_merged_equals_unmerged_and_back(family: str) -> None:
    model = _adapted(family)
    base_out = logits(BUILDERS[family](), family)
    out = logits(model, family)
    assert (out - base_out).abs().max() > 1e-3  # the adapter really changes the output
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge(model)
    assert all(layer.merged for _, layer in lora_layers(model))
    torch.testing.assert_close(logits(model, family), out, rtol=1e-5, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(logits(model, family), out, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=1e-6, atol=1e-6)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert {n: type(m) for n, m in plain.named_modules()} == {
        n: type(m) for n, m in BUILDERS[family]().named_modules()
    }
    torch.testing.assert_close(logits(plain, family), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_unload_gives_the_base_model_back(family: str) -> None:
    model = _adapted(family)
    ref = BUILDERS[family]()
    flags = {n: p.requires_grad for n, p in ref.named_parameters()}
    merge(model)  # unload unmerges first
    plain = unload(model)
    assert plain.state_dict().keys() == ref.state_dict().keys()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k], rtol=1e-6, atol=1e-6)
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags
    with pytest.raises(InjectionError, match="no rankwise LoRA adapters"):
        merge(plain)


def test_disable_adapters_runs_the_base_model_including_heads() -> None:
    model = inject(tiny_bert_cls(), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS",
                                               init_lora_weights=False))  # fmt: skip
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # a "trained" head
    out = logits(model, "bert")
    with disable_adapters(model):
        torch.testing.assert_close(
            logits(model, "bert"), logits(tiny_bert_cls(), "bert"), rtol=0, atol=1e-6
        )
    torch.testing.assert_close(logits(model, "bert"), out, rtol=0, atol=0)
    merge(model)
    with disable_adapters(model):
        torch.testing.assert_close(
            logits(model, "bert"), logits(tiny_bert_cls(), "bert"), rtol=1e-5, atol=1e-5
        )
    assert all(layer.merged for _, layer in lora_layers(model))
    torch.testing.assert_close(logits(model, "bert"), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapters_restores_everything_when_the_block_raises(merged: bool) -> None:
    model = inject(tiny_bert_cls(), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS",
                                               init_lora_weights=False))  # fmt: skip
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    if merged:
        merge(model)
    out = logits(model, "bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside the block"), disable_adapters(model):
        raise RuntimeError("inside the block")
    assert all(layer.merged == merged for _, layer in lora_layers(model))
    after = model.state_dict()
    assert all(torch.allclose(after[k], v, rtol=1e-6, atol=1e-6) for k, v in state.items())
    torch.testing.assert_close(logits(model, "bert"), out, rtol=1e-5, atol=1e-5)


def test_nested_disable_adapters_keeps_the_outer_block_disabled() -> None:
    model = inject(tiny_bert_cls(), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS",
                                               init_lora_weights=False))  # fmt: skip
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    out, base = logits(model, "bert"), logits(tiny_bert_cls(), "bert")
    with disable_adapters(model):
        with disable_adapters(model):
            torch.testing.assert_close(logits(model, "bert"), base, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits(model, "bert"), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, "bert"), out, rtol=0, atol=0)


def test_a_graph_built_before_disable_adapters_still_backpropagates(tmp_path) -> None:
    # the DPO pattern: policy forward with grad, reference forward with the adapters disabled,
    # then backward. The head (modules_to_save) was overwritten in place on entry and exit:
    # "one of the variables needed for gradient computation has been modified by an inplace
    # operation", and a save inside the block wrote the untrained head
    from safetensors.torch import load_file

    from rankwise.io import save_adapter

    def adapted() -> nn.Module:
        config = LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS",
                            init_lora_weights=False)  # fmt: skip
        model = inject(tiny_bert_cls(), config)
        with torch.no_grad():
            model.classifier.weight.add_(1.0)  # a "trained" head
        return model

    model, plain = adapted(), adapted()
    base = logits(tiny_bert_cls(), "bert")
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids).logits.square().sum()
    trained = model.classifier.weight
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, "bert"), base, rtol=0, atol=1e-6)
        assert not model.classifier.weight.requires_grad
        save_adapter(model, tmp_path)
    assert model.classifier.weight is trained and trained.requires_grad
    loss.backward()
    plain(input_ids=ids).logits.square().sum().backward()
    torch.testing.assert_close(trained.grad, plain.classifier.weight.grad, rtol=0, atol=0)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    torch.testing.assert_close(
        saved["base_model.model.classifier.weight"], trained.detach(), rtol=0, atol=0
    )


def test_disable_adapters_shows_the_injection_values_in_the_model_s_current_dtype() -> None:
    model = inject(tiny_bert_cls(), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS",
                                               init_lora_weights=False))  # fmt: skip
    model.to(torch.float64)
    with disable_adapters(model):
        assert model.classifier.weight.dtype == torch.float64
        torch.testing.assert_close(
            logits(model, "bert"), logits(tiny_bert_cls().double(), "bert"), rtol=0, atol=1e-9
        )
    assert model.classifier.weight.dtype == torch.float64


def test_merge_is_all_or_nothing() -> None:
    model = _adapted("bert")
    layers = [layer for _, layer in lora_layers(model)]
    with torch.no_grad():
        layers[-1].lora_B.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MergeError, match="non-finite"):
        merge(model)
    assert not any(layer.merged for layer in layers)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=1e-6, atol=1e-6, equal_nan=True)
    with pytest.raises(MergeError, match="not merged"):
        unmerge(model)


def test_merge_in_bfloat16_uses_float32() -> None:
    model = BUILDERS["llama"]().to(torch.bfloat16)
    inject(
        model,
        LoraConfig(r=4, target_modules=TARGETS["llama"], init_lora_weights=False),
        generator=0,
    )
    w0, bound = {}, {}
    for n, layer in lora_layers(model):
        assert layer.factors().B.dtype == torch.float32  # adapters stay float32
        w0[n] = layer.base_weight.detach().float()
        bound[n] = (w0[n].abs() + layer.delta_weight().abs()).max()
    merge(model)
    for n, layer in lora_layers(model):
        assert layer.base_weight.dtype == torch.bfloat16
        exact = w0[n] + layer.delta_weight()
        assert (layer.base_weight.float() - exact).abs().max() <= 2**-8 * bound[n]  # one rounding
    unmerge(model)
    for n, layer in lora_layers(model):
        assert (layer.base_weight.float() - w0[n]).abs().max() <= 2 * 2**-8 * bound[n]


def test_merge_refuses_tied_weights() -> None:
    model = inject(
        BUILDERS["gpt2"](), LoraConfig(r=2, target_modules=["wte"], init_lora_weights=False)
    )
    w = model.transformer.wte.base_weight.detach().clone()
    with pytest.raises(MergeError, match="tied to \\['lm_head.weight'\\]"):
        merge(model)
    assert torch.equal(model.transformer.wte.base_weight, w)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "gpt2-conv1d"])
def test_merge_writes_in_place_where_a_bound_proves_it_finite(conv1d: bool) -> None:
    """merge/unmerge formed every layer's new weight and kept them all until the writes
    (2.7x PEFT's merge time on a 1024-wide 8-layer Llama); where max|W| + |s| r max|A| max|B|
    bounds every entry far below the dtype's range it is written in place, the same bits."""
    import copy

    base = BUILDERS["gpt2" if conv1d else "llama"]()
    model = inject(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn" if conv1d else "q_proj"],
                                    init_lora_weights=False), generator=0)  # fmt: skip
    layers = dict(lora_layers(model))
    name, layer = next(iter(layers.items()))
    assert layer.fan_in_fan_out == conv1d
    assert layer.plan_write("merge") is None  # the in-place route
    expected = layer.planned_weight("merge")  # the formed route, for comparison
    other = copy.deepcopy(model)
    merge(model)
    assert torch.equal(layer.base_weight, expected)
    assert layer.plan_write("unmerge") is None
    before_unmerge = layer.planned_weight("unmerge")
    unmerge(model)
    assert torch.equal(layer.base_weight, before_unmerge)
    # NaN anywhere fails the bound: the exact check runs and names the layer, nothing written
    victim = dict(lora_layers(other))[name]
    with torch.no_grad():
        victim.lora_B.weight[0, 0] = float("nan")
    kept = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(MergeError, match=f"layer '{name}'"):
        merge(other)
    for n, p in other.named_parameters():  # bit-identical, the planted NaN included
        torch.testing.assert_close(p, kept[n], rtol=0, atol=0, equal_nan=True)


def test_merge_inside_disable_adapters_is_refused_and_the_block_stays_the_base() -> None:
    model = _adapted("bert")
    base_out = logits(BUILDERS["bert"](), "bert")
    with disable_adapters(model):
        with pytest.raises(MergeError, match="disabled"):
            merge(model)
        with pytest.raises(MergeError, match="disabled"):
            merge_and_unload(model)
        layer = next(layer for _, layer in lora_layers(model))
        with pytest.raises(MergeError, match="disabled"):
            layer.merge()
        assert not any(layer.merged for _, layer in lora_layers(model))
        torch.testing.assert_close(logits(model, "bert"), base_out, rtol=0, atol=0)
    merge(model)  # after the block: merges as usual
    assert all(layer.merged for _, layer in lora_layers(model))


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_unload_restores_flags_after_the_parameters_were_replaced() -> None:
    # load_state_dict(assign=True) puts new Parameter objects in: the flags recorded at
    # injection must still come back (they were kept by object and restored to orphans)
    model = BUILDERS["bert"]()
    model.bert.embeddings.requires_grad_(False)
    before = _flags(model)
    inject(model, LoraConfig(r=2, target_modules=["query"]), generator=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    unload(model)
    assert _flags(model) == before
    assert any(before.values()) and not all(before.values())


def test_get_state_on_a_parent_names_the_submodule_holding_the_adapters() -> None:
    model = BUILDERS["bert"]()
    inject(model.bert.encoder, LoraConfig(r=2, target_modules=["query"]), generator=0)
    for call in (unload, merge, lambda m: disable_adapters(m).__enter__()):
        with pytest.raises(InjectionError, match="submodule 'bert.encoder'"):
            call(model)
    unload(model.bert.encoder)  # where the message points: works
    assert not list(lora_layers(model))


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv"])  # the in-place and the formed route
def test_float64_merge_keeps_float64_precision(dora: bool, kind: str) -> None:
    """A float64 model's merge and unmerge compute in float64 (they went through float32:
    merged-vs-unmerged 8e-8, a round trip 2e-8 where PEFT gives ~1e-16)."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, shape = nn.Linear(16, 12), (5, 16)
    else:
        layer, shape = nn.Conv1d(4, 6, 3, padding=1), (2, 4, 7)
    model = nn.Sequential(layer).double()
    W0 = model[0].weight.detach().clone()
    cfg = LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, use_dora=dora)
    inject(model, cfg, generator=0)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
        merge(model)
        merged = model(x)
        unmerge(model)
    assert (merged - y).abs().max() < 1e-12
    assert (model[0].base_layer.weight - W0).abs().max() < 1e-14


def test_an_embedding_with_max_norm_is_not_merged() -> None:
    # the unmerged lookup renormalizes rows of W0 and of Aᵀ apart, the merged one rows of
    # W0 + ΔW (in place): merged outputs were 4.9 off (|y| ≤ 5.5) and unmerge left W 4.9 off
    model = nn.Sequential(nn.Embedding(30, 8, max_norm=1.0))
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False),
           generator=0)  # fmt: skip
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        model(ids)  # the lookup's own in-place renormalization, before the snapshot
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for operation in (merge, merge_and_unload):
        with pytest.raises(MergeError, match=r"embedding has max_norm=1.0.*unmerged"):
            operation(model)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert merge_blocker(model) is not None  # finetune --merge finds out before training


@pytest.mark.parametrize("mode", ["all", "lora_only"])
def test_disable_adapters_shows_the_base_biases_and_saves_the_trained_ones(mode, tmp_path) -> None:
    # the trained biases stayed in effect: outputs 2.04 (all) / 0.457 (lora_only) off the base
    from safetensors.torch import load_file

    from rankwise.io import save_adapter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    want = model(x).detach()
    inject(model, LoraConfig(r=2, target_modules=["0"], bias=mode), generator=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).pow(2).sum().backward()
    opt.step()
    trained = model(x).detach()
    bias = model[0].base_layer.bias.detach().clone()
    with disable_adapters(model):
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)
        save_adapter(model, tmp_path)  # the trained values, as outside the block
    stored = load_file(tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(stored["base_model.model.0.base_layer.bias"], bias, rtol=0, atol=0)
    torch.testing.assert_close(model(x), trained, rtol=0, atol=0)
    assert model[0].base_layer.bias.requires_grad


def test_disable_adapters_on_a_partly_merged_model_runs_the_base() -> None:
    # a layer merged on its own (LoraLayer.merge) ran its merged weight in the block: 0.77 off
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    want = model(x).detach()
    cfg = LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    inject(model, cfg, generator=0)
    adapted = model(x).detach()
    model[0].merge()
    with disable_adapters(model):
        assert not model[0].merged
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)
    assert model[0].merged and not model[2].merged
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-6)


def test_unload_inside_disable_adapters_keeps_the_trained_biases() -> None:
    # the block's bias stand-ins were restored by name after unload removed base_layer:
    # AttributeError on leaving the block, and the model kept the injection-time biases
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    inject(model, LoraConfig(r=2, target_modules=["0"], bias="lora_only"), generator=0)
    with torch.no_grad():
        model[0].base_layer.bias.add_(1.0)  # "trained"
    trained = model[0].base_layer.bias.detach().clone()
    with disable_adapters(model):
        plain = unload(model)
    assert isinstance(plain[0], nn.Linear) and torch.equal(plain[0].bias, trained)


def test_bias_stand_ins_cover_shared_biases_and_in_place_loads(tmp_path) -> None:
    from rankwise.io import load_adapter, save_adapter

    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.bias = a.bias  # one bias, two owners
    model = nn.Sequential(a, nn.Tanh(), b)
    x = torch.randn(3, 4)
    want = model(x).detach()
    inject(model, LoraConfig(r=2, target_modules=["0"], bias="lora_only"), generator=0)
    with torch.no_grad():
        model[0].base_layer.bias.add_(1.0)
    save_adapter(model, tmp_path / "tied")
    with disable_adapters(model):  # b still showed the trained bias: 1.0 off
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)
        with pytest.raises(Exception, match="inside disable_adapters"):  # would be dropped
            load_adapter(model, tmp_path / "tied")
    # a file training every bias, loaded in place into a bias="none" injection
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    want = base(x).detach()
    trained = inject(copy_of(base), LoraConfig(r=2, target_modules=["0"], bias="all"), generator=0)
    with torch.no_grad():
        trained[2].bias.add_(1.0)
    save_adapter(trained, tmp_path)
    model = inject(copy_of(base), LoraConfig(r=2, target_modules=["0"]), generator=0)
    load_adapter(model, tmp_path)
    with disable_adapters(model):  # 1.80 off: the file's biases were never recorded
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)


def copy_of(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_a_max_norm_embedding_layer_is_not_merged_on_its_own_either() -> None:
    model = nn.Sequential(nn.Embedding(30, 8, max_norm=1.0))
    inject(model, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False), generator=0)
    before = model[0].base_layer.weight.detach().clone()
    with pytest.raises(MergeError, match="max_norm=1.0"):
        model[0].merge()
    assert torch.equal(model[0].base_layer.weight, before) and not model[0].merged


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_half_precision_merge_runs_in_place_with_the_formed_rounding(
    dtype: torch.dtype, fan_in_fan_out: bool
) -> None:
    """A bf16/fp16 base with float32 adapters planned every layer's new weight before writing
    any: all of them held at once (+1.65 GB merging a 1B bf16 model, PEFT +0.25 GB). In place
    now, one layer at a time, with the same float32 formula and rounding."""
    from rankwise.lora.layers import LoraLinear

    torch.manual_seed(0)
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(24, 16)
    else:
        base = nn.Linear(16, 24)
    base = base.to(dtype).requires_grad_(False)
    layer = LoraLinear(base, r=4, lora_alpha=8, scaling=2.0, lora_dropout=0.0)
    g = torch.Generator().manual_seed(1)
    layer.set_factors(torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g))
    assert layer.lora_A.weight.dtype == torch.float32
    expected = layer.planned_weight("merge")  # the formed route: float32, rounded once
    assert layer.plan_write("merge") is None  # the in-place route
    before = layer.base_weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_weight, expected)
    layer.unmerge()
    assert torch.equal(layer.base_weight, layer.unmerged_weight(expected.float()).to(dtype))
    assert (layer.base_weight.float() - before.float()).abs().max() < 0.1
    # a result that may overflow the half dtype: the formed route, which checks and names it
    if dtype == torch.float16:
        with torch.no_grad():
            layer.lora_B.weight.fill_(1e5)
        assert not layer._in_place_is_safe("merge")  # the bound fails: formed and checked
        kept = layer.base_weight.detach().clone()
        with pytest.raises(MergeError, match="non-finite"):
            layer.merge()
        assert torch.equal(layer.base_weight, kept) and not layer.merged
