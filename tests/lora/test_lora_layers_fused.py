"""The fused LoRA linear node: its hand-written backward against autograd and finite differences."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from rankwise.lora import LoraConfig, inject, linear_ops
from rankwise.lora import layers as layers_mod
from rankwise.lora.layers import LoraLinear
from rankwise.lora.linear_ops import (
    LoraLinearFunction,
    gemm_merge_pays,
    lora_linear,
    lora_linear_backward,
    merge_pays,
    merged_right,
    rank_product_t,
)

N, IN, OUT, R, S = 5, 7, 6, 3, 0.7


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"x": (N, IN), "W": (OUT, IN), "b": (OUT,), "A": (R, IN), "B": (OUT, R), "xa": (N, IN)}
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


@pytest.fixture(params=["r-rows", "r-columns"])
def rank_layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both memory layouts of the rank-r products (:func:`rank_product_t`): the rule picks
    r rows for these tiny shapes; a zero byte limit forces the r-column layout."""
    if request.param == "r-columns":
        monkeypatch.setattr(linear_ops, "ROWS_MAX_BYTES", -1)
    return request.param


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("route", ["factored", "dropped", "merged"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_backward_passes_gradcheck(
    bias: bool, route: str, fan_in_fan_out: bool, rank_layout: str
) -> None:
    dropped, merge = route == "dropped", route == "merged"
    t = {k: v.requires_grad_() for k, v in _tensors().items()}
    # Conv1D keeps W as (in, out): the node's right factor is then the weight itself
    Wt_leaf = t["W"].detach().t().contiguous().requires_grad_() if fan_in_fan_out else t["W"]

    def fn(x, Wt_src, b, A, B, xa):  # noqa: ANN001, ANN202
        Wt = Wt_src if fan_in_fan_out else Wt_src.t()
        return LoraLinearFunction.apply(
            x, Wt, b if bias else None, A, B, S, xa if dropped else None, merge
        )

    inputs = (t["x"], Wt_leaf, t["b"], t["A"], t["B"], t["xa"])
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("frozen", [True, False])
def test_gradients_equal_autograd_on_the_formula(frozen: bool) -> None:
    t = _tensors(1)
    leaves = {k: v.clone().requires_grad_(not (frozen and k in ("W", "b"))) for k, v in t.items()}
    ref = {k: v.clone().requires_grad_(leaves[k].requires_grad) for k, v in t.items()}
    g = torch.randn(N, OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = LoraLinearFunction.apply(
        leaves["x"], leaves["W"].t(), leaves["b"], leaves["A"], leaves["B"], S, None
    )
    y_ref = ref["x"] @ ref["W"].T + ref["b"] + S * (ref["x"] @ ref["A"].T) @ ref["B"].T
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for k in ("x", "W", "b", "A", "B"):
        if frozen and k in ("W", "b"):
            assert leaves[k].grad is None  # a frozen base weight gets no gradient at all
        else:
            torch.testing.assert_close(leaves[k].grad, ref[k].grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("n", "k", "r", "rows"),
    [(5, 7, 3, True), (64, 40, 9, False), (20_000, 64, 8, False), (512, 16, 8, True)],
)
def test_rank_product_layout_rule(
    n: int, k: int, r: int, rows: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``(big @ small_t)ᵀ`` in either layout: r rows (contiguous) only for r ≤ 8 and a big
    operand within ROWS_MAX_BYTES (Intel's 4 MiB here: 20000·64 float64 = 10 MB is over it),
    else a transposed (N, r) product; same values."""
    monkeypatch.setattr(linear_ops, "ROWS_MAX_BYTES", linear_ops.rows_max_bytes("GenuineIntel"))
    gen = torch.Generator().manual_seed(n)
    big = torch.randn(n, k, dtype=torch.float64, generator=gen)
    small_t = torch.randn(r, k, dtype=torch.float64, generator=gen).t()  # (k, r), a view
    out = rank_product_t(big, small_t)
    assert out.shape == (r, n)
    assert out.is_contiguous() is rows
    assert out.t().is_contiguous() is not rows
    torch.testing.assert_close(out, (big @ small_t).T, rtol=1e-12, atol=1e-12)


def test_rows_limit_by_cpu_vendor(tmp_path: Path) -> None:
    """The layout limit is read off /proc/cpuinfo's vendor_id: none on AMD (rows win at every
    size measured there), 4 MiB on Intel and anything else; a missing file is no vendor."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert linear_ops.cpu_vendor(str(info)) == "AuthenticAMD"
    assert linear_ops.rows_max_bytes("AuthenticAMD") == math.inf
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n")
    assert linear_ops.cpu_vendor(str(info)) == "GenuineIntel"
    assert linear_ops.rows_max_bytes("GenuineIntel") == 4 << 20
    assert linear_ops.cpu_vendor(str(tmp_path / "absent")) == ""
    assert linear_ops.rows_max_bytes("") == 4 << 20
    assert linear_ops.ROWS_MAX_BYTES == linear_ops.rows_max_bytes(linear_ops.cpu_vendor())
    big = torch.zeros(20_000, 64, dtype=torch.float64)  # 10 MB: rows only without a limit
    small_t = torch.zeros(64, 8, dtype=torch.float64)
    assert rank_product_t(big, small_t).is_contiguous() is (linear_ops.ROWS_MAX_BYTES > 10e6)


@pytest.mark.parametrize("bias", [True, False])
def test_no_grad_path_is_the_same_function(bias: bool, rank_layout: str) -> None:
    t = _tensors(3)
    b = t["b"] if bias else None
    out = lora_linear(t["x"], t["W"].t(), b, t["A"], t["B"], S, t["xa"])
    h = t["xa"] @ t["A"].T
    # with a bias, h_s_t carries a last row of ones: the bias rides in the rank-r GEMM
    assert out.h_s_t.shape == (R + bias, N)
    torch.testing.assert_close(out.h_s_t[:R], S * h.T, rtol=1e-12, atol=1e-12)
    if bias:
        assert torch.equal(out.h_s_t[R], torch.ones(N, dtype=torch.float64))
    ref = t["x"] @ t["W"].T + S * h @ t["B"].T + (t["b"] if bias else 0.0)
    torch.testing.assert_close(out.y, ref, rtol=1e-12, atol=1e-12)


def _layer(p: float) -> LoraLinear:
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT).requires_grad_(False)  # frozen, as inject leaves it
    layer = LoraLinear(base, r=R, lora_alpha=2.0 * R, scaling=2.0, lora_dropout=p)
    g = torch.Generator().manual_seed(4)
    layer.set_factors(torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g))
    return layer.train()


@pytest.mark.usefixtures("linear_route")
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_fused_layer_equals_the_module_path(p: float) -> None:
    fused, general = _layer(p), _layer(p)
    general.base_layer.register_forward_hook(lambda m, i, o: None)  # forces the module path
    x = torch.randn(2, N, IN, generator=torch.Generator().manual_seed(5))
    g = torch.randn(2, N, OUT, generator=torch.Generator().manual_seed(6))
    results = []
    for layer in (fused, general):
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)  # the same dropout mask: both drop an (…, in) tensor of x's size
        out = layer(xi)
        (out * g).sum().backward()
        results.append((out, xi.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad))
    for mine, theirs in zip(*results, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert fused.base_layer.weight.grad is None


@pytest.mark.usefixtures("linear_route")
def test_trainable_bias_gets_its_gradient_in_a_model() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(IN, OUT)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    torch.manual_seed(0)
    model = inject(Two(), LoraConfig(r=R, lora_alpha=R, target_modules=["lin"], bias="all"))
    x = torch.randn(3, IN)
    model(x).square().sum().backward()
    bias = model.lin.base_layer.bias
    assert bias.requires_grad and bias.grad is not None
    W, b = model.lin.base_layer.weight.detach(), bias.detach().requires_grad_()
    (x @ W.T + b).square().sum().backward()  # B = 0 at init: the adapter adds nothing
    torch.testing.assert_close(bias.grad, b.grad)


def test_merge_pays_rule_and_half_precision_stays_factored() -> None:
    # LoRA, per GEMM: merged when 3·k < N (k the contraction: in forward, out backward)
    assert gemm_merge_pays(2048, 384, torch.float32)  # MiniLM's square layers
    assert not gemm_merge_pays(2048, 1536, torch.float32)  # intermediate.dense's backward
    assert not gemm_merge_pays(1152, 384, torch.float64)  # 3·k = N: the factored route
    for dt in (torch.bfloat16, torch.float16):
        assert not gemm_merge_pays(2048, 384, dt)
    # DoRA: 2·in·out ≤ N·(in + out)
    assert merge_pays(2048, 384, 384, torch.float32)  # a MiniLM batch: merged moves 5× less
    assert not merge_pays(256, 4096, 4096, torch.float32)  # a big layer, a few tokens
    assert merge_pays(4096, 4096, 4096, torch.float64)  # the break-even point counts as paying
    for dt in (torch.bfloat16, torch.float16):
        assert not merge_pays(2048, 384, 384, dt)  # W + s·BA would round the update away


@pytest.mark.parametrize("linear_layout", [True, False])
def test_merged_right_value_and_layout(linear_layout: bool) -> None:
    t = _tensors(8)
    Wt = t["W"].t() if linear_layout else t["W"].t().contiguous()  # nn.Linear's view / Conv1D's
    M = merged_right(Wt, t["A"], t["B"], S)
    torch.testing.assert_close(M, Wt + S * t["A"].T @ t["B"].T, rtol=1e-12, atol=1e-12)
    assert M.stride() == Wt.stride()  # the base layer's own GEMM layout
    zero = merged_right(Wt, t["A"], torch.zeros_like(t["B"]), S)
    assert torch.equal(zero, Wt)  # B = 0: exactly the base weight


def test_backward_merged_input_gradient_equals_factored(rank_layout: str) -> None:
    t = _tensors(9)
    g = torch.randn(N, OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    Wt = t["W"].t()
    h_s_t = S * t["A"] @ t["x"].T
    need = (True, False, True, True)
    fact = lora_linear_backward(g, t["x"], Wt, t["A"], t["B"], h_s_t, S, None, need=need)
    M = merged_right(Wt, t["A"], t["B"], S)
    mrg = lora_linear_backward(g, t["x"], Wt, t["A"], t["B"], h_s_t, S, None, need=need, merged=M)
    calls = []

    def form() -> torch.Tensor:  # the node passes a function: M is formed only when needed
        calls.append(1)
        return merged_right(Wt, t["A"], t["B"], S)

    lazy = lora_linear_backward(
        g, t["x"], Wt, t["A"], t["B"], h_s_t, S, None, need=need, merged=form
    )
    assert len(calls) == 1
    for a, b, c in zip(fact, mrg, lazy, strict=True):
        if a is None:
            assert b is None and c is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(c, b, rtol=0, atol=0)
    no_x = lora_linear_backward(
        g, t["x"], Wt, t["A"], t["B"], h_s_t, S, None, need=(False, False, True, True), merged=form
    )
    assert no_x.x is None and len(calls) == 1  # no ∂L/∂x asked: M never formed
    with pytest.raises(ValueError, match="merged route"):
        lora_linear_backward(g, t["x"], Wt, t["A"], t["B"], h_s_t, S, t["xa"], need=need, merged=M)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [True, False])
def test_lora_node_routes_agree_and_the_rule_picks_per_direction(frozen: bool, bias: bool) -> None:
    g = torch.Generator().manual_seed(11)
    n = 64  # 3·7 and 3·6 < 64: merged pays both ways; N = 5 (the other tests): factored
    assert gemm_merge_pays(n, IN, torch.float64) and gemm_merge_pays(n, OUT, torch.float64)
    assert not gemm_merge_pays(N, IN, torch.float64)
    t = {
        k: torch.randn(*s, generator=g, dtype=torch.float64)
        for k, s in {"x": (n, IN), "W": (OUT, IN), "b": (OUT,), "A": (R, IN), "B": (OUT, R)}.items()
    }
    gy = torch.randn(n, OUT, generator=g, dtype=torch.float64)
    results = {}
    for merge in (None, True, False):
        leaves = {
            k: v.clone().requires_grad_(not (frozen and k in ("W", "b"))) for k, v in t.items()
        }
        y = LoraLinearFunction.apply(
            leaves["x"],
            leaves["W"].t(),
            leaves["b"] if bias else None,
            leaves["A"],
            leaves["B"],
            S,
            None,
            merge,
        )
        (y * gy).sum().backward()
        results[merge] = [y.detach()] + [leaves[k].grad for k in ("x", "W", "b", "A", "B")]
    for a, b in zip(results[True], results[False], strict=True):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # None: forward merged (3·in < N, with or without a bias), backward merged (3·out < N):
    # the same numbers, bit for bit, as the forced route
    assert torch.equal(results[None][0], results[True][0])
    assert torch.equal(results[None][1], results[True][1])  # ∂L/∂x from M


def test_lora_node_rule_keeps_the_bias_in_the_rank_r_gemm_when_merging_does_not_pay() -> None:
    """N = 5: 3·in ≥ N, so forward stays factored with the bias as one more rank; it equals
    the forced factored route bit for bit and the forced merged one to rounding."""
    t = _tensors(13)
    assert not gemm_merge_pays(N, IN, torch.float64)
    ys = {
        m: LoraLinearFunction.apply(t["x"], t["W"].t(), t["b"], t["A"], t["B"], S, None, m)
        for m in (None, False, True)
    }
    assert torch.equal(ys[None], ys[False])
    torch.testing.assert_close(ys[None], ys[True], rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("linear_route")
@pytest.mark.parametrize("n", [5, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_output_at_init_is_the_base_layer_bit_for_bit(bias: bool, n: int) -> None:
    """B = 0: the node's merged route (N = 64: 3·7 < 64) forms M = W exactly; its factored one
    (N = 5) adds a rank-r term of exact zeros (under the bias, if any); the few-rows route
    runs the frozen layer's own GEMM and adds exact zeros."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=bias).requires_grad_(False)
    layer = LoraLinear(base, r=R, lora_alpha=2.0 * R, scaling=2.0, lora_dropout=0.0).train()
    layer.set_factors(torch.randn(R, IN), torch.zeros(OUT, R))  # LoRA's start: B = 0
    x = torch.randn(n, IN)  # float32
    assert gemm_merge_pays(n, IN, torch.float32) is (n == 64)
    assert torch.equal(layer(x), base(x))


def test_merge_true_with_dropout_is_refused() -> None:
    t = _tensors(12)
    with pytest.raises(ValueError, match="merge=True"):
        LoraLinearFunction.apply(t["x"], t["W"].t(), t["b"], t["A"], t["B"], S, t["xa"], True)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_the_row_count_picks_the_training_route(p: float) -> None:
    """Up to SMALL_ROWS_MAX rows torch's own GEMM nodes, above it the custom node; both give
    the same output and gradients (the same dropout mask)."""
    n = layers_mod.SMALL_ROWS_MAX + 1  # the limit the layer reads (and the fixture patches)
    layer = _layer(p)
    x = torch.randn(n, IN, generator=torch.Generator().manual_seed(13))
    g = torch.randn(n, OUT, generator=torch.Generator().manual_seed(14))

    def node(y: torch.Tensor) -> str:  # the op under the output's (…, out) view
        return type(y.grad_fn.next_functions[0][0]).__name__

    assert node(layer(x)) == "LoraLinearFunctionBackward"
    assert node(layer(x[:-1])) == "AddmmBackward0"
    results = []
    for limit in (0, n):  # node, then few rows, on all n rows
        xi = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(layers_mod, "SMALL_ROWS_MAX", limit)
            torch.manual_seed(15)
            out = layer(xi)
        (out * g).sum().backward()
        results.append((out, xi.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad))
    for mine, theirs in zip(*results, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_train_mode_without_autograd_takes_the_nodes_route(bias: bool) -> None:
    """Reentrant activation checkpointing runs the first forward without autograd and the
    backward's recomputation with it: both must give the same output bit for bit (the merged
    route and the factored one round differently), so its gradients equal those of a run
    without checkpointing, as PEFT's do."""
    n, d = 4 * layers_mod.SMALL_ROWS_MAX, 16  # 3·in < N: the merged route
    assert gemm_merge_pays(n, d, torch.float32)
    torch.manual_seed(0)
    layer = LoraLinear(
        nn.Linear(d, d, bias=bias).requires_grad_(False),
        r=4,
        lora_alpha=8,
        scaling=2.0,
        lora_dropout=0.0,
    ).train()
    g = torch.Generator().manual_seed(1)
    layer.set_factors(torch.randn(4, d, generator=g), torch.randn(d, 4, generator=g))
    x = torch.randn(n, d, generator=g)
    with torch.no_grad():
        plain = layer(x)
    assert torch.equal(plain, layer(x).detach())
    # eval with the inference cache off keeps its promise of no weight-sized temporary
    formed = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linear_ops, "merged_right", lambda *a: formed.append(a) or merged_right(*a))
        layer.inference_cache = False
        with torch.no_grad():
            layer.eval()(x)
        layer.train().inference_cache = True
    assert formed == []

    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(d, 1)).train()

    def grads(checkpointed: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        if checkpointed:
            h = torch.utils.checkpoint.checkpoint(model[0], xi, use_reentrant=True)
            out = model[2](model[1](h))
        else:
            out = model(xi)
        out.square().sum().backward()
        return [xi.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]

    for mine, theirs in zip(grads(True), grads(False), strict=True):
        assert torch.equal(mine, theirs)
