"""AdaLoRA on convolutions: PEFT's SVDConv2d (ViT's patch embedding) layer for layer, its files
both ways, the allocator over linear and convolution layers alike, and Conv1d."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from rankwise.lora import AdaLoraConfig, RankAllocator, inject, merge, unmerge
from rankwise.lora.adalora import AdaLoraConv

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

KW = dict(init_r=4, target_r=2, lora_alpha=8, total_step=12, tinit=2, tfinal=3, deltaT=1,
          target_modules=["projection", "q_proj"])  # fmt: skip


def _vit() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=16, patch_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.ViTModel(cfg, add_pooling_layer=False).eval()


def _pixels(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _randomize_lambda(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def test_a_peft_adalora_conv2d_file_loads_and_ours_loads_in_peft(tmp_path: Path) -> None:
    """AdaLoRA refused every convolution ("adalora adapters support ['linear'] layers"), so a
    PEFT AdaLoRA file for a ViT (its SVDConv2d on the patch embedding) did not load."""
    from rankwise.io import load_adapter, save_adapter

    theirs = peft.get_peft_model(_vit(), peft.AdaLoraConfig(**KW))
    _randomize_lambda(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(pixel_values=_pixels()).last_hidden_state
    ours = load_adapter(_vit(), tmp_path / "peft")
    assert isinstance(ours.embeddings.patch_embeddings.projection, AdaLoraConv)
    with torch.no_grad():
        got = ours(pixel_values=_pixels()).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - _vit()(pixel_values=_pixels()).last_hidden_state).abs().max() > 1e-2

    mine = inject(_vit(), AdaLoraConfig(**KW), generator=0)
    _randomize_lambda(mine, seed=2)
    save_adapter(mine, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_vit(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            back(pixel_values=_pixels()).last_hidden_state,
            mine(pixel_values=_pixels()).last_hidden_state,
            atol=1e-5, rtol=1e-5,
        )  # fmt: skip


def test_conv_layer_equals_its_merged_weight_and_peft_delta() -> None:
    model = inject(_vit(), AdaLoraConfig(**KW), generator=0)
    _randomize_lambda(model)
    layer = model.embeddings.patch_embeddings.projection
    theirs = peft.get_peft_model(_vit(), peft.AdaLoraConfig(**KW))
    svd_conv = theirs.base_model.model.embeddings.patch_embeddings.projection
    with torch.no_grad():
        for name in ("lora_A", "lora_E", "lora_B"):
            getattr(svd_conv, name)["default"].copy_(getattr(layer, name))
        want = svd_conv.get_delta_weight("default")
    torch.testing.assert_close(layer.delta_weight(), want)
    x = _pixels()
    with torch.no_grad():
        unmerged = model(pixel_values=x).last_hidden_state
        merge(model)
        merged = model(pixel_values=x).last_hidden_state
        unmerge(model)
        again = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, unmerged, atol=1e-6, rtol=1e-6)


def test_allocator_prunes_conv_and_linear_layers_like_peft(tmp_path: Path) -> None:
    """Trained side by side with PEFT from the same factors: the same λ every step and the
    same kept triplets, a conv layer among them; the file cut to them reloads exactly."""
    from rankwise.io import load_adapter, save_adapter

    kw = {**KW, "target_r": 1}  # the conv layer keeps 2 of 4 triplets, q_proj none
    cfg = AdaLoraConfig(**kw)
    theirs = peft.get_peft_model(_vit(), peft.AdaLoraConfig(**kw))
    ours = inject(_vit(), cfg, generator=0)
    with torch.no_grad():  # PEFT's initial factors (ParameterDict entries "<name>.default")
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.copy_(theirs.base_model.model.get_parameter(f"{name}.default"))
    alloc = RankAllocator(ours, cfg)
    assert any(isinstance(m, AdaLoraConv) for m in alloc.layers.values())
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
            for m in (theirs, ours)]  # fmt: skip
    g = torch.Generator().manual_seed(3)
    for step in range(cfg.total_step):
        x, y = _pixels(4, seed=10 + step), torch.randn(4, 17, 32, generator=g)
        for model, opt in zip((theirs, ours), opts, strict=True):
            out = model(pixel_values=x).last_hidden_state
            nn.functional.mse_loss(out, y).backward()
            opt.step()
        theirs.base_model.update_and_allocate(step)
        alloc.update_and_allocate(step)
        for opt in opts:
            opt.zero_grad()
        e_t = theirs.base_model.model.embeddings.patch_embeddings.projection.lora_E["default"]
        e_o = ours.embeddings.patch_embeddings.projection.lora_E
        torch.testing.assert_close(e_o, e_t, atol=1e-5, rtol=1e-4)
    pattern = {k.replace(".default", ""): v
               for k, v in theirs.peft_config["default"].rank_pattern.items()}  # fmt: skip
    assert cfg.rank_pattern == pattern
    conv_kept = cfg.rank_pattern["embeddings.patch_embeddings.projection.lora_E"]
    assert 0 < sum(conv_kept) < len(conv_kept)  # pruned in part: the file cuts it
    save_adapter(ours, tmp_path)
    back = load_adapter(_vit(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            back(pixel_values=_pixels()).last_hidden_state,
            ours.eval()(pixel_values=_pixels()).last_hidden_state,
            atol=1e-5, rtol=1e-5,
        )  # fmt: skip


def test_conv1d_adalora_matches_its_merged_weight(tmp_path: Path) -> None:
    from rankwise.io import load_adapter, save_adapter

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv1d(3, 5, kernel_size=3, stride=2, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    model = inject(
        Net(), AdaLoraConfig(init_r=2, target_r=1, total_step=4, target_modules=["conv"])
    )
    _randomize_lambda(model)
    x = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(x)
        expected = nn.functional.conv1d(
            x, model.conv.base_layer.weight + model.conv.delta_weight(),
            model.conv.base_layer.bias, stride=2, padding=1,
        )  # fmt: skip
    torch.testing.assert_close(unmerged, expected, atol=1e-5, rtol=1e-5)
    assert (unmerged - copy.deepcopy(Net())(x)).abs().max() > 1e-3
    with pytest.warns(RuntimeWarning, match=r"AdaLoRA on nn.Conv1d \('conv'\): PEFT's AdaLoRA"):
        save_adapter(model, tmp_path)
    back = load_adapter(Net(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(x), unmerged, atol=1e-6, rtol=1e-6)
