"""The oneDNN route of the large rank-r products (:func:`linear_ops.onednn_linear`): when it is
taken, and that the LoRA and DoRA nodes give the float64 formula's values through it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from rankwise.lora import linear_ops
from rankwise.lora.dora import DoraLinear
from rankwise.lora.linear_ops import (
    LoraLinearFunction,
    onednn_linear,
    onednn_pays,
    rank_contract,
    rank_product_t,
)

N, IN, OUT, R, S = 1024, 512, 520, 8, 0.5  # N·IN, N·OUT ≥ 2^19: every product takes oneDNN

needs_onednn = pytest.mark.skipif(
    linear_ops._resolve_onednn() is None, reason="this torch has no working oneDNN linear op"
)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, ...]]]:
    """Forces the oneDNN route on (any CPU vendor, two threads) and records each call's
    shapes."""
    real = linear_ops._resolve_onednn()
    assert real is not None
    seen: list[tuple[int, ...]] = []

    def counting(x: torch.Tensor, w: torch.Tensor, *rest: object) -> torch.Tensor:
        seen.append((*x.shape, *w.shape))
        return real(x, w, *rest)

    monkeypatch.setattr(linear_ops, "ONEDNN_RANK", True)
    monkeypatch.setattr(linear_ops, "_onednn_cache", [counting])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one thread keeps MKL
    yield seen
    torch.set_num_threads(threads)


def test_rule_by_cpu_vendor(tmp_path: Path) -> None:
    """oneDNN only on AMD, the one vendor where it was measured; the module constant is the
    rule applied to this machine's /proc/cpuinfo."""
    assert onednn_pays("AuthenticAMD") is True
    assert onednn_pays("GenuineIntel") is False
    assert onednn_pays("") is False
    info = tmp_path / "cpuinfo"
    info.write_text("vendor_id\t: AuthenticAMD\n")
    assert onednn_pays(linear_ops.cpu_vendor(str(info))) is True
    assert linear_ops.ONEDNN_RANK == onednn_pays(linear_ops.cpu_vendor())


def test_the_op_resolves_where_torch_has_onednn() -> None:
    """A torch built with oneDNN (the pinned CPU wheel is) yields the op, so a renamed or
    changed private op shows up here instead of as a silent fallback to MKL."""
    if torch.backends.mkldnn.is_available():
        assert linear_ops._resolve_onednn() is not None


@needs_onednn
def test_self_check_ignores_default_dtype_and_device() -> None:
    """The check runs on float32 CPU tensors whatever the defaults: under a float64 default
    (or a meta default device) its tensors failed the op and the route stayed off for good."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert linear_ops._resolve_onednn() is not None
    finally:
        torch.set_default_dtype(previous)
    with torch.device("meta"):
        assert linear_ops._resolve_onednn() is not None


@needs_onednn
def test_route_conditions(calls: list[tuple[int, ...]], monkeypatch: pytest.MonkeyPatch) -> None:
    big = torch.randn(N, IN)
    assert onednn_linear(big, 512) is not None
    assert onednn_linear(big, N + 1) is None  # too few rows: MKL
    # a row count off the multiple (dynamic padding: a kernel built per new length): MKL
    assert onednn_linear(big[: N - 8], 512) is None
    assert onednn_linear(big[: N - linear_ops.ONEDNN_ROW_MULTIPLE], 512) is not None
    assert onednn_linear(big, 512, min_numel=big.numel() + 1) is None  # too small: MKL
    assert rank_product_t(torch.randn(N, 384), torch.randn(384, R)).shape == (R, N)
    assert calls == []  # 1024 × 384 is below the product's 2^19 elements
    assert onednn_linear(big.double(), 512) is None  # float32 only
    assert onednn_linear(big.t(), 8) is None  # not contiguous
    assert onednn_linear(big[:, : IN - 1], 512) is None
    with torch.backends.mkldnn.flags(enabled=False):
        assert onednn_linear(big, 512) is None
    torch.set_num_threads(1)  # MKL's threading is what is slow; one thread keeps it
    try:
        assert onednn_linear(big, 512) is None
    finally:
        torch.set_num_threads(2)
    assert onednn_linear(big.requires_grad_(), 512) is None  # would need an autograd graph
    with torch.no_grad():
        assert onednn_linear(big, 512) is not None
    monkeypatch.setattr(linear_ops, "ONEDNN_RANK", False)
    assert onednn_linear(big.detach(), 512) is None
    assert calls == []  # only asked, never called


@needs_onednn
@pytest.mark.parametrize("ones_row", [False, True])
def test_products_equal_float64(calls: list[tuple[int, ...]], ones_row: bool) -> None:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(N, IN, generator=g)
    small_t = torch.randn(R, IN, generator=g).t()  # (in, r), a view as the layer passes it
    h_t = rank_product_t(big, small_t, ones_row=ones_row)
    assert h_t.shape == (R + ones_row, N) and h_t.is_contiguous()
    ref = (big.double() @ small_t.double()).t()
    torch.testing.assert_close(h_t[:R].double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
    if ones_row:
        assert torch.equal(h_t[R], torch.ones(N))
    gt = torch.randn(R, N, generator=g)
    c = rank_contract(gt, big)
    ref_c = gt.double() @ big.double()
    torch.testing.assert_close(c.double(), ref_c, rtol=1e-5, atol=1e-5 * ref_c.abs().max())
    assert len(calls) == 2


def _node_grads(bias: bool, route: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(N, IN, generator=g),
        "W": torch.randn(OUT, IN, generator=g) / IN**0.5,
        "b": torch.randn(OUT, generator=g),
        "A": torch.randn(R, IN, generator=g),
        "B": torch.randn(OUT, R, generator=g),
        "xa": torch.randn(N, IN, generator=g),
    }
    grad_out = torch.randn(N, OUT, generator=g)
    leaves = {k: v.requires_grad_(k not in ("W", "b")) for k, v in t.items()}
    merge = {"merged": True, "factored": False, "dropped": None}[route]
    xa = leaves["xa"] if route == "dropped" else None
    y = LoraLinearFunction.apply(
        leaves["x"],
        leaves["W"].t(),
        leaves["b"] if bias else None,
        leaves["A"],
        leaves["B"],
        S,
        xa,
        merge,
    )
    (y * grad_out).sum().backward()
    out = {"y": y.detach(), "x": leaves["x"].grad, "A": leaves["A"].grad, "B": leaves["B"].grad}
    if route == "dropped":
        out["xa"] = leaves["xa"].grad
    return out


def _reference(bias: bool, route: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The same inputs in float64 through plain autograd on the formula."""
    g = torch.Generator().manual_seed(seed)
    names = ("x", "W", "b", "A", "B", "xa")
    shapes = ((N, IN), (OUT, IN), (OUT,), (R, IN), (OUT, R), (N, IN))
    t = {k: torch.randn(s, generator=g) for k, s in zip(names, shapes)}
    t["W"] = t["W"] / IN**0.5
    grad_out = torch.randn(N, OUT, generator=g).double()
    t = {k: v.double().requires_grad_(k not in ("W", "b")) for k, v in t.items()}
    xa = t["xa"] if route == "dropped" else t["x"]
    y = t["x"] @ t["W"].T + S * (xa @ t["A"].T) @ t["B"].T + (t["b"] if bias else 0.0)
    (y * grad_out).sum().backward()
    out = {"y": y.detach(), "x": t["x"].grad, "A": t["A"].grad, "B": t["B"].grad}
    if route == "dropped":
        out["xa"] = t["xa"].grad
    return out


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("route", ["merged", "factored", "dropped"])
def test_lora_node_through_onednn_equals_float64(
    calls: list[tuple[int, ...]], bias: bool, route: str
) -> None:
    mine, ref = _node_grads(bias, route), _reference(bias, route)
    assert mine.keys() == ref.keys()
    for k in mine:
        scale = ref[k].abs().max().item()
        torch.testing.assert_close(mine[k].double(), ref[k], rtol=1e-5, atol=1e-5 * scale)
    # forward product; backward: ∂L/∂B's and ∂L/∂A's contractions and ĝ's product
    assert len(calls) == 4


def _dora_layer() -> DoraLinear:
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT).requires_grad_(False)
    layer = DoraLinear(base, r=R, lora_alpha=2.0 * R, scaling=2.0, lora_dropout=0.0)
    g = torch.Generator().manual_seed(1)
    layer.set_factors(torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g) * 0.1)
    return layer


def _dora_grads(layer: DoraLinear, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    xr = x.clone().requires_grad_()
    (layer(xr) * g).sum().backward()
    params = (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector)
    grads = [xr.grad, *(p.grad.clone() for p in params)]
    for p in params:
        p.grad = None
    return grads


@needs_onednn
@pytest.mark.parametrize("merged", [True, False])
def test_dora_through_onednn_equals_mkl(
    calls: list[tuple[int, ...]], monkeypatch: pytest.MonkeyPatch, merged: bool
) -> None:
    from rankwise.lora import dora

    monkeypatch.setattr(dora, "merge_pays", lambda *a: merged)
    tokens = N
    layer = _dora_layer().train()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, tokens // 4, IN, generator=gen)
    g = torch.randn(4, tokens // 4, OUT, generator=gen)
    mine = _dora_grads(layer, x, g)
    assert calls  # the oneDNN route ran
    monkeypatch.setattr(linear_ops, "ONEDNN_RANK", False)
    n_calls = len(calls)
    theirs = _dora_grads(layer, x, g)
    assert len(calls) == n_calls  # and now it did not
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_mkl_route_untouched_off_amd(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the rule off (Intel, others) the products are MKL's GEMMs as before, bit for bit."""
    monkeypatch.setattr(linear_ops, "ONEDNN_RANK", False)
    seen: list[int] = []
    monkeypatch.setattr(linear_ops, "_onednn_cache", [lambda *a: seen.append(1)])
    big = torch.randn(N, IN)
    gt = torch.randn(R, N)
    assert torch.equal(rank_contract(gt, big), torch.mm(gt, big))
    small_t = torch.randn(IN, R)
    assert torch.equal(rank_product_t(big, small_t), torch.mm(small_t.t().contiguous(), big.t()))
    assert seen == []


@needs_onednn
def test_torch_compile_traces_the_mkl_route(calls: list[tuple[int, ...]]) -> None:
    """Inductor cannot lower the oneDNN op from a plain weight: under ``torch.compile`` the
    nodes take MKL's GEMMs, and the compiled model equals the eager one that used oneDNN."""
    from rankwise.lora import LoraConfig, inject

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, 96), nn.GELU(), nn.Linear(96, OUT))
    inject(model, LoraConfig(r=R, target_modules=["0", "2"]), generator=0)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    x = torch.randn(4, N // 4, IN, generator=torch.Generator().manual_seed(1))

    def run(m: nn.Module) -> list[torch.Tensor]:
        out = m(x)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return [out.detach(), *grads]

    eager = run(model)
    assert calls
    n_calls = len(calls)
    compiled = run(torch.compile(model))
    assert len(calls) == n_calls, calls
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
