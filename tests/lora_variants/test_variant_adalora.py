"""AdaLoRA: PEFT's layer numbers, the budget schedule, importance masking step for step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.errors import ConfigError
from rankwise.lora.adalora import (
    AdaLoraConfig,
    AdaLoraLinear,
    adalora_init,
    orthogonal_regularization,
)
from rankwise.lora.adalora_alloc import RankAllocator, budget_schedule


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin1 = nn.Linear(10, 16)
        self.lin2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.tanh(self.lin1(x)))


def _peft(cfg: AdaLoraConfig) -> nn.Module:
    from peft import AdaLoraConfig as PeftAda
    from peft import get_peft_model

    fields = dict(
        init_r=cfg.init_r,
        target_r=cfg.target_r,
        lora_alpha=cfg.lora_alpha,
        tinit=cfg.tinit,
        tfinal=cfg.tfinal,
        deltaT=cfg.deltaT,
        total_step=cfg.total_step,
        target_modules=["lin1", "lin2"],
    )
    return get_peft_model(Two(), PeftAda(**fields))


def _ours_like(peft_model: nn.Module, cfg: AdaLoraConfig) -> nn.Module:
    """Our wrappers on a fresh Two(), holding PEFT's current adapter values."""
    model = Two()
    for name in ("lin1", "lin2"):
        theirs = peft_model.base_model.model.get_submodule(name)
        s = cfg.scaling(r=cfg.init_r, alpha=cfg.lora_alpha)
        layer = AdaLoraLinear(
            getattr(model, name),
            r=cfg.init_r,
            lora_alpha=cfg.lora_alpha,
            scaling=s,
            lora_dropout=0.0,
        )
        with torch.no_grad():
            for p in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, p).copy_(getattr(theirs, p)["default"])
        layer.base_layer.weight.requires_grad_(False)
        layer.base_layer.bias.requires_grad_(False)
        setattr(model, name, layer)
    return model


def test_config_fields_and_validation() -> None:
    cfg = AdaLoraConfig(init_r=6, target_r=2, total_step=100, tinit=10, tfinal=20, lora_alpha=4)
    assert cfg.rank_and_alpha("x.lin") == (6, 4)
    assert cfg.scaling(r=3, alpha=4) == pytest.approx(4 / (6 + 1e-5))
    with pytest.raises(ConfigError, match="total_step"):
        AdaLoraConfig()
    with pytest.raises(ConfigError, match="budgeting phase"):
        AdaLoraConfig(total_step=10, tinit=5, tfinal=5)
    with pytest.raises(ConfigError, match="beta1"):
        AdaLoraConfig(total_step=10, beta1=1.0)
    with pytest.raises(ConfigError, match="init_r"):
        AdaLoraConfig(total_step=10, rank_pattern={"a.lora_E": [True]})
    masked = AdaLoraConfig(init_r=3, total_step=10, rank_pattern={"a.lora_E": [True, False, True]})
    assert masked.rank_and_alpha("a") == (2, 8)
    assert masked.replace(tinit=1).rank_pattern == masked.rank_pattern


def test_layer_matches_peft_and_starts_unchanged() -> None:
    cfg = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10)
    theirs = _peft(cfg)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_E" in n:
                p.normal_()
    ours = _ours_like(theirs, cfg)
    x = torch.randn(5, 10)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
    # merge is exact and equals PEFT's delta
    layer = ours.lin1
    ref = theirs.base_model.model.lin1.get_delta_weight("default")
    torch.testing.assert_close(layer.delta_weight(), ref, atol=1e-6, rtol=0)
    before = ours(x)
    layer.merge()
    torch.testing.assert_close(ours(x), before, atol=1e-5, rtol=0)
    layer.unmerge()
    # PEFT's init: λ = 0 so the output is the base model's
    init = adalora_init(
        torch.zeros(16, 10),
        r=4,
        scaling=1.0,
        embedding=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert init.A.std() == pytest.approx(0.02, rel=0.3)
    fresh = AdaLoraLinear(nn.Linear(10, 16), r=4, lora_alpha=8, scaling=2.0, lora_dropout=0.0)
    fresh.set_factors(init.A, init.B)
    x16 = torch.randn(3, 10)
    torch.testing.assert_close(fresh(x16), fresh.base_layer(x16), atol=0, rtol=0)


def test_budget_schedule_is_cubic() -> None:
    cfg = AdaLoraConfig(init_r=12, target_r=4, total_step=100, tinit=10, tfinal=20, deltaT=5)
    b = {
        t: budget_schedule(cfg, t, init_budget=24, target_budget=8) for t in (0, 10, 15, 45, 80, 81)
    }
    assert b[0] == (24, False) and b[10] == (24, False)
    assert b[15] == (int(16 * (1 - 5 / 70) ** 3 + 8), True)
    assert b[45].budget == int(16 * 0.5**3 + 8) and b[45].masked
    assert b[80].budget == 8 and b[81] == (8, True)


def test_allocator_masks_like_peft_step_for_step() -> None:
    cfg = AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, total_step=12, tinit=2, tfinal=3, deltaT=1
    )
    theirs = _peft(cfg)
    ours = _ours_like(theirs, cfg)
    alloc = RankAllocator(ours, cfg)
    assert (alloc.init_budget, alloc.target_budget) == (8, 4)
    opt_t = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.1)
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    for step in range(cfg.total_step):
        x, y = torch.randn(8, 10, generator=g), torch.randn(8, 3, generator=g)
        for model, opt in ((theirs, opt_t), (ours, opt_o)):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        theirs.base_model.update_and_allocate(step)
        alloc.update_and_allocate(step)
        opt_t.zero_grad()
        opt_o.zero_grad()
        for name in ("lin1", "lin2"):
            e_t = theirs.base_model.model.get_submodule(name).lora_E["default"]
            torch.testing.assert_close(getattr(ours, name).lora_E, e_t, atol=1e-5, rtol=1e-4)
    peft_pattern = {
        k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()
    }
    assert cfg.rank_pattern == peft_pattern
    assert sum(sum(m) for m in cfg.rank_pattern.values()) == alloc.target_budget


def test_orthogonal_regularization() -> None:
    layer = AdaLoraLinear(nn.Linear(8, 6), r=3, lora_alpha=1, scaling=1.0, lora_dropout=0.0)
    Q, _ = torch.linalg.qr(torch.randn(8, 3))
    P, _ = torch.linalg.qr(torch.randn(6, 3))
    layer.set_factors(Q.T, P)
    assert float(orthogonal_regularization(layer).detach()) == pytest.approx(0.0, abs=1e-5)
    layer.set_factors(2 * Q.T, P)
    reg = orthogonal_regularization(layer)
    assert float(reg.detach()) == pytest.approx(
        float((4 * torch.eye(3) - torch.eye(3)).norm()) / 2, rel=1e-4
    )
    reg.backward()
    assert layer.lora_A.grad is not None


def test_truncate_to_rank_pattern() -> None:
    from rankwise.lora.adalora import truncate_to_rank_pattern

    A, E, B = torch.randn(4, 5), torch.randn(4, 1), torch.randn(6, 4)
    state = {"m.lora_A": A, "m.lora_E": E, "m.lora_B": B, "other.weight": torch.ones(2)}
    out = truncate_to_rank_pattern(state, {"m.lora_E": [True, False, True, False]})
    assert torch.equal(out["m.lora_A"], A[[0, 2]]) and torch.equal(out["m.lora_E"], E[[0, 2]])
    assert (
        torch.equal(out["m.lora_B"], B[:, [0, 2]]) and out["other.weight"] is state["other.weight"]
    )
    assert state["m.lora_A"] is A  # the input dict is untouched
    again = truncate_to_rank_pattern(out, {"m.lora_E": [True, False, True, False]})
    assert again["m.lora_A"].shape == (2, 5)  # already truncated: left as is


def test_rank_zero_layer_is_the_base_layer() -> None:
    layer = AdaLoraLinear(nn.Linear(5, 4), r=0, lora_alpha=8, scaling=1.0, lora_dropout=0.0)
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)
    assert layer.lora_A.shape == (0, 5) and layer.lora_B.shape == (4, 0)
