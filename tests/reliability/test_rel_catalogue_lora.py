"""Bad inputs to the config, injection, merge and linalg APIs (issue 8, catalogue part 1).

Each row: the call, the error class, a regex the message must match (naming the culprit),
the error raised from rankwise's own code (not from deep inside torch), and the model and
the files under the case's directory unchanged. Rows marked ``bug`` are strict xfails: the
library does not refuse that input yet (see the reason for the fix).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from rel_kit import Call, Case, TiedLM, as_params, check_case, mlp, tiny
from torch import nn

from rankwise import linalg
from rankwise.errors import ConfigError, InjectionError, MergeError, ShapeMismatchError
from rankwise.lora import LoraConfig, inject, lora_layers, merge, merge_and_unload, unmerge

CFG = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
NAN = float("nan")


def _config(**fields: object):
    return lambda tmp: Call(lambda: LoraConfig(**{"target_modules": ["0"], **fields}))


def _inject(model_fn, cfg: LoraConfig | object, **kw: object):
    def build(tmp: Path) -> Call:
        model = model_fn()
        return Call(lambda: inject(model, cfg, **kw), (model,))

    return build


def _on_injected(action, *, prepare=None, model_fn=mlp, cfg: LoraConfig = CFG):
    """Inject ``cfg``, run ``prepare(model)`` (e.g. merge it), then the failing ``action``."""

    def build(tmp: Path) -> Call:
        model = inject(model_fn(), cfg, generator=0)
        if prepare is not None:
            prepare(model)
        return Call(lambda: action(model), (model,))

    return build


def _set(model: nn.Module, layer: int, factor: str, value: float) -> None:
    _, lora = list(lora_layers(model))[layer]
    with torch.no_grad():
        getattr(lora, factor).weight.view(-1)[0] = value


def _inf_base() -> nn.Module:
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    return model


def _fp16_near_max() -> nn.Module:
    model = mlp().half()
    with torch.no_grad():
        model[0].weight.fill_(65000.0)  # float16 max is 65504: any positive update overflows
    return model


def _big_positive_update(model: nn.Module) -> None:
    _, lora = list(lora_layers(model))[0]
    with torch.no_grad():
        lora.lora_A.weight.fill_(100.0)
        lora.lora_B.weight.fill_(100.0)


def _huge_r_refused_fast(model: nn.Module) -> None:
    start = time.perf_counter()
    try:
        inject(model, LoraConfig(r=2**40, target_modules=["0"]))
    finally:  # refused by a check, not by a failed 35 TB allocation
        assert time.perf_counter() - start < 5.0


def _meta_model() -> nn.Module:
    with torch.device("meta"):
        return mlp()


def _partly_merged(model: nn.Module) -> None:
    list(lora_layers(model))[0][1].merge()


def _bad_svd(M: torch.Tensor, **kw: object):
    return lambda tmp: Call(lambda: linalg.truncated_svd(M, **kw))


def _nan_matrix() -> torch.Tensor:
    M = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    M[2, 3] = NAN
    return M


def _inf_matrix() -> torch.Tensor:
    M = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    M[0, 0] = float("inf")
    return M


EYE = torch.eye(4)

CASES: list[Case] = [
    # -- LoraConfig -------------------------------------------------------------------------
    Case("config lora_alpha=0", _config(lora_alpha=0), ConfigError, "lora_alpha.*found 0"),
    Case("config r=0", _config(r=0), ConfigError, "r: expected a positive int"),
    Case("config r wrong type", _config(r=2.5), ConfigError, "r: .*2.5"),
    Case("config alpha NaN", _config(lora_alpha=NAN), ConfigError, "lora_alpha.*nan"),
    Case("config dropout=1", _config(lora_dropout=1.0), ConfigError, "lora_dropout"),
    Case("config bad regex", _config(target_modules="(("), ConfigError, "target_modules.*'\\(\\('"),
    Case("config rank_pattern r<0", _config(rank_pattern={"0": -1}), ConfigError, "rank_pattern"),
    Case("config layers_pattern alone", _config(layers_pattern="h"), ConfigError, "layers_pattern"),
    Case("config unknown init", _config(init_lora_weights="magic"), ConfigError, "'magic'"),
    # -- inject -----------------------------------------------------------------------------
    Case(
        "inject unknown target",
        _inject(mlp, CFG.replace(target_modules=["zzz"])),
        InjectionError,
        "'zzz' matches no module",
    ),  # fmt: skip
    Case(
        "inject unsupported layer",
        _inject(mlp, CFG.replace(target_modules=["1"])),
        InjectionError,
        "'1' is a ReLU",
    ),  # fmt: skip
    Case(
        "inject no targets",
        _inject(mlp, CFG.replace(target_modules=None)),
        InjectionError,
        "target_modules",
    ),  # fmt: skip
    Case(
        "inject unknown modules_to_save",
        _inject(mlp, CFG.replace(modules_to_save=["x"])),
        InjectionError,
        "modules_to_save: 'x'",
    ),  # fmt: skip
    Case("inject a dict config", _inject(mlp, {"r": 2}), InjectionError, "LoraConfig, found dict"),
    Case(
        "inject grouped conv",
        _inject(
            lambda: nn.Sequential(nn.Conv1d(4, 4, 3, groups=2)), CFG.replace(target_modules=["0"])
        ),
        InjectionError,
        "'0' has groups=2",
    ),  # fmt: skip
    Case(
        "inject twice", _on_injected(lambda m: inject(m, CFG)), InjectionError, "already injected"
    ),
    Case(
        "inject generator of wrong type",
        _inject(mlp, CFG, generator="seed"),
        TypeError,
        "generator",
    ),  # fmt: skip
    Case(
        "inject rank far beyond both dims of the layer",
        _inject(mlp, CFG.replace(r=2**23)),
        InjectionError,
        "r=8388608 exceeds both dims",
    ),  # fmt: skip
    Case(
        "inject huge r refused before allocating",
        lambda tmp: Call(lambda: _huge_r_refused_fast(mlp())),
        InjectionError,
        "r=1099511627776",
    ),  # fmt: skip
    Case(
        "inject zero-size layer",
        _inject(lambda: nn.Sequential(nn.Linear(0, 6)), CFG.replace(target_modules=["0"])),
        InjectionError,
        "'0'",
    ),  # fmt: skip
    # -- merge / unmerge --------------------------------------------------------------------
    Case("merge twice", _on_injected(merge, prepare=merge), MergeError, "already merged"),
    Case("unmerge an unmerged model", _on_injected(unmerge), MergeError, "not merged"),
    Case(
        "merge a plain model",
        lambda tmp: (lambda m: Call(lambda: merge(m), (m,)))(mlp()),
        InjectionError,
        "no rankwise LoRA adapters",
    ),  # fmt: skip
    Case(
        "merge NaN adapter (first layer)",
        _on_injected(merge, prepare=lambda m: _set(m, 0, "lora_B", NAN)),
        MergeError,
        "non-finite",
    ),
    Case(
        "merge NaN adapter (second layer)",
        _on_injected(merge, prepare=lambda m: _set(m, 1, "lora_B", NAN)),
        MergeError,
        "non-finite",
    ),
    Case(
        "merge Inf base weight", _on_injected(merge, model_fn=_inf_base), MergeError, "non-finite"
    ),
    Case(
        "merge float16 overflow",
        _on_injected(merge, prepare=_big_positive_update, model_fn=_fp16_near_max),
        MergeError,
        "non-finite",
    ),  # fmt: skip
    Case(
        "merge_and_unload partly merged",
        _on_injected(merge_and_unload, prepare=_partly_merged),
        MergeError,
        "partly merged",
    ),  # fmt: skip
    Case(
        "merge tied weights",
        _on_injected(merge, model_fn=TiedLM, cfg=LoraConfig(r=2, target_modules=["wte"])),
        MergeError,
        "tied to",
    ),  # fmt: skip
    Case(
        "merge on the meta device",
        _on_injected(merge, model_fn=_meta_model),
        MergeError,
        "meta",
    ),  # fmt: skip
    # -- linalg -----------------------------------------------------------------------------
    Case("svd NaN input", _bad_svd(_nan_matrix(), rank=2), ValueError, "M: .*NaN/Inf"),
    Case(
        "pinv Inf input",
        lambda tmp: Call(lambda: linalg.pinv(_inf_matrix())),
        ValueError,
        "A: .*NaN/Inf",
    ),  # fmt: skip
    Case(
        "randomized svd NaN input",
        lambda tmp: Call(lambda: linalg.randomized_svd(_nan_matrix(), 2, generator=0)),
        ValueError,
        "M: .*NaN/Inf",
    ),  # fmt: skip
    Case(
        "interpolative NaN input",
        lambda tmp: Call(lambda: linalg.interpolative(_nan_matrix(), 2)),
        ValueError,
        "NaN/Inf",
    ),  # fmt: skip
    Case("svd energy=0", _bad_svd(EYE, energy=0.0), ValueError, "energy: .*\\(0, 1\\]"),
    Case("svd energy=1.5", _bad_svd(EYE, energy=1.5), ValueError, "energy: .*1.5"),
    Case("svd energy=NaN", _bad_svd(EYE, energy=NAN), ValueError, "energy"),
    Case("svd tol<0", _bad_svd(EYE, tol=-1.0), ValueError, "tol"),
    Case(
        "interpolative eps=2",
        lambda tmp: Call(lambda: linalg.interpolative(EYE, eps=2.0)),
        ValueError,
        "eps: .*2.0",
    ),  # fmt: skip
    Case(
        "rank_for_energy fraction=2",
        lambda tmp: Call(lambda: linalg.rank_for_energy(torch.tensor([3.0, 2.0, 1.0]), 2.0)),
        ValueError,
        "fraction",
    ),  # fmt: skip
    Case("svd zero-size matrix", _bad_svd(torch.zeros(0, 3), rank=1), ValueError, "non-empty"),
    Case("svd rank > min(shape)", _bad_svd(EYE, rank=9), ValueError, "rank: .*found 9"),
    Case("svd complex dtype", _bad_svd(EYE.to(torch.complex64), rank=1), ValueError, "complex64"),
    Case("svd 3-D input", _bad_svd(torch.zeros(2, 3, 3), rank=1), ValueError, "2-D"),
    Case(
        "lstsq mismatched shapes",
        lambda tmp: Call(lambda: linalg.lstsq_factor(EYE, left=torch.eye(3))),
        ShapeMismatchError,
        "left: expected 4 rows",
    ),  # fmt: skip
    Case(
        "svd on the meta device",
        _bad_svd(torch.empty(4, 4, device="meta"), rank=1),
        ValueError,
        "meta",
    ),  # fmt: skip
]


@pytest.mark.parametrize("case", as_params(CASES))
def test_bad_input(case: Case, tmp_path: Path) -> None:
    check_case(case, tmp_path)


def test_duplicate_targets_adapt_each_module_once() -> None:
    """Duplicates in ``target_modules`` are harmless (PEFT keeps a set): one wrapper each."""
    model = inject(tiny(), LoraConfig(r=2, target_modules=["proj", "proj", "conv"]), generator=0)
    names = [name for name, _ in lora_layers(model)]
    assert names == ["proj", "conv"]
    assert type(model.proj.base_layer) is nn.Linear  # not a wrapper wrapped again
