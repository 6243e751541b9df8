"""DoRA's training path through the fused LoRA node: the paper's formula with the norm detached."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.lora.dora import DoraLinear

IN, OUT, R = 7, 6, 3


def _hf_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(OUT, IN)  # weight (in, out)
    nn.init.normal_(layer.weight, std=0.3)
    nn.init.normal_(layer.bias, std=0.3)
    return layer


def _dora(base: nn.Module) -> DoraLinear:
    base = base.double().requires_grad_(False)
    layer = DoraLinear(base, r=R, lora_alpha=2.0 * R, scaling=2.0, lora_dropout=0.0)
    g = torch.Generator().manual_seed(1)
    A = torch.randn(R, IN, generator=g, dtype=torch.float64)
    B = torch.randn(OUT, R, generator=g, dtype=torch.float64)
    layer.set_factors(A, B)
    with torch.no_grad():  # m away from its initial ‖W0 + sBA‖, so c ≠ 1
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, OUT, dtype=torch.float64))
    return layer


BASES = {
    "linear": lambda: nn.Linear(IN, OUT),
    "linear_nobias": lambda: nn.Linear(IN, OUT, bias=False),
    "conv1d_hf": _hf_conv1d,
}


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("training", [True, False])
def test_gradients_equal_the_dense_formula_with_detached_norm(kind: str, training: bool) -> None:
    torch.manual_seed(0)
    layer = _dora(BASES[kind]()).train(training)
    x = torch.randn(2, 4, IN, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (layer(x) * g).sum().backward()

    # reference: W' = m ⊙ V / ‖V‖ with V = W0 + s·B A formed in full and ‖V‖ a constant (§4.3)
    A = layer.lora_A.weight.detach().clone().requires_grad_()
    B = layer.lora_B.weight.detach().clone().requires_grad_()
    m = layer.lora_magnitude_vector.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    W = layer.base_matrix().detach()  # (out, in) in either layout
    V = W + layer.scaling * B @ A
    out = xr @ (m / V.norm(dim=1).detach() * V.T)
    bias = layer.base_layer.bias
    out = out if bias is None else out + bias
    (out * g).sum().backward()
    pairs = [
        (x.grad, xr.grad),
        (layer.lora_A.weight.grad, A.grad),
        (layer.lora_B.weight.grad, B.grad),
        (layer.lora_magnitude_vector.grad, m.grad),
    ]
    for mine, ref in pairs:
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-10)
    assert layer.base_layer.weight.grad is None


def test_no_grad_training_forward_equals_the_autograd_one() -> None:
    torch.manual_seed(0)
    layer = _dora(nn.Linear(IN, OUT)).train()
    x = torch.randn(5, IN, dtype=torch.float64)
    with torch.no_grad():
        plain = layer(x)
    torch.testing.assert_close(plain, layer(x).detach(), rtol=1e-12, atol=1e-12)


def _wc(
    Wt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, c: torch.Tensor, s: float, merge: bool
) -> torch.Tensor | None:
    """The merged route's right factor ``(Wt + s·Aᵀ Bᵀ) ⊙ c``, formed as the layer does."""
    from rankwise.lora.linear_ops import merged_right

    if not merge:
        return None
    with torch.no_grad():
        return merged_right(Wt, A, B, s).mul_(c)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("linear_layout", [True, False])
def test_dora_node_gradcheck_every_input(with_bias: bool, merge: bool, linear_layout: bool) -> None:
    """Every input of the node, the frozen-by-default weight and bias included (float64), on
    both routes, with the right factor as an ``nn.Linear`` (``Wᵀ``, a view) or a ``Conv1D``
    (contiguous ``(in, out)``) lays it out."""
    from rankwise.lora.dora import DoraLinearFunction

    g = torch.Generator().manual_seed(5)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    x, A, B = leaf(4, IN), leaf(R, IN), leaf(OUT, R)
    W = leaf(OUT, IN) if linear_layout else leaf(IN, OUT)
    bias = leaf(OUT) if with_bias else None
    c = (torch.rand(OUT, generator=g, dtype=torch.float64) + 0.5).requires_grad_()

    def fn(*t: torch.Tensor) -> torch.Tensor:
        Wt = t[1].t() if linear_layout else t[1]
        Wc = _wc(Wt, *t[2:5], 1.5, merge)
        return DoraLinearFunction.apply(
            t[0], Wt, t[5] if with_bias else None, *t[2:4], 1.5, t[4], Wc
        )

    args = (x, W, A, B, c) + ((bias,) if with_bias else ())
    assert torch.autograd.gradcheck(fn, args)


def test_dora_routes_agree_and_the_shape_rule_picks_merged_for_a_large_batch() -> None:
    from rankwise.lora import linear_ops
    from rankwise.lora.dora import DoraLinearFunction

    g = torch.Generator().manual_seed(6)
    n = 64  # 2·7·6 = 84 ≤ 64·13: the merged route pays
    x = torch.randn(n, IN, generator=g, dtype=torch.float64)
    W, b = (
        torch.randn(OUT, IN, generator=g, dtype=torch.float64),
        torch.randn(OUT, dtype=torch.float64),
    )
    A, B = (
        torch.randn(R, IN, generator=g, dtype=torch.float64),
        torch.randn(OUT, R, generator=g, dtype=torch.float64),
    )
    c = torch.rand(OUT, generator=g, dtype=torch.float64) + 0.5
    gy = torch.randn(n, OUT, generator=g, dtype=torch.float64)
    grads = {}
    for merge in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, c)]
        Wc = _wc(W.t(), *leaves[1:], 0.7, merge)
        y = DoraLinearFunction.apply(leaves[0], W.t(), b, leaves[1], leaves[2], 0.7, leaves[3], Wc)
        (y * gy).sum().backward()
        grads[merge] = [y.detach()] + [t.grad for t in leaves]
    for got, want in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert linear_ops.merge_pays(n, IN, OUT, torch.float64)


@pytest.mark.parametrize("n_tokens", [2, 64])
def test_dora_layer_on_either_route_equals_the_formula_and_caches_the_norm(n_tokens: int) -> None:
    """2 tokens: the factored route; 64: the merged one (c and the norm from the merged matrix)."""
    from rankwise.lora import linear_ops

    torch.manual_seed(0)
    layer = _dora(nn.Linear(IN, OUT)).train()
    assert linear_ops.merge_pays(n_tokens, IN, OUT, torch.float64) == (n_tokens == 64)
    x = torch.randn(n_tokens, IN, dtype=torch.float64)
    g = torch.randn(n_tokens, OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (layer(x) * g).sum().backward()
    A = layer.lora_A.weight.detach().clone().requires_grad_()
    B = layer.lora_B.weight.detach().clone().requires_grad_()
    m = layer.lora_magnitude_vector.detach().clone().requires_grad_()
    W = layer.base_matrix().detach()
    V = W + layer.scaling * B @ A
    norm = V.norm(dim=1).detach()
    ((x @ (m / norm * V.T) + layer.base_layer.bias) * g).sum().backward()
    for mine, ref in ((layer.lora_A.weight, A), (layer.lora_B.weight, B)):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, m.grad, rtol=1e-10, atol=1e-10)
    # the norm the forward used is weight_norm()'s for these weights, without recomputing
    torch.testing.assert_close(layer.weight_norm(), norm, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        layer.lora_B.weight.add_(1.0)  # a new version: the cached norm is not reused
    V2 = W + layer.scaling * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    torch.testing.assert_close(layer.weight_norm(), V2.norm(dim=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_tokens", [5, 64])  # the factored and the merged route
def test_dora_node_magnitude_gradient_where_c_is_zero(n_tokens: int) -> None:
    """c_j = 0 (a magnitude trained to zero): ∂L/∂c is recomputed, not divided by zero."""
    torch.manual_seed(0)
    layer = _dora(nn.Linear(IN, OUT)).train()
    with torch.no_grad():
        layer.lora_magnitude_vector[2] = 0.0
    x = torch.randn(n_tokens, IN, dtype=torch.float64)
    g = torch.randn(n_tokens, OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (layer(x) * g).sum().backward()
    A, B = layer.factors()
    W = layer.base_matrix().detach()
    V = W + layer.scaling * B.detach() @ A.detach()
    y0 = x @ V.T  # the unscaled output
    want = (g * y0).sum(0) / V.norm(dim=1)  # ∂L/∂m = ∂L/∂c / ‖V‖
    got = layer.lora_magnitude_vector.grad
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", [1, 5, 256, 700])
def test_column_dots_equals_the_dense_sum(n: int) -> None:
    from rankwise.lora.dora import column_dots

    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, 9, generator=g, dtype=torch.float64)
    b = torch.randn(n, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(column_dots(a, b, rows=256), (a * b).sum(0), rtol=1e-12, atol=1e-12)


def _dora_training_losses(fused: bool, rows: int) -> list[float]:
    import rankwise as rw

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 3))
    config = rw.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=True)
    rw.inject(model, config, generator=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, fused=fused, foreach=False if not fused else None)
    x = torch.randn(rows, 16, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(4):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        losses.append(model(x).square().mean().item())
    losses.append(rw.merge_and_unload(model)(x).square().mean().item())
    return losses


@pytest.mark.parametrize("rows", [4, 300])
def test_dora_trains_the_same_with_a_fused_optimizer(rows: int) -> None:
    """The cached weight norm was keyed on version counters, which fused optimizer steps do
    not bump: training forwards (and the merged model) used the norm from before the step
    (loss off PEFT's by 6.3e-3 from step 1 under transformers.Trainer's default optimizer)."""
    fused, plain = _dora_training_losses(True, rows), _dora_training_losses(False, rows)
    assert fused == pytest.approx(plain, rel=1e-5, abs=1e-7)


def test_dora_norm_is_rebuilt_by_eval_after_a_write_through_data() -> None:
    """A write through ``.data`` bypasses version counters; ``model.eval()`` (or ``train()``)
    is the documented remedy, but it dropped only the inference cache, not DoRA's norms."""
    import rankwise as rw

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24))
    rw.inject(model, rw.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True))
    layer = model[0]
    x = torch.randn(5, 16)
    model.eval()
    model(x)  # grad on: the norm is cached
    layer.lora_B.weight.data.copy_(torch.randn_like(layer.lora_B.weight))
    model.eval()
    W, A, B = layer.base_matrix(), layer.lora_A.weight, layer.lora_B.weight
    V = W + layer.scaling * B @ A
    m = layer.lora_magnitude_vector.detach()
    want = x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T + layer.base_layer.bias
    torch.testing.assert_close(model(x).detach(), want.detach(), atol=1e-5, rtol=1e-5)
    model.train()
    torch.testing.assert_close(model(x).detach(), want.detach(), atol=1e-5, rtol=1e-5)
