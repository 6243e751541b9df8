"""Customised modules stay in charge: hooks, a replaced ``forward``, accelerate's offloading and
``torch.compile`` — each against PEFT, which calls the base layer and the factors as modules."""

from __future__ import annotations

import pytest
import torch
from lora_testkit import BUILDERS, logits
from torch import nn

from rankwise.io import load_adapter, save_adapter
from rankwise.lora import LoraConfig, inject, set_inference_cache

X = torch.randn(160, 16, generator=torch.Generator().manual_seed(0))  # > 128 rows


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))


def _plus_100(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + 100.0


def _patched_forward(layer: nn.Linear):
    original = layer.forward
    return lambda x: original(x) + 100.0


CUSTOMISATIONS = {
    "forward hook on the base": lambda net: net[0].register_forward_hook(_plus_100),
    "forward replaced on the instance": lambda net: setattr(
        net[0], "forward", _patched_forward(net[0])
    ),
}


def _pair(use_dora: bool, customise) -> tuple[nn.Module, nn.Module]:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    kwargs = dict(r=4, lora_alpha=8, target_modules=["0"], use_dora=use_dora)
    nets = []
    for make in ("ours", "peft"):
        net = _net()
        customise(net)
        if make == "ours":
            nets.append(inject(net, LoraConfig(**kwargs), generator=0))
        else:
            nets.append(get_peft_model(net, PeftConfig(**kwargs)).base_model.model)
    g = torch.Generator().manual_seed(1)
    ours, theirs = nets
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            value = torch.randn(getattr(ours[0], name).weight.shape, generator=g) * 0.3
            getattr(ours[0], name).weight.copy_(value)
            getattr(theirs[0], name)["default"].weight.copy_(value)
    return ours, theirs


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("what", list(CUSTOMISATIONS))
@pytest.mark.parametrize("rows", [8, 160])
def test_customised_base_layer_is_called_as_peft(use_dora: bool, what: str, rows: int) -> None:
    ours, theirs = _pair(use_dora, CUSTOMISATIONS[what])
    x = X[:rows]
    for train in (True, False):
        ours.train(train)
        theirs.train(train)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                got, want = ours[0](x), theirs[0](x)  # the adapted layer
            assert got.min() > 10  # the +100 went through (DoRA: scaled by its c)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True])
def test_backward_hooks_and_factor_hooks_fire(use_dora: bool) -> None:
    calls: list[str] = []
    ours, _ = _pair(use_dora, lambda net: None)
    ours[0].base_layer.register_full_backward_hook(lambda *a: calls.append("base backward"))
    ours[0].lora_A.register_forward_hook(lambda *a: calls.append("lora_A forward"))
    ours(X.requires_grad_(False).clone().requires_grad_(True)).sum().backward()
    assert "base backward" in calls and "lora_A forward" in calls


def test_accelerate_cpu_offload_gives_the_same_logits(tmp_path) -> None:
    """accelerate keeps offloaded weights on "meta" and fills them in through a hook that
    replaces each module's forward: every module must be called as a module."""
    accelerate = pytest.importorskip("accelerate")
    model = inject(BUILDERS["llama"](), LoraConfig(r=4, target_modules="all-linear"), generator=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(model, tmp_path)
    want = logits(model, "llama")
    for cache in (True, False):
        for train in (False, True):
            offloaded = load_adapter(BUILDERS["llama"](), tmp_path)
            set_inference_cache(offloaded, cache)
            accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))
            offloaded.train(train)
            torch.testing.assert_close(logits(offloaded, "llama"), want, rtol=0, atol=1e-5)


def test_compile_fullgraph_after_an_eager_eval_forward() -> None:
    """The inference cache (keyed on data pointers, which a graph cannot hold) is skipped
    while torch.compile traces: fullgraph works after the cache exists, outputs equal."""
    model = inject(_net(), LoraConfig(r=4, target_modules=["0", "2"]), generator=0).eval()
    with torch.no_grad():
        model[0].lora_B.weight.normal_(generator=torch.Generator().manual_seed(3))
        want = model(X)  # builds the eager inference cache
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(X), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(compiled(X[:8]), want[:8], rtol=1e-6, atol=1e-6)
