"""Each wrapper against the maths and against PEFT's own layer on the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.errors import MergeError, ShapeMismatchError
from rankwise.lora import LoraConfig, LoraLayer, inject, lora_layers
from rankwise.lora.conv import LoraConv
from rankwise.lora.embedding import LoraEmbedding
from rankwise.lora.layers import LoraLinear


def _hf_conv1d(in_f: int, out_f: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(out_f, in_f)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


# name -> (builder of the base layer, input)
LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), lambda g: torch.randn(3, 4, 6, generator=g)),
    "conv1d_hf": (lambda: _hf_conv1d(6, 5), lambda g: torch.randn(3, 4, 6, generator=g)),
    "embedding": (
        lambda: nn.Embedding(11, 5, padding_idx=0),
        lambda g: torch.randint(0, 11, (3, 4), generator=g),
    ),
    "conv1d": (
        lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1),
        lambda g: torch.randn(2, 3, 9, generator=g),
    ),
    "conv2d": (
        lambda: nn.Conv2d(3, 4, (3, 2), padding=1),
        lambda g: torch.randn(2, 3, 6, 5, generator=g),
    ),
    "conv2d_1x1": (lambda: nn.Conv2d(3, 4, 1), lambda g: torch.randn(2, 3, 5, 5, generator=g)),
}


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _pair(kind: str, **cfg: object) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    build, make_x = LAYERS[kind]
    torch.manual_seed(0)
    base = build()
    state = base.state_dict()
    ours = Holder(build())
    ours.layer.load_state_dict(state)
    theirs = Holder(build())
    theirs.layer.load_state_dict(state)
    kwargs = dict(r=3, lora_alpha=5, target_modules=["layer"], init_lora_weights=False, **cfg)
    theirs = get_peft_model(theirs, PeftConfig(**kwargs)).eval()
    inject(ours, LoraConfig(**kwargs)).eval()
    # copy PEFT's (random) factors into ours: same names once the adapter name is dropped
    sd = {
        k.removeprefix("base_model.model.").replace(".default", ""): v
        for k, v in theirs.state_dict().items()
    }
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    return ours, theirs, make_x(torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_merge_equal_peft(kind: str, rslora: bool) -> None:
    ours, theirs, x = _pair(kind, use_rslora=rslora)
    layer = ours.layer
    assert isinstance(layer, LoraLayer)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-6, atol=1e-6)
        delta = theirs.base_model.model.layer.get_delta_weight("default")
        torch.testing.assert_close(layer.delta_weight(), delta, rtol=1e-6, atol=1e-6)
        layer.merge()
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(ours(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_factors_give_the_linear_map(kind: str) -> None:
    """ΔW = s · B A with W seen as (out, in): the canonical factors reproduce delta_weight."""
    ours, _, _ = _pair(kind)
    layer = ours.layer
    A, B = layer.factors()
    assert A.shape == (3, layer.base_matrix().shape[1]) and B.shape == (
        layer.base_matrix().shape[0],
        3,
    )
    delta = layer._from_matrix(layer.scaling * B @ A)
    torch.testing.assert_close(delta, layer.delta_weight(), rtol=1e-6, atol=1e-6)
    assert layer.base_matrix().data_ptr() == layer.base_weight.data_ptr()  # a view, no copy


def test_linear_forward_is_the_formula() -> None:
    torch.manual_seed(0)
    base = nn.Linear(7, 4)
    layer = LoraLinear(base, r=2, lora_alpha=3, scaling=1.5, lora_dropout=0.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 7)
    W = base.weight + 1.5 * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(layer(x), x @ W.T + base.bias)


def test_dropout_only_on_the_adapter_path() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 8), r=2, lora_alpha=2, scaling=1.0, lora_dropout=0.5).train()
    nn.init.zeros_(layer.lora_A.weight)  # adapter contributes 0: dropout must not touch base(x)
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    assert isinstance(layer.dropout, nn.Dropout) and layer.dropout.p == 0.5


def test_half_precision_base_keeps_float32_adapters() -> None:
    model = Holder(nn.Linear(8, 6).to(torch.bfloat16))
    inject(model, LoraConfig(r=2, target_modules=["layer"], init_lora_weights=False))
    layer = model.layer
    assert layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    ref = (
        layer.base_layer(x).float()
        + layer.scaling * (x.float() @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    )
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_merge_refuses_non_finite_and_twice() -> None:
    model = Holder(nn.Linear(4, 4))
    inject(model, LoraConfig(r=2, target_modules=["layer"], init_lora_weights=False))
    layer = model.layer
    w = layer.base_weight.detach().clone()
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("inf")
    with pytest.raises(MergeError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.base_weight, w) and not layer.merged
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = 1.0
    layer.merge()
    with pytest.raises(MergeError, match="already merged"):
        layer.merge()


def test_set_factors_checks_shapes() -> None:
    layer = LoraLinear(nn.Linear(4, 3), r=2, lora_alpha=2, scaling=1.0, lora_dropout=0.0)
    with pytest.raises(ShapeMismatchError, match=r"expected shape \(2, 4\), found \(4, 2\)"):
        layer.set_factors(torch.zeros(4, 2), torch.zeros(3, 2))


def test_wrappers_forward_base_attributes() -> None:
    model = Holder(nn.Embedding(10, 4, padding_idx=1))
    inject(model, LoraConfig(r=2, target_modules=["layer"]))
    layer = model.layer
    assert isinstance(layer, LoraEmbedding)
    assert layer.padding_idx == 1 and layer.weight is layer.base_layer.weight


def test_unsupported_convolutions_are_refused() -> None:
    from rankwise.errors import InjectionError

    model = Holder(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(InjectionError, match="groups=2"):
        inject(model, LoraConfig(target_modules=["layer"]))
    assert isinstance(model.layer, nn.Conv2d)


def test_conv_wrapper_kind() -> None:
    model = inject(Holder(nn.Conv2d(3, 4, 3)), LoraConfig(r=2, target_modules=["layer"]))
    assert [type(m) for _, m in lora_layers(model)] == [LoraConv]


@pytest.mark.parametrize("kind", ["linear", "conv1d_hf", "embedding", "conv2d"])
@pytest.mark.parametrize("hooked", [False, True])
@pytest.mark.usefixtures("linear_route")
def test_gradients_equal_peft(kind: str, hooked: bool) -> None:
    ours, theirs, x = _pair(kind)
    ours.train()
    theirs.train()
    if hooked:  # a hook on the base layer forces the module-call path
        ours.layer.base_layer.register_forward_hook(lambda m, i, o: None)
    if x.is_floating_point():
        x = x.requires_grad_()
    g = torch.randn(ours(x).shape, generator=torch.Generator().manual_seed(2))
    (ours(x) * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    gx = x.grad.clone() if x.is_floating_point() else None
    if gx is not None:
        x.grad = None
    (theirs(x) * g).sum().backward()
    for n, p in theirs.named_parameters():
        if p.requires_grad:
            key = n.removeprefix("base_model.model.").replace(".default", "")
            torch.testing.assert_close(grads[key], p.grad, rtol=1e-5, atol=1e-6)
    if gx is not None:
        torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])  # DoRA: an IndexError for 0-D input
@pytest.mark.parametrize("rows", [4, 200])  # the small-rows path and the custom node
def test_wrong_input_shapes_fail_as_nn_linear_does(rows: int, dora: bool) -> None:
    import copy

    base = nn.Linear(8, 6)
    model = nn.Sequential(copy.deepcopy(base))
    cfg = LoraConfig(r=2, target_modules=["0"], init_lora_weights=False, use_dora=dora)
    inject(model, cfg, generator=0)
    model.train()
    for x in (torch.randn(rows, 7, requires_grad=True), torch.tensor(1.0)):
        with pytest.raises(RuntimeError) as plain:
            base(x)
        with pytest.raises(RuntimeError) as adapted:
            model(x)
        assert str(adapted.value) == str(plain.value)


def test_sparse_embedding_trains_its_adapter() -> None:
    """``nn.Embedding(sparse=True)``: the adapter's lookup of the small ``A`` has a dense
    gradient (the sparse gradient of its transposed view failed in backward, as PEFT's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6, sparse=True))
    inject(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), generator=0)
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1))
    model(ids).square().sum().backward()
    layer = model[0]
    A, B = layer.lora_embedding_A, layer.lora_embedding_B
    assert A.grad is not None and not A.grad.is_sparse and B.grad is not None
    # against the same computation written out: E[x] + s · Aᵀ[x] Bᵀ
    A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    ref = layer.base_layer.weight[ids] + layer.scaling * (A2.t()[ids] @ B2.t())
    ref.square().sum().backward()
    torch.testing.assert_close(A.grad, A2.grad)
    torch.testing.assert_close(B.grad, B2.grad)


def test_names_moved_out_of_layers_still_resolve_there() -> None:
    # a model pickled before LoraEmbedding/LoraConv moved records rankwise.lora.layers.<name>;
    # unpickling it looks the name up there (AttributeError after the move)
    import rankwise.lora.layers as layers
    from rankwise.lora.registry import WRAPPERS

    assert layers.LoraEmbedding is LoraEmbedding and layers.LoraConv is LoraConv
    assert layers.WRAPPERS is WRAPPERS
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        layers.Nothing  # noqa: B018
