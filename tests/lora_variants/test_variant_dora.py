"""DoRA layers: the paper's formula, PEFT's numbers, detached norm, exact merge, cache validity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rankwise.lora.dora import DoraEmbedding, DoraLinear, dora_row_norm


def _linear(in_f: int = 12, out_f: int = 9, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _dora(base: nn.Module, r: int = 3, alpha: float = 6.0, dropout: float = 0.0) -> DoraLinear:
    layer = DoraLinear(base, r=r, lora_alpha=alpha, scaling=alpha / r, lora_dropout=dropout)
    g = torch.Generator().manual_seed(1)
    A = torch.randn(layer.factors().A.shape, generator=g)
    B = torch.randn(layer.factors().B.shape, generator=g)
    layer.set_factors(A, B)
    return layer


def _reference(layer: DoraLinear, x: torch.Tensor) -> torch.Tensor:
    """W' = m ⊙ (W0 + sBA) / ‖W0 + sBA‖_row, formed in full, float64."""
    W = layer.base_matrix().double()
    A, B = (t.double() for t in layer.factors())
    V = W + layer.scaling * B @ A
    Wp = layer.lora_magnitude_vector.double()[:, None] * V / V.norm(dim=1, keepdim=True)
    out = x.double() @ Wp.T
    bias = layer.base_layer.bias
    return out if bias is None else out + bias.double()


def test_row_norm_identity_matches_the_full_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    W, A, B = (
        torch.randn(7, 11, generator=g),
        torch.randn(3, 11, generator=g),
        torch.randn(7, 3, generator=g),
    )
    W, A, B = W.double(), A.double(), B.double()
    full = (W + 0.7 * B @ A).norm(dim=1)
    torch.testing.assert_close(dora_row_norm(W, A, B, 0.7), full, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_paper_formula_and_unchanged_at_init(bias: bool) -> None:
    base = _linear(bias=bias)
    layer = _dora(base).eval()
    x = torch.randn(4, 5, 12)
    # m = ‖W0 + sBA‖ at init: c = 1, the output is the plain LoRA output W0 x + sBAx + b
    A, B = layer.factors()
    lora = base(x) + layer.scaling * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), lora, atol=1e-5, rtol=0)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 9))
    torch.testing.assert_close(layer(x).double(), _reference(layer, x), atol=1e-5, rtol=1e-5)


def test_same_output_and_gradients_as_peft() -> None:
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = _linear()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    peft_model = get_peft_model(
        One(),
        LoraConfig(
            r=3, lora_alpha=6, target_modules=["lin"], use_dora=True, init_lora_weights=False
        ),
    )
    pl = peft_model.base_model.model.lin
    ours = _dora(_linear())
    with torch.no_grad():
        ours.set_factors(pl.lora_A["default"].weight, pl.lora_B["default"].weight)
        pl.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, 9))
        ours.lora_magnitude_vector.copy_(pl.lora_magnitude_vector["default"].weight)
    x = torch.randn(6, 12)
    out_p, out_o = pl(x), ours(x)
    torch.testing.assert_close(out_o, out_p, atol=1e-5, rtol=0)
    out_p.square().sum().backward()
    out_o.square().sum().backward()
    pairs = [
        (ours.lora_A.weight, pl.lora_A["default"].weight),
        (ours.lora_B.weight, pl.lora_B["default"].weight),
        (ours.lora_magnitude_vector, pl.lora_magnitude_vector["default"].weight),
    ]
    for mine, theirs in pairs:  # the norm is detached in both (DoRA §4.3)
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-4, rtol=1e-4)


def test_norm_is_detached_in_backward() -> None:
    layer = _dora(_linear())
    x = torch.randn(5, 12, dtype=torch.float32)
    layer(x).sum().backward()
    # reference: c ⊙ (W0 x + sBAx) with c's norm a constant
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    W = layer.base_matrix().detach()
    norm = (W + layer.scaling * B @ A).norm(dim=1).detach()
    c = layer.lora_magnitude_vector.detach() / norm
    ref = (x @ (W + layer.scaling * B @ A).T) * c + layer.base_layer.bias
    ref.sum().backward()
    torch.testing.assert_close(layer.lora_A.weight.grad, A.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B.weight.grad, B.grad, atol=1e-5, rtol=1e-5)


def test_merge_unmerge_exact() -> None:
    layer = _dora(_linear())
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.3)
    layer.eval()
    x = torch.randn(3, 12)
    before = layer(x)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)


def test_eval_cache_is_invalidated_when_weights_change() -> None:
    layer = _dora(_linear()).eval()
    x = torch.randn(3, 12)
    layer(x)
    first = layer.weight_norm()
    assert layer.weight_norm() is first  # cached in eval mode
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    layer.train()
    layer(x).square().sum().backward()
    opt.step()  # in-place update of A, B, m bumps their versions
    layer.eval()
    torch.testing.assert_close(layer(x).double(), _reference(layer, x), atol=1e-5, rtol=1e-5)
    layer.lora_B.weight.data = torch.randn_like(layer.lora_B.weight)  # a swapped tensor
    torch.testing.assert_close(layer(x).double(), _reference(layer, x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer.base_layer.weight.add_(0.1)  # the base changed
    torch.testing.assert_close(layer(x).double(), _reference(layer, x), atol=1e-5, rtol=1e-5)


def test_dropout_path_is_peft_formula() -> None:
    layer = _dora(_linear(), dropout=0.3).train()
    x = torch.randn(4, 12)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    xd = layer.dropout(x)
    W = layer.base_matrix()
    A, B = layer.factors()
    c = layer.lora_magnitude_vector / layer.weight_norm()
    ref = layer.base_layer(x) + (c - 1) * (xd @ W.T) + c * layer.scaling * (xd @ A.T @ B.T)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_conv1d_gpt2_layout() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(9, 12)  # weight (in=12, out=9)
    with torch.no_grad():
        base.bias.normal_()
    layer = _dora(base).eval()
    assert layer.lora_magnitude_vector.shape == (9,)
    x = torch.randn(2, 4, 12)
    A, B = layer.factors()
    torch.testing.assert_close(layer(x), base(x) + 2.0 * (x @ A.T @ B.T), atol=1e-5, rtol=0)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(0.7)
    torch.testing.assert_close(layer(x).double(), _reference(layer, x), atol=1e-5, rtol=1e-5)
    ref = copy.deepcopy(layer)
    layer.merge()
    torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=0)


def test_embedding() -> None:
    torch.manual_seed(0)
    base = nn.Embedding(20, 6)
    layer = DoraEmbedding(base, r=2, lora_alpha=4.0, scaling=2.0, lora_dropout=0.0)
    g = torch.Generator().manual_seed(3)
    layer.set_factors(torch.randn(2, 20, generator=g), torch.randn(6, 2, generator=g))
    ids = torch.randint(0, 20, (3, 5))
    lora = base(ids) + 2.0 * (layer.lora_embedding_A.T[ids] @ layer.lora_embedding_B.T)
    torch.testing.assert_close(layer(ids), lora, atol=1e-5, rtol=0)
    assert layer.lora_magnitude_vector.shape == (6,)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 2.0, 6))
    V = base.weight.T + 2.0 * layer.lora_embedding_B @ layer.lora_embedding_A  # (d, n)
    Wp = layer.lora_magnitude_vector[:, None] * V / V.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(ids), Wp.T[ids], atol=1e-5, rtol=0)
    before = layer(ids)
    layer.merge()
    torch.testing.assert_close(layer(ids), before, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer(ids), before, atol=1e-5, rtol=0)


def test_factor_shapes_include_the_magnitude() -> None:
    shapes = DoraLinear.factor_shapes(nn.Linear(12, 9), 3)
    assert shapes["lora_magnitude_vector"] == (9,)
    assert set(dict(_dora(_linear()).named_parameters())) >= {"lora_magnitude_vector"}


def test_inference_weight_cache_follows_every_change() -> None:
    layer = _dora(_linear()).eval()
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), _reference(layer, x), atol=1e-5, rtol=1e-5)
        first = layer.inference_weight()
        assert layer.inference_weight() is first  # cached
        layer.lora_A.weight.add_(0.05)  # in place: version bump
        torch.testing.assert_close(layer(x).double(), _reference(layer, x), atol=1e-5, rtol=1e-5)
        layer.lora_magnitude_vector.mul_(1.1)
        torch.testing.assert_close(layer(x).double(), _reference(layer, x), atol=1e-5, rtol=1e-5)
    layer.train()
    assert layer.__dict__.get("_eval_weight") is None  # dropped in training mode
    out = layer(x)
    out.sum().backward()
    assert layer.lora_magnitude_vector.grad is not None


class _ConvNet(nn.Module):
    """Conv1d (with bias) into Conv2d (no bias, non-square kernel) into a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, (1, 2), bias=False)
        self.head = nn.Linear(4 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).unsqueeze(-1).expand(-1, -1, -1, 2)
        return self.head(self.conv2(h).flatten(1))


def _peft_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            name = name.removeprefix("base_model.model.").replace(".default", "")
            out[name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = p.grad
    return out


def test_convolutions_match_peft_forward_gradients_files_and_merge(tmp_path) -> None:
    """DoRA on Conv1d/Conv2d (it was refused): PEFT's per-filter norm and its magnitude
    shape (1, out, 1[, 1]); same outputs and gradients (dropout too), files both ways."""
    from lora_testkit import perturb
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model

    from rankwise.io import load_adapter, save_adapter
    from rankwise.lora import LoraConfig, inject, lora_layers, merge, unmerge

    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(1))
    kwargs = dict(r=2, lora_alpha=4, target_modules=["conv", "conv2"], use_dora=True)
    base = _ConvNet().eval()
    ours = inject(_ConvNet(), LoraConfig(**kwargs)).eval()
    torch.testing.assert_close(ours(x), base(x), rtol=0, atol=1e-6)
    shapes = {n: tuple(p.shape) for n, p in ours.named_parameters() if "magnitude" in n}
    assert shapes == {
        "conv.lora_magnitude_vector": (1, 8, 1),
        "conv2.lora_magnitude_vector": (1, 4, 1, 1),
    }
    theirs = get_peft_model(_ConvNet(), PeftConfig(**kwargs))
    perturb(theirs, 3)  # factors and magnitudes
    theirs.eval().save_pretrained(tmp_path / "peft")
    loaded = load_adapter(_ConvNet(), tmp_path / "peft")
    torch.testing.assert_close(loaded(x), theirs(x), rtol=0, atol=1e-5)
    assert (loaded(x) - base(x)).abs().max() > 1e-2  # the adapter does act
    save_adapter(loaded, tmp_path / "ours")
    back = PeftModel.from_pretrained(_ConvNet(), tmp_path / "ours").eval()
    torch.testing.assert_close(back(x), theirs(x), rtol=0, atol=1e-5)
    y = loaded(x)
    merge(loaded)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=1e-5)
    unmerge(loaded)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=1e-5)
    # training with dropout: PEFT's base(x) + (c - 1) conv(x~) + c s B A x~
    mine = load_adapter(_ConvNet(), tmp_path / "peft", is_trainable=True).train()
    for _, layer in lora_layers(mine):
        layer.set_dropout(0.3)
    ref = PeftModel.from_pretrained(_ConvNet(), tmp_path / "peft", is_trainable=True).train()
    for module in ref.modules():
        if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict):
            module.lora_dropout["default"] = nn.Dropout(0.3)
    torch.manual_seed(5)
    out_mine = mine(x)
    torch.manual_seed(5)
    out_ref = ref(x)
    torch.testing.assert_close(out_mine, out_ref, rtol=0, atol=1e-5)
    out_mine.square().sum().backward()
    out_ref.square().sum().backward()
    got = {n: p.grad for n, p in mine.named_parameters() if p.grad is not None}
    want = _peft_grads(ref)
    assert set(got) == set(want) and any("magnitude" in n for n in got)
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_embedding_with_a_float_embed_scale_matches_peft(tmp_path) -> None:
    """BART-family scaled embeddings hold ``embed_scale`` as a Python float (DoRA's forward
    called ``.to`` on it: AttributeError); plain LoRA and Gemma's tensor already worked."""
    from lora_testkit import perturb
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from transformers.models.bart.modeling_bart import BartScaledWordEmbedding

    from rankwise.io import load_adapter

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = BartScaledWordEmbedding(30, 8, padding_idx=1, embed_scale=2.5)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.embed(ids)

    kwargs = dict(r=2, lora_alpha=4, target_modules=["embed"], use_dora=True)
    theirs = get_peft_model(Net(), PeftConfig(**kwargs))
    perturb(theirs, 3)
    theirs.eval().save_pretrained(tmp_path)
    ours = load_adapter(Net(), tmp_path)
    ids = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours(ids), theirs(ids), rtol=0, atol=1e-5)
    assert (ours(ids) - Net()(ids)).abs().max() > 1e-2  # the adapter does act


@pytest.mark.parametrize("dims", [1, 2])
def test_convolution_on_unbatched_input_equals_a_batch_of_one(dims: int) -> None:
    """torch convolutions take (C, *spatial) without a batch: the channel scale c went along
    the wrong axis (silently wrong when a spatial size equalled the channel count)."""
    from rankwise.lora import LoraConfig, inject

    torch.manual_seed(0)
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(3, 6, 3, padding=1)
    model = inject(nn.Sequential(conv), LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with torch.no_grad():
        model[0].lora_B.weight.normal_()
        model[0].lora_magnitude_vector.mul_(torch.linspace(0.5, 2.0, 6).view(1, 6, *[1] * dims))
    x = torch.randn(3, *[6] * dims, generator=torch.Generator().manual_seed(1))  # H = out
    for training in (False, True):
        model.train(training)
        torch.testing.assert_close(model(x), model(x[None])[0], rtol=0, atol=1e-6)
