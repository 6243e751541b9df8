"""The eval-mode inference cache of linear LoRA layers: W0 + s·B A formed once per weight version."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.lora import LoraLinear, lora_layers


def _hf_conv1d(in_f: int, out_f: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(out_f, in_f)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


def _model(kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    first = nn.Linear(12, 20) if kind == "linear" else _hf_conv1d(12, 20)
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(20, 6)).to(dtype)
    rw.inject(model, rw.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]), generator=0)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(std=0.3)
    return model


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same model's output through the three-GEMM path (cache off), in float64."""
    rw.set_inference_cache(model, False)
    try:
        with torch.no_grad():
            return model(x).double()
    finally:
        rw.set_inference_cache(model, True)


def _cached(model: nn.Module) -> list[object]:
    return [layer.__dict__.get("_eval_weight") for _, layer in lora_layers(model)]


@pytest.mark.parametrize("kind", ["linear", "conv1d_hf"])
def test_cached_eval_forward_matches_the_adapter_path(kind: str) -> None:
    model = _model(kind).eval()
    x = torch.randn(3, 5, 12)
    want = _reference(model, x)
    with torch.no_grad():
        got = model(x)
    assert all(c is not None for c in _cached(model)), "eval + no_grad must use the cache"
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # the cached weight is the merge's weight, in (out, in) layout
    layer = model[0]
    assert isinstance(layer, LoraLinear)
    A, B = layer.factors()
    dense = layer.base_matrix() + layer.scaling * B @ A
    torch.testing.assert_close(layer.inference_weight(), dense, atol=1e-6, rtol=1e-6)


def test_cache_follows_every_weight_change_and_is_dropped_by_train() -> None:
    model = _model("linear").eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        model(x)
        first = model[0].inference_weight()
        assert model[0].inference_weight() is first  # built once
        before = model(x)
        model[0].lora_A.weight.add_(0.1)  # an in-place write bumps the version counter
        after = model(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after.double(), _reference(model, x), atol=1e-5, rtol=1e-5)
    model.train()
    assert _cached(model) == [None, None]


def test_cache_follows_an_optimizer_step() -> None:
    model = _model("linear")
    x = torch.randn(8, 12)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.eval()
    with torch.no_grad():
        model(x)  # cache built
    model.train()
    model(x).square().sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got.double(), _reference(model, x), atol=1e-5, rtol=1e-5)


def test_cache_is_not_used_with_grad_or_in_training() -> None:
    model = _model("linear")
    x = torch.randn(4, 12)
    model.eval()
    out = model(x)  # eval with autograd on: gradients must reach the adapter
    out.sum().backward()
    assert model[0].lora_A.weight.grad is not None
    assert _cached(model) == [None, None]
    model.train()
    with torch.no_grad():
        model(x)
    assert _cached(model) == [None, None]


def test_set_inference_cache_off_keeps_memory_flat_and_results_equal() -> None:
    model = _model("linear").eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        on = model(x)
    assert rw.set_inference_cache(model, False) is model
    assert _cached(model) == [None, None]  # turning it off frees the cached weights
    with torch.no_grad():
        off = model(x)
    assert _cached(model) == [None, None]
    torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="enabled"):
        rw.set_inference_cache(model, "no")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="adapter"):
        rw.set_inference_cache(nn.Linear(2, 2), True)  # no adapters injected


def test_float64_cache_keeps_float64() -> None:
    model = _model("linear", torch.float64).eval()
    x = torch.randn(4, 12, dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
    assert model[0].inference_weight().dtype == torch.float64
    torch.testing.assert_close(got, _reference(model, x), atol=1e-12, rtol=1e-12)


def test_low_precision_base_is_not_cached() -> None:
    """bf16 weights with float32 adapters: a bf16 merged weight would round the update away
    (see the numerics benchmark), so inference keeps the adapter path."""
    model = _model("linear", torch.bfloat16).eval()
    with torch.no_grad():
        model(torch.randn(4, 12, dtype=torch.bfloat16))
    assert _cached(model) == [None, None]


def test_disabled_and_merged_layers_run_the_base() -> None:
    model = _model("linear").eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        adapted = model(x)
        with rw.disable_adapters(model):
            base = model(x)
        rw.merge(model)
        merged = model(x)
        rw.unmerge(model)
        again = model(x)
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_cache_follows_a_fused_optimizer_step_in_eval_mode(use_dora: bool) -> None:
    """torch's fused optimizers (transformers.Trainer's default "adamw_torch_fused") update
    parameters without bumping their version counters: the cache built before a step taken
    in eval mode was reused after it (|Δ| 0.64 against PEFT)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6))
    config = rw.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=use_dora)
    rw.inject(model, config, generator=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1, fused=True)
    x = torch.randn(8, 12)
    model.eval()
    for _ in range(2):
        with torch.no_grad():
            model(x)  # builds (or reuses) the cache
        model(x).square().mean().backward()  # still in eval mode
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            got = model(x)
        want = model(x).detach()  # autograd on: no cache
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_copies_and_pickles_leave_the_inference_cache_behind() -> None:
    import copy
    import io

    model = nn.Sequential(nn.Linear(64, 48))
    rw.inject(model, rw.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), generator=0)
    model.eval()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))

    def pickled_size() -> int:
        buffer = io.BytesIO()
        torch.save(model, buffer)  # the whole module pickled (never loaded back here)
        return buffer.getbuffer().nbytes

    plain = pickled_size()
    with torch.no_grad():
        expected = model(x)
    assert "_eval_weight" in model[0].__dict__  # the cache is built: a (48, 64) matrix
    assert pickled_size() == plain  # not in the pickle (it was +48·64·4 bytes)
    clone = copy.deepcopy(model)
    assert "_eval_weight" not in clone[0].__dict__
    assert "_eval_weight" in model[0].__dict__  # the original keeps its own
    with torch.no_grad():
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)


def test_parameters_replaced_by_assign_never_hit_a_stale_cache() -> None:
    """``load_state_dict(..., assign=True)`` frees the old factors; a new tensor at the same
    address and version 0 matched the cache key (28 of 50 swaps gave the first adapter's
    output). The key now also holds the tensor object (weakly)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    rw.inject(model, rw.LoraConfig(r=4, target_modules=["0"]), generator=0)
    model.eval()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))

    def adapter(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {
            "0.lora_A.weight": torch.randn(4, 64, generator=g),
            "0.lora_B.weight": torch.randn(64, 4, generator=g),
        }

    for _ in range(20):
        for seed in (1, 2, 3):  # no forward with adapter 2: its tensors are freed at once
            model.load_state_dict(adapter(seed), strict=False, assign=True)
            if seed == 2:
                continue
            with torch.no_grad():
                cached = model(x)
            exact = model(x).detach()  # grad mode: no cache (a different rounding)
            torch.testing.assert_close(cached, exact, rtol=1e-4, atol=1e-4 * exact.abs().max())


def test_a_key_on_a_view_names_the_viewed_tensor() -> None:
    """DoRA keys its caches on ``W.t()`` / ``flatten(1)``, views made afresh on each call: a
    weak reference to the view died at once and the key never matched (the norm was
    recomputed on every forward: 192 ms against 16 ms for a 30000×384 embedding)."""
    from rankwise.lora.cache_key import weights_key

    W = nn.Parameter(torch.randn(6, 4))
    assert weights_key(W.t()) == weights_key(W.t())
    assert weights_key(W.flatten()) == weights_key(W.flatten())
    assert weights_key(W.t()) != weights_key(W)  # another view of the same tensor
    assert weights_key(W[:3]) != weights_key(W[3:])
    before = weights_key(W.t())
    with torch.no_grad():
        W.add_(1.0)  # a write through the parameter bumps the view's version too
    assert weights_key(W.t()) != before
    other = nn.Parameter(W.detach().clone())
    assert weights_key(other.t()) != weights_key(W.t())


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    calls = [0]
    real = getattr(owner, name)

    def counting(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def test_dora_caches_hit_on_embedding_conv1d_and_conv_layers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rankwise.lora import dora

    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"emb": nn.Embedding(50, 8), "c1d": _hf_conv1d(8, 8), "conv": nn.Conv2d(3, 4, 3)}
    )
    config = rw.LoraConfig(r=2, target_modules=["emb", "c1d", "conv"], use_dora=True)
    rw.inject(model, config, generator=0)
    model.eval()
    ids = torch.randint(0, 50, (2, 5))
    x, img = torch.randn(2, 8), torch.randn(1, 3, 6, 6)
    norms = _count_calls(monkeypatch, dora, "dora_row_norm")
    merged = _count_calls(monkeypatch, type(model["c1d"]), "_merged_t")
    with torch.no_grad():
        first = [model["emb"](ids), model["c1d"](x), model["conv"](img)]
        n_norm, n_merged = norms[0], merged[0]
        for _ in range(5):
            again = [model["emb"](ids), model["c1d"](x), model["conv"](img)]
    assert norms[0] == n_norm  # the embedding's norm: computed once (was once per forward)
    assert merged[0] == n_merged  # Conv1D's merged weight: formed once (was once per forward)
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_dora_models_pickle_and_copy(kind: str) -> None:
    """A DoRA layer keeps cache keys from ``inject`` on (its norm); a key held a weak
    reference, which cannot be pickled: ``torch.save(model)`` and ``pickle.dumps`` failed."""
    import copy
    import io
    import pickle

    torch.manual_seed(0)
    base = nn.Linear(16, 8) if kind == "linear" else nn.Embedding(20, 8)
    model = nn.Sequential(base)
    rw.inject(model, rw.LoraConfig(r=2, target_modules=["0"], use_dora=True), generator=0)
    with torch.no_grad():
        model[0].lora_B.weight.normal_() if kind == "linear" else model[
            0
        ].lora_embedding_B.normal_()
    model.eval()
    x = torch.randn(3, 16) if kind == "linear" else torch.randint(0, 20, (3, 4))
    with torch.no_grad():
        expected = model(x)
    torch.save(model, io.BytesIO())  # pickled whole (never loaded back from a file here)
    # our own object, pickled in memory a line above (not untrusted data)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):  # noqa: S301
        with torch.no_grad():
            torch.testing.assert_close(clone(x), expected, rtol=1e-6, atol=1e-6)
            # the copy's caches follow its own weights (not a rescaling: DoRA's direction
            # W/‖W‖ would not change)
            clone[0].base_layer.weight.add_(torch.randn(clone[0].base_layer.weight.shape))
            changed = clone(x)
        assert not torch.allclose(changed, expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_adapters_made_under_inference_mode_run_and_follow_writes(dora: bool) -> None:
    # inference tensors have no version counter: the first eval forward raised "Inference
    # tensors do not track version counter" (a serving pattern: load_adapter in the block)
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(8, 6))
        rw.inject(model, rw.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False,
                                       use_dora=dora), generator=0)  # fmt: skip
        model.eval()
        layer = model[0]
        first = model(x)
        with rw.disable_adapters(model):
            base = model(x)
        assert not torch.allclose(first, base)
        layer.lora_B.weight.mul_(2.0)  # an in-place write no version counter sees
        second = model(x)
        layer.train()  # the uncached route: the reference
        want = model(x)
    torch.testing.assert_close(second, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(second, first)


@pytest.mark.parametrize("use_dora", [False, True])
def test_swapped_parameters_after_a_cached_forward(use_dora: bool) -> None:
    """torch.utils.swap_tensors refuses a tensor with a weak reference, which the caches' keys
    hold: under set_swap_module_params_on_conversion(True) (always for wrapper-subclass
    parameters) ``.to()`` and ``load_state_dict`` failed after one cached eval forward (DoRA:
    after any forward), leaving the model half converted (22 float32 and 3 float64 weights)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6))
    config = rw.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=use_dora)
    rw.inject(model, config, generator=0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(std=0.3)
    x = torch.randn(8, 12)
    model(x).sum().backward()  # DoRA keeps its norm cache in training too
    model.eval()
    with torch.no_grad():
        before = model(x)  # builds the caches
    state = {k: v.clone() for k, v in model.state_dict().items()}
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
        assert {p.dtype for p in model.parameters()} == {torch.float64}
        with torch.no_grad():
            torch.testing.assert_close(model(x.double()), before.double(), atol=1e-5, rtol=1e-5)
        model.to(torch.float32)
        with torch.no_grad():
            model(x)  # cached again
        model.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
