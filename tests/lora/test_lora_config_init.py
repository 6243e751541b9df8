"""LoraConfig validation, scaling rules and the initializer registry (pure functions)."""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.lora import INITIALIZERS, SCALING_RULES, LoraConfig
from rankwise.lora.config import pattern_key
from rankwise.lora.initializers import as_generator, initializer_name


def test_defaults_match_peft() -> None:
    from peft import LoraConfig as PeftConfig

    ours, theirs = LoraConfig(), PeftConfig()
    for name in (
        "r",
        "lora_alpha",
        "lora_dropout",
        "bias",
        "use_rslora",
        "init_lora_weights",
        "fan_in_fan_out",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "exclude_modules",
        "target_modules",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_scaling_rules() -> None:
    assert LoraConfig(r=16, lora_alpha=32).scaling(r=16, alpha=32) == 2.0
    assert LoraConfig(use_rslora=True).scaling(r=16, alpha=32) == 8.0
    assert set(SCALING_RULES) == {"standard", "rslora"}


def test_pattern_key_follows_peft() -> None:
    from peft.utils.other import get_pattern_key

    keys = ["layer.1.*query", "value", r"\d\.attention\.self\.key"]
    for name in [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.0.attention.self.query",
    ]:
        ours = pattern_key(dict.fromkeys(keys, 1), name)
        assert (ours or name) == get_pattern_key(keys, name)


def test_replace_validates_and_copies() -> None:
    cfg = LoraConfig(target_modules=["q"])
    other = cfg.replace(r=2)
    assert (cfg.r, other.r) == (8, 2)
    with pytest.raises(ConfigError, match="r: expected a positive int, found 0"):
        cfg.replace(r=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lora_alpha": float("inf")}, "lora_alpha"),
        ({"target_modules": ["q", ""]}, "non-empty"),
        ({"target_modules": 3}, "list of module names"),
        ({"layers_to_transform": [-1]}, "non-negative"),
        ({"layers_pattern": "h"}, "requires layers_to_transform"),
        ({"task_type": "CLS"}, "task_type"),
        ({"alpha_pattern": {"[": 2}}, "not a valid regex"),
        ({"rank_pattern": {"q(": 2}}, "rank_pattern: 'q\\(' is not a valid regex"),
        ({"exclude_modules": "(("}, "exclude_modules: .* is not a valid regex"),
        (
            {"target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": "(("},
            "layers_pattern: .* is not a valid regex",
        ),
        (
            {"target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": 5},
            "layers_pattern: expected a string or a list",
        ),
        ({"use_rslora": 1}, "use_rslora"),
        # valid alone, not inside PEFT's wider regex (re.error escaped from a load)
        ({"alpha_pattern": {"(?i)q": 2}}, "alpha_pattern: .* is not valid where it is used"),
        (
            {"target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": "(?i)h"},
            "layers_pattern: .* is not valid where it is used",
        ),
        (
            {"target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": "(?P<idx>h)"},
            "layers_pattern: .* is not valid where it is used",
        ),
        ({"base_model_name_or_path": ["a"]}, "base_model_name_or_path: expected a model id"),
    ],
)
def test_errors_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


@pytest.mark.parametrize(("field", "value"), [("r", 0), ("lora_dropout", 1.0), ("bias", "some")])
def test_inject_checks_a_field_assigned_after_construction(field: str, value: object) -> None:
    from rankwise.lora import inject

    cfg = LoraConfig(target_modules=["0"])
    setattr(cfg, field, value)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=f"{field}: expected"):
        inject(model, cfg)
    assert type(model[0]) is torch.nn.Linear and not hasattr(model, "_rankwise_lora")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


W = torch.zeros(40, 300)


@pytest.mark.parametrize("name", sorted(INITIALIZERS))
def test_initializers_shapes_dtype_and_reproducibility(name: str) -> None:
    w = W.to(torch.float64)
    a = INITIALIZERS[name](w, r=4, scaling=2.0, embedding=False, generator=as_generator(3))
    b = INITIALIZERS[name](w, r=4, scaling=2.0, embedding=False, generator=as_generator(3))
    assert a.A.shape == (4, 300) and a.B.shape == (40, 4) and a.A.dtype == torch.float64
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and a.base is None


def test_kaiming_is_peft_default() -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_ with a = sqrt(5)), B = 0."""
    init = INITIALIZERS["kaiming"](
        torch.zeros(64, 400), r=64, scaling=1.0, embedding=False, generator=as_generator(0)
    )
    bound = 1 / math.sqrt(400)
    assert init.A.abs().max() <= bound and init.A.abs().max() > 0.95 * bound
    assert abs(init.A.var().item() - bound**2 / 3) < 0.05 * bound**2
    assert not init.B.any()
    ref = torch.empty(64, 400)
    torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
    assert abs(ref.var().item() - init.A.var().item()) < 0.05 * bound**2


def test_gaussian_and_embedding_rules() -> None:
    g = INITIALIZERS["gaussian"](
        torch.zeros(64, 400), r=8, scaling=1.0, embedding=False, generator=as_generator(0)
    )
    assert abs(g.A.std().item() - 1 / 8) < 0.01 and not g.B.any()
    e = INITIALIZERS["gaussian"](
        torch.zeros(64, 400), r=8, scaling=1.0, embedding=True, generator=as_generator(0)
    )
    assert (
        not e.A.any() and abs(e.B.std().item() - 1.0) < 0.1
    )  # PEFT: embeddings A = 0, B ~ N(0, 1)


def test_initializer_names() -> None:
    assert [initializer_name(v) for v in (True, False, "gaussian")] == [
        "kaiming",
        "random",
        "gaussian",
    ]
    with pytest.raises(TypeError, match="generator"):
        as_generator("seed")  # type: ignore[arg-type]


def _global_draw_after(fn, *args, **kwargs) -> float:
    """torch's next global draw after ``fn(*args, **kwargs)`` from seed 0."""
    torch.manual_seed(0)
    fn(*args, **kwargs)
    return float(torch.rand(()))


@pytest.mark.parametrize(
    "settings",
    [{}, {"init_lora_weights": "gaussian"}, {"init_lora_weights": "olora"}, {"use_dora": True}],
    ids=["kaiming", "gaussian", "olora", "dora"],
)
def test_seeded_inject_and_load_leave_the_global_rng_alone(settings: dict, tmp_path) -> None:
    # The factor modules' own default init drew from the global RNG (then overwritten), so
    # the next draw after inject(generator=0) depended on r and the targets.
    import numpy as np
    from torch import nn

    from rankwise.io import load_adapter, save_adapter
    from rankwise.lora import inject

    def model() -> nn.Module:
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(12, 16), nn.Conv2d(3, 8, 3), nn.Linear(16, 8))

    untouched = _global_draw_after(lambda: None)
    for r in (2, 4):
        config = LoraConfig(r=r, target_modules=["0", "1", "2"], **settings)
        assert _global_draw_after(inject, model(), config, generator=0) == untouched
        gen = torch.Generator().manual_seed(0)
        assert _global_draw_after(inject, model(), config, generator=gen) == untouched
    adapted = inject(model(), LoraConfig(r=4, target_modules=["0", "2"], **settings), generator=1)
    save_adapter(adapted, tmp_path)
    assert _global_draw_after(load_adapter, model(), tmp_path) == untouched
    # a numpy integer seed is a seed, as in rankwise.linalg (it was a TypeError here)
    config = LoraConfig(r=2, target_modules=["0"], **settings)
    a = inject(model(), config, generator=np.int64(3))[0].lora_A.weight
    b = inject(model(), config, generator=3)[0].lora_A.weight
    assert torch.equal(a, b)
