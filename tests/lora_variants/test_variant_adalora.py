"""AdaLoRA: PEFT's layer numbers, the budget schedule, importance masking step for step."""

from __future__ import annotations

import dataclasses

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
    masked = AdaLoraConfig(
        init_r=3, target_r=2, total_step=10, rank_pattern={"a.lora_E": [True, False, True]}
    )
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


class WithHead(nn.Module):
    """A classifier model: task_type="SEQ_CLS" makes inject attach its own copy of the config
    (the head added to modules_to_save)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin1 = nn.Linear(10, 16, dtype=dtype)
        self.lin2 = nn.Linear(16, 16, dtype=dtype)
        self.classifier = nn.Linear(16, 3, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.lin2(torch.tanh(self.lin1(x)))))


def _train(model: nn.Module, cfg: AdaLoraConfig, alloc: RankAllocator, steps: int) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    for step in range(steps):
        x = torch.randn(8, 10, generator=g, dtype=torch.float64).to(dtype)
        y = torch.randint(0, 3, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        (loss + cfg.orth_reg_weight * orthogonal_regularization(model)).backward()
        opt.step()
        alloc.update_and_allocate(step)
        opt.zero_grad()


def test_readme_recipe_saves_the_rank_pattern_when_inject_copied_the_config(tmp_path) -> None:
    # README: inject(model, cfg); RankAllocator(model, cfg). With task_type="SEQ_CLS" inject
    # keeps its own copy of cfg, which save_adapter reads: the allocator wrote rank_pattern
    # only into the caller's cfg, and the file kept every triplet with rank_pattern null.
    import json

    from safetensors.torch import load_file

    from rankwise.io import load_adapter, save_adapter
    from rankwise.lora import get_config, inject, lora_layers

    cfg = AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, total_step=10, tinit=2, tfinal=3, deltaT=1,
        target_modules=["lin1", "lin2"], task_type="SEQ_CLS",
    )  # fmt: skip
    model = inject(WithHead(), cfg, generator=0)
    assert get_config(model) is not cfg and get_config(model).modules_to_save
    alloc = RankAllocator(model, cfg)
    _train(model, cfg, alloc, cfg.total_step)
    assert get_config(model).rank_pattern == cfg.rank_pattern
    save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert written == cfg.rank_pattern
    rows = {k: v.shape[0] for k, v in load_file(tmp_path / "adapter_model.safetensors").items()
            if k.endswith("lora_E")}  # fmt: skip
    assert sum(rows.values()) == alloc.target_budget == 4
    expected = model.eval()(torch.ones(2, 10))
    again = load_adapter(WithHead(), tmp_path)
    assert [layer.r for _, layer in lora_layers(again)] == list(rows.values())
    torch.testing.assert_close(again(torch.ones(2, 10)), expected, rtol=0, atol=1e-6)


def _ten_step_run() -> tuple[AdaLoraConfig, nn.Module, RankAllocator]:
    """A 10-step schedule on WithHead: masks from step 2, the final one at step 7."""
    from rankwise.lora import inject

    cfg = AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, total_step=10, tinit=2, tfinal=3, deltaT=1,
        target_modules=["lin1", "lin2"],
    )  # fmt: skip
    model = inject(WithHead(), cfg, generator=0)
    return cfg, model, RankAllocator(model, cfg)


def test_update_and_allocate_after_zero_grad_is_refused() -> None:
    # No gradient made every score 0: the next mask pruned every triplet, silently (PEFT
    # fails with a TypeError there).
    from rankwise.lora import lora_layers

    cfg, model, alloc = _ten_step_run()
    _train(model, cfg, alloc, 3)  # tinit passed: masks from now on
    before = [layer.lora_E.detach().clone() for _, layer in lora_layers(model)]
    with pytest.raises(ConfigError, match=r"lin1\.lora_A has no gradient.*before zero_grad"):
        alloc.update_and_allocate(3)
    assert all(torch.equal(layer.lora_E, b) for (_, layer), b in zip(lora_layers(model), before))


def test_a_fresh_allocator_past_the_final_mask_is_refused_and_a_restored_one_works() -> None:
    # a run resumed after the final mask without the allocator's state applied an empty
    # pattern: the pruned triplets trained again, and the save kept every one of them
    from rankwise.lora import inject

    cfg, model, alloc = _ten_step_run()
    _train(model, cfg, alloc, 8)  # the final mask was at step 7
    state = alloc.state_dict()
    fresh_cfg = dataclasses.replace(cfg, rank_pattern=None)
    fresh = RankAllocator(inject(WithHead(), fresh_cfg, generator=0), fresh_cfg)
    with pytest.raises(ConfigError, match=r"update_and_allocate\(8\): past the final mask"):
        fresh.update_and_allocate(8)
    fresh.load_state_dict(state)
    assert fresh_cfg.rank_pattern == cfg.rank_pattern and fresh.update_and_allocate(8).masked
    with pytest.raises(ValueError, match="exp_avg_ipt names unknown"):
        fresh.load_state_dict({**state, "exp_avg_ipt": {"nope": torch.zeros(1)}})


def test_float64_scores_keep_exactly_the_budget() -> None:
    # The threshold used to be taken in float32: rounded below the k-th float64 score, it
    # kept that triplet too (one over budget in about half of these draws).
    from rankwise.lora import inject, lora_layers

    cfg = AdaLoraConfig(init_r=6, target_r=3, total_step=30, target_modules=["lin1", "lin2"])
    model = inject(WithHead(torch.float64), cfg, generator=0)
    alloc = RankAllocator(model, cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        for key, p in alloc._params():
            alloc.exp_avg_ipt[key] = torch.rand(p.shape, generator=g, dtype=torch.float64)
            alloc.exp_avg_unc[key] = torch.rand(p.shape, generator=g, dtype=torch.float64)
        for _, layer in lora_layers(model):
            with torch.no_grad():
                layer.lora_E.fill_(1.0)
        pattern = alloc.mask_to_budget(7)
        assert sum(map(sum, pattern.values())) == 7


def test_orthogonal_regularization_counts_pruned_layers_as_peft() -> None:
    # PEFT averages over every lora_A/lora_B, a layer pruned to r = 0 adding two zero terms
    pruned = AdaLoraLinear(nn.Linear(8, 6), r=0, lora_alpha=1, scaling=1.0, lora_dropout=0.0)
    kept = AdaLoraLinear(nn.Linear(8, 6), r=3, lora_alpha=1, scaling=1.0, lora_dropout=0.0)
    alone = float(orthogonal_regularization(kept).detach())
    both = float(orthogonal_regularization(nn.ModuleList([kept, pruned])).detach())
    assert both == pytest.approx(alone * 2 / 4, rel=1e-6)


def test_a_final_mask_before_any_budgeting_step_keeps_the_budget() -> None:
    """tinit = tfinal = 0 and one step (``finetune --method adalora --max-steps 1``): the final
    mask came before any score, every score 0 tied at the threshold and every triplet was
    pruned (PEFT raises KeyError). The step's own gradients are scored instead."""
    cfg = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=1, tinit=0, tfinal=0)
    model = _ours_like(_peft(cfg), cfg)
    with torch.no_grad():
        for name in ("lin1", "lin2"):
            getattr(model, name).lora_E.fill_(0.1)  # λ ≠ 0: every triplet has a gradient
    alloc = RankAllocator(model, cfg)
    x, y = torch.randn(8, 10, generator=torch.Generator().manual_seed(0)), torch.zeros(8, 3)
    nn.functional.mse_loss(model(x), y).backward()
    alloc.update_and_allocate(1)
    kept = {k: sum(v) for k, v in cfg.rank_pattern.items()}
    assert sum(kept.values()) == alloc.target_budget == 4, kept


def test_allocator_state_with_a_bad_rank_pattern_is_refused() -> None:
    cfg = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10)
    alloc = RankAllocator(_ours_like(_peft(cfg), cfg), cfg)
    good = alloc.state_dict()
    for pattern, message in (
        ({"lin1.lora_E": [False]}, "must be 4 booleans"),  # broadcast: zeroed every λ
        ({"lin1.lora_E": [True] * 3}, "must be 4 booleans"),
        ({"lin1.lora_E": "TTFF"}, "must be 4 booleans"),
        ({"lin1.lora_E": [1, 0, 1, 1]}, "must be 4 booleans"),
        ({"lin9.lora_E": [True] * 4}, "names 'lin9.lora_E'"),
        ({"lin1": [True] * 4}, "names 'lin1'"),
    ):
        with pytest.raises(ValueError, match=message):
            alloc.load_state_dict({**good, "rank_pattern": pattern})
    assert cfg.rank_pattern == {}  # nothing recorded from a refused state


def test_config_refuses_what_adalora_cannot_do() -> None:
    for kwargs, message in (
        (dict(orth_reg_weight=float("nan")), "orth_reg_weight: expected a finite"),
        (dict(orth_reg_weight=float("inf")), "orth_reg_weight: expected a finite"),
        (dict(init_lora_weights="pissa"), "init_lora_weights: AdaLoRA initializes as PEFT"),
        (dict(init_lora_weights="olora"), "init_lora_weights: AdaLoRA initializes as PEFT"),
        # accepted and ignored: the scale stayed lora_alpha / init_r
        (dict(use_rslora=True), "use_rslora: AdaLoRA scales by lora_alpha / init_r"),
        (dict(alpha_pattern={"lin1": 4}), "alpha_pattern: AdaLoRA uses one lora_alpha"),
    ):
        with pytest.raises(ConfigError, match=message):
            AdaLoraConfig(total_step=10, **kwargs)
    AdaLoraConfig(init_r=4, target_r=4, total_step=10)  # nothing to prune: allowed, as the CLI
    with pytest.warns(UserWarning, match="r=4 is not used by AdaLoRA and is ignored"):
        AdaLoraConfig(r=4, total_step=10)
    assert AdaLoraConfig(total_step=10, init_lora_weights="gaussian").init_lora_weights is True
    # target_r > init_r: a config PEFT saves and loads (init_r set, target_r left at 8), but
    # not one to train (PEFT fails at the first mask; rankwise would never prune)
    loose = AdaLoraConfig(init_r=4, total_step=10)
    assert loose.target_r == 8
    with pytest.raises(ConfigError, match="target_r: the average rank AdaLoRA prunes to must"):
        RankAllocator(_ours_like(_peft(loose), loose), loose)


def test_a_peft_adalora_file_with_a_named_init_loads_as_peft_reads_it(tmp_path) -> None:
    """PEFT's AdaLoRA takes any true init_lora_weights as its own init and never moves the
    base: such a file loads (rankwise would have run PiSSA on the base)."""
    import json

    from rankwise.io import load_adapter

    cfg = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10)
    theirs = _peft(cfg)
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": "pissa"}))
    base = Two()
    before = base.lin1.weight.detach().clone()
    ours = load_adapter(base, tmp_path)
    assert torch.equal(ours.lin1.base_layer.weight, before)
    x = torch.randn(4, 10)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


def test_a_peft_adalora_file_with_target_r_above_init_r_loads(tmp_path) -> None:
    # peft.AdaLoraConfig(init_r=4) keeps target_r = 8; PEFT saves and reloads such files
    from rankwise.io import load_adapter

    cfg = AdaLoraConfig(init_r=4, lora_alpha=8, total_step=10)
    theirs = _peft(cfg)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(Two(), tmp_path)
    x = torch.randn(4, 10)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


def test_adaloras_internal_init_name_is_not_a_lora_init() -> None:
    # LoraConfig(init_lora_weights="adalora") changed the output at step 0 and wrote a file
    # PEFT refuses ("Unknown initialization")
    from rankwise.lora import LoraConfig

    with pytest.raises(ConfigError, match="init_lora_weights: expected True, False or one of"):
        LoraConfig(init_lora_weights="adalora")
    assert AdaLoraConfig(total_step=10).initializer == "adalora"  # still AdaLoRA's own


def test_init_lora_weights_false_draws_every_factor_as_peft() -> None:
    # False mapped to the plain-LoRA "random" init, which leaves λ = 0: the adapter's output
    # was exactly zero, as with True. PEFT leaves λ, P and Q as drawn, torch.randn: N(0, 1)
    from peft import AdaLoraConfig as PeftAda
    from peft import get_peft_model

    from rankwise.lora import inject

    fields = dict(init_r=8, target_r=4, lora_alpha=8, total_step=10, target_modules=["lin1"])
    cfg = AdaLoraConfig(**fields, init_lora_weights=False)
    ours = inject(Two(), cfg, generator=0)
    theirs = get_peft_model(Two(), PeftAda(**fields, init_lora_weights=False))
    x = torch.randn(6, 10)
    assert not torch.allclose(ours(x), Two()(x))
    for name in ("lora_A", "lora_E", "lora_B"):
        mine = getattr(ours.lin1, name).detach()
        peft_value = getattr(theirs.base_model.model.lin1, name)["default"].detach()
        assert mine.shape == peft_value.shape
        assert bool((mine != 0).all()) and bool((peft_value != 0).all()), name
        # N(0, 1) both (λ has only init_r = 8 draws: a loose band)
        band = 0.5 if name == "lora_E" else 0.25
        for value in (mine, peft_value):
            assert float(value.std()) == pytest.approx(1.0, rel=band), name
    again = inject(Two(), cfg, generator=0)  # the generator fixes all three
    assert torch.equal(again.lin1.lora_E, ours.lin1.lora_E)
    assert torch.equal(again.lin1.lora_A, ours.lin1.lora_A)


@pytest.mark.parametrize("extra", [{"use_rslora": True}, {"alpha_pattern": {"lin1": 32}}])
def test_a_peft_adalora_file_with_options_it_ignores_still_loads(extra: dict, tmp_path) -> None:
    # refusing them in AdaLoraConfig also refused PEFT's own files, which it saves and reloads
    from peft import AdaLoraConfig as PeftAda
    from peft import get_peft_model

    from rankwise.io import load_adapter

    fields = dict(init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=["lin1"])
    theirs = get_peft_model(Two(), PeftAda(**fields, **extra))
    with torch.no_grad():
        theirs.base_model.model.lin1.lora_E["default"].normal_()
    theirs.save_pretrained(tmp_path)
    with pytest.warns(RuntimeWarning, match=f"AdaLoRA ignores {next(iter(extra))}"):
        ours = load_adapter(Two(), tmp_path)
    x = torch.randn(4, 10)
    torch.testing.assert_close(ours(x), theirs.eval()(x), atol=1e-5, rtol=0)


def test_an_allocator_over_pruned_layers_is_refused_up_front(tmp_path) -> None:
    """Layers pruned before (a file loaded for training; or the same config object injected
    again, its rank_pattern filled in by the first run's allocator) have r < init_r: the run
    trained to the end and then could not save (masks of r, not init_r, entries), or failed
    at the first step with "lora_A has no gradient" for a layer pruned to r = 0."""
    from rankwise.io import load_adapter, save_adapter
    from rankwise.lora import get_config, inject

    cfg, model, alloc = _ten_step_run()
    _train(model, cfg, alloc, cfg.total_step)
    save_adapter(model, tmp_path)
    loaded = load_adapter(WithHead(), tmp_path, is_trainable=True)
    with pytest.raises(ConfigError, match=r"AdaLoRA layer 'lin\d' has r=\d, expected init_r=4"):
        RankAllocator(loaded, get_config(loaded))
    again = inject(WithHead(), cfg, generator=0)  # cfg.rank_pattern holds the first run's masks
    with pytest.raises(ConfigError, match=r"rank_pattern=None"):
        RankAllocator(again, cfg)
    fresh = dataclasses.replace(cfg, rank_pattern=None)
    RankAllocator(inject(WithHead(), fresh, generator=0), fresh)  # the way to train again
