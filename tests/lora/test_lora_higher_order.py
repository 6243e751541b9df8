"""Double backward, ``torch.func`` and forward-mode AD through adapted Linear layers at every
row count. Above ``SMALL_ROWS_MAX`` rows the layers run custom autograd nodes, which raised
("marked with @once_differentiable", "must override the setup_context staticmethod") where
PEFT's plain ops work; the answers are checked against the formula written with torch ops."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from rankwise.lora import LoraConfig, inject
from rankwise.lora.linear_ops import SMALL_ROWS_MAX

ROWS = 2 * SMALL_ROWS_MAX + 8  # the custom node's route


def _model(in_f: int, dora: bool, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, 12, bias=bias, dtype=torch.float64))
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=False)
    inject(model, cfg.replace(use_dora=dora), generator=0)
    if dora:
        with torch.no_grad():
            model[0].lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 12, dtype=torch.float64))
    return model.train()


def _reference(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The adapted layer as a formula of its parameters (DoRA: the norm detached, §4.3)."""
    layer = model[0]
    W, b = params["0.base_layer.weight"], params.get("0.base_layer.bias")
    A, B = params["0.lora_A.weight"], params["0.lora_B.weight"]
    s = layer.scaling
    if "0.lora_magnitude_vector" not in params:
        return F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)
    V = W + s * B @ A
    c = params["0.lora_magnitude_vector"] / V.norm(dim=1).detach()
    return F.linear(x, c[:, None] * V, b)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in model.named_parameters()
    }


CASES = [  # in_features 16: the merged route (3·in < N); 100: the factored one
    pytest.param(
        in_f, dora, bias, id=f"in{in_f}-{'dora' if dora else 'lora'}-{'b' if bias else 'nob'}"
    )
    for in_f in (16, 100)
    for dora in (False, True)
    for bias in (True, False)
]


@pytest.mark.parametrize(("in_f", "dora", "bias"), CASES)
def test_gradient_penalty_double_backward(in_f: int, dora: bool, bias: bool) -> None:
    model = _model(in_f, dora, bias)
    params = _params(model)
    x = torch.randn(ROWS, in_f, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def penalty(forward) -> torch.Tensor:
        xi = x.clone().requires_grad_()
        out = forward(xi)
        (gx,) = torch.autograd.grad(out.square().sum(), xi, create_graph=True)
        return gx.square().sum() + out.sum()

    penalty(model).backward()
    penalty(lambda xi: _reference(model, params, xi)).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dora", [False, True])
def test_double_backward_when_only_the_base_bias_trains(dora: bool) -> None:
    """``create_graph=True`` with the bias the only input that needs a gradient: the custom
    node asked autograd for the gradients of no input ("inputs argument to grad() cannot be
    empty") above 128 rows."""
    model = _model(16, dora, True)
    for name, p in model.named_parameters():
        p.requires_grad_(name == "0.base_layer.bias")
    params = _params(model)
    x = torch.randn(ROWS, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for forward in (model, lambda xi: _reference(model, params, xi)):
        bias = model[0].base_layer.bias if forward is model else params["0.base_layer.bias"]
        (gb,) = torch.autograd.grad(forward(x).square().sum(), bias, create_graph=True)
        (g2,) = torch.autograd.grad(gb.square().sum(), bias)
        results.append((gb.detach(), g2))
    for mine, ref in zip(*results, strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("in_f", "dora", "bias"), CASES)
def test_torch_func_grad_vmap_and_jvp(in_f: int, dora: bool, bias: bool) -> None:
    model = _model(in_f, dora, bias)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(2, ROWS, in_f, dtype=torch.float64, generator=g)

    def loss(trainable: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**frozen, **trainable}, (x,)).square().sum()

    def ref_loss(trainable: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return _reference(model, {**frozen, **trainable}, x).square().sum()

    got = grad(loss)(params, xs[0])
    want = grad(ref_loss)(params, xs[0])
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)  # per-sample gradients
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(per_sample[k][0], want[k], rtol=1e-9, atol=1e-9)
    v = torch.randn(ROWS, in_f, dtype=torch.float64, generator=g)
    _, tangent = jvp(lambda x: model(x), (xs[0],), (v,))
    _, ref_tangent = jvp(lambda x: _reference(model, {**frozen, **params}, x), (xs[0],), (v,))
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-9, atol=1e-9)
    with fwAD.dual_level():  # forward-mode AD without torch.func, in eval mode and no_grad
        model.eval()
        with torch.no_grad():
            out = model(fwAD.make_dual(xs[0], v))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, ref_tangent, rtol=1e-9, atol=1e-9)


def test_create_graph_with_dropout_gives_the_plain_gradients() -> None:
    # the recompute differentiated the saved x, from which dropout's x_a is computed: ∂L/∂x
    # took the adapter path twice, and the layer below's factors were 79-113% off
    def run(create_graph: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["0", "2"],
                         init_lora_weights=False)  # fmt: skip
        inject(model, cfg, generator=0).train()
        x = torch.randn(ROWS, 16, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(123)  # the same dropout masks
        model(x).pow(2).sum().backward(create_graph=create_graph)
        return {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}

    plain, graphed = run(False), run(True)
    assert set(plain) == set(graphed) and "0.lora_A.weight" in plain
    for name, value in plain.items():
        torch.testing.assert_close(graphed[name], value, rtol=1e-5, atol=1e-6, msg=name)
