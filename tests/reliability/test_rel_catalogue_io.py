"""Bad adapter directories and files for ``rankwise.io`` and ``rankwise.analysis`` (catalogue
part 2): wrong dtypes, hostile safetensors headers, config JSON of wrong types, an adapter for
another model, escaping names, pickles. Same contract as part 1 (see rel_kit.check_case).
"""

from __future__ import annotations

import json
import resource
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rel_kit import (
    Call,
    Case,
    as_params,
    check_case,
    mlp,
    tiny,
    tree_digest,
)
from safetensors.torch import load_file, save_file
from torch import nn

from rankwise.analysis import combine_adapters, resize_adapter
from rankwise.errors import AdapterFormatError, InjectionError, MergeError, ShapeMismatchError
from rankwise.io import load_adapter, read_adapter_config, save_adapter
from rankwise.lora import LoraConfig, inject, merge

CFG = LoraConfig(
    r=2,
    lora_alpha=4,
    target_modules=["emb", "proj", "conv"],
    modules_to_save=["head"],
    init_lora_weights=False,
)
MLP_CFG = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
KEY = "base_model.model.proj.lora_A.weight"


def good_adapter(directory: Path, *, cfg: LoraConfig = CFG, model_fn=tiny) -> Path:
    return save_adapter(inject(model_fn(), cfg, generator=0), directory)


def edit_config(directory: Path, **changes: object) -> None:
    data = json.loads((directory / CONFIG).read_text())
    data.update(changes)
    (directory / CONFIG).write_text(json.dumps(data))


def edit_weights(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})


def edit_header(
    directory: Path, edit: Callable[[dict], None], *, length: int | None = None
) -> None:
    """Rewrite the safetensors JSON header (``edit`` gets the parsed dict), data bytes kept."""
    raw = (directory / WEIGHTS).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    prefix = struct.pack("<Q", len(text) if length is None else length)
    (directory / WEIGHTS).write_bytes(prefix + text + raw[8 + n :])


def _first_tensor(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def _load(mutate: Callable[[Path], None], model_fn=tiny, *, cfg: LoraConfig = CFG):
    """Build a good adapter, ``mutate`` its directory, then ``load_adapter`` into a fresh model."""

    def build(tmp: Path) -> Call:
        directory = good_adapter(tmp / "adapter", cfg=cfg, model_fn=model_fn)
        mutate(directory)
        model = model_fn()
        return Call(lambda: load_adapter(model, directory), (model,))

    return build


def _config_only(mutate: Callable[[Path], None]):
    def build(tmp: Path) -> Call:
        directory = good_adapter(tmp / "adapter")
        mutate(directory)
        return Call(lambda: read_adapter_config(directory))

    return build


def _load_other(source_fn, target_fn, cfg: LoraConfig):
    def build(tmp: Path) -> Call:
        directory = good_adapter(tmp / "adapter", cfg=cfg, model_fn=source_fn)
        model = target_fn()
        return Call(lambda: load_adapter(model, directory), (model,))

    return build


def _huge_r_fast(directory: Path, model: nn.Module) -> None:
    """Loading a config with r = 2**40 is refused before any allocation: fast, no RSS growth."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    try:
        load_adapter(model, directory)
    finally:
        assert time.perf_counter() - start < 5.0
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100_000


def _huge_r(tmp: Path) -> Call:
    directory = good_adapter(tmp / "adapter")
    edit_config(directory, r=2**40)
    model = tiny()
    return Call(lambda: _huge_r_fast(directory, model), (model,))


def _only_pickle(directory: Path) -> None:
    (directory / WEIGHTS).rename(directory / "adapter_model.bin")


def _into_merged(tmp: Path) -> Call:
    directory = good_adapter(tmp / "adapter")
    model = merge(inject(tiny(), CFG, generator=1))
    return Call(lambda: load_adapter(model, directory), (model,))


def _into_meta(tmp: Path) -> Call:
    directory = good_adapter(tmp / "adapter")
    with torch.device("meta"):
        model = tiny()
    return Call(lambda: load_adapter(model, directory), (model,))


def _analysis(action: Callable[[Path, Path], object], mutate: Callable[[Path], None] = str):
    """Build a good plain-linear adapter, mutate it, then run an analysis ``action(src, out)``."""

    def build(tmp: Path) -> Call:
        directory = good_adapter(tmp / "adapter", cfg=MLP_CFG, model_fn=mlp)
        mutate(directory)
        return Call(lambda: action(directory, tmp / "out"))

    return build


def _to(dtype: torch.dtype, scale: float = 1.0):
    return lambda t: t.update({k: (v.double() * scale).to(dtype) for k, v in t.items()})


CASES: list[Case] = [
    # -- the weights file -------------------------------------------------------------------
    Case("only a .bin pickle", _load(_only_pickle), AdapterFormatError, "never unpickles"),
    Case(
        "no weights file",
        _load(lambda d: (d / WEIGHTS).unlink()),
        AdapterFormatError,
        "no adapter_model.safetensors",
    ),  # fmt: skip
    Case(
        "empty weights file",
        _load(lambda d: (d / WEIGHTS).write_bytes(b"")),
        AdapterFormatError,
        "safetensors",
    ),  # fmt: skip
    Case(
        "header claims a huge tensor",
        _load(lambda d: edit_header(d, lambda h: _first_tensor(h).update(shape=[2**31, 2**31]))),
        AdapterFormatError,
        "not a valid safetensors file",
    ),  # fmt: skip
    Case(
        "header length of 2**62 bytes",
        _load(lambda d: edit_header(d, str, length=2**62)),
        AdapterFormatError,
        "header too large",
    ),  # fmt: skip
    Case(
        "data offsets past the end",
        _load(lambda d: edit_header(d, lambda h: _first_tensor(h).update(data_offsets=[0, 2**40]))),
        AdapterFormatError,
        "not a valid safetensors file",
    ),  # fmt: skip
    Case(
        "unknown dtype in header",
        _load(lambda d: edit_header(d, lambda h: _first_tensor(h).update(dtype="Q7"))),
        AdapterFormatError,
        "safetensors",
    ),  # fmt: skip
    Case(
        "integer weights",
        _load(lambda d: edit_weights(d, _to(torch.int64))),
        AdapterFormatError,
        "int64",
    ),  # fmt: skip
    Case(
        "float64 values that overflow float32",
        _load(lambda d: edit_weights(d, _to(torch.float64, 1e300))),
        AdapterFormatError,
        "inf",
    ),  # fmt: skip
    Case(
        "NaN weights",
        _load(lambda d: edit_weights(d, lambda t: t[KEY].fill_(float("nan")))),
        AdapterFormatError,
        "proj.lora_A.weight.*inf or nan",
    ),  # fmt: skip
    Case(
        "zero-size tensor",
        _load(lambda d: edit_weights(d, lambda t: t.update({KEY: torch.zeros(0, 6)}))),
        ShapeMismatchError,
        "found \\(0, 6\\)",
    ),  # fmt: skip
    Case(
        "key escaping with ../",
        _load(
            lambda d: edit_weights(
                d,
                lambda t: t.update(
                    {"base_model.model.../../evil.lora_A.weight": torch.zeros(2, 6)}
                ),
            )
        ),
        AdapterFormatError,
        "key 'base_model\\.model\\.\\.\\./\\.\\./evil.* is not a module path",
    ),  # fmt: skip
    Case(
        "absolute key",
        _load(lambda d: edit_weights(d, lambda t: t.update({"/etc/passwd": torch.zeros(1)}))),
        AdapterFormatError,
        "/etc/passwd",
    ),  # fmt: skip
    # -- adapter_config.json ----------------------------------------------------------------
    Case(
        "config r is a string",
        _load(lambda d: edit_config(d, r="2")),
        AdapterFormatError,
        "r: expected a positive int, found '2'",
    ),  # fmt: skip
    Case(
        "config alpha is a list",
        _load(lambda d: edit_config(d, lora_alpha=[4])),
        AdapterFormatError,
        "lora_alpha",
    ),  # fmt: skip
    Case(
        "config target_modules is an int",
        _load(lambda d: edit_config(d, target_modules=3)),
        AdapterFormatError,
        "target_modules",
    ),  # fmt: skip
    Case(
        "config bias is a bool",
        _load(lambda d: edit_config(d, bias=True)),
        AdapterFormatError,
        "bias",
    ),  # fmt: skip
    Case(
        "config use_rslora is a string",
        _load(lambda d: edit_config(d, use_rslora="yes")),
        AdapterFormatError,
        "use_rslora",
    ),  # fmt: skip
    Case(
        "config rank_pattern is a list",
        _load(lambda d: edit_config(d, rank_pattern=[1, 2])),
        AdapterFormatError,
        "invalid LoRA config",
    ),  # fmt: skip
    Case(
        "config rank_pattern is a string",
        _load(lambda d: edit_config(d, rank_pattern="0")),
        AdapterFormatError,
        "rank_pattern",
    ),
    Case(
        "config target_modules holds nulls",
        _load(lambda d: edit_config(d, target_modules=[None, None])),
        AdapterFormatError,
        "target_modules",
    ),
    Case(
        "config unimplemented PEFT field",
        _load(lambda d: edit_config(d, use_dora=True)),
        AdapterFormatError,
        "use_dora",
    ),  # fmt: skip
    Case(
        "config of another PEFT type",
        _load(lambda d: edit_config(d, peft_type="PREFIX_TUNING")),
        AdapterFormatError,
        "PREFIX_TUNING",
    ),  # fmt: skip
    Case(
        "config is a JSON array",
        _config_only(lambda d: (d / CONFIG).write_text("[1, 2]")),
        AdapterFormatError,
        "expected a JSON object, found list",
    ),  # fmt: skip
    Case(
        "config is not UTF-8",
        _config_only(lambda d: (d / CONFIG).write_bytes(b"\xff\xfe{")),
        AdapterFormatError,
        "not valid JSON",
    ),  # fmt: skip
    Case(
        "config with Infinity",
        _config_only(
            lambda d: (d / CONFIG).write_text(
                (d / CONFIG).read_text().replace('"lora_alpha": 4', '"lora_alpha": Infinity')
            )
        ),
        AdapterFormatError,
        "Infinity",
    ),  # fmt: skip
    Case(
        "config with huge r, refused before allocation",
        _huge_r,
        ShapeMismatchError,
        "expected shape \\(1099511627776",
    ),  # fmt: skip
    Case(
        "directory is a file",
        lambda tmp: (lambda f: Call(lambda: read_adapter_config(f)))(
            good_adapter(tmp / "a") / CONFIG
        ),
        AdapterFormatError,
        "not an adapter directory",
    ),
    # -- the adapter does not belong to this model ------------------------------------------
    Case(
        "adapter for another architecture",
        _load_other(mlp, tiny, MLP_CFG),
        InjectionError,
        r"target_modules: \['0', '2'\] matched no module",
    ),  # fmt: skip
    Case(
        "adapter for another width",
        _load_other(lambda: mlp(dims=(8, 6, 4)), lambda: mlp(dims=(16, 6, 4)), MLP_CFG),
        ShapeMismatchError,
        "module '0'.*expected shape \\(2, 16\\), found \\(2, 8\\)",
    ),  # fmt: skip
    Case("load into a merged model", _into_merged, MergeError, "merged; unmerge"),
    Case(
        "load into a meta-device model",
        _into_meta,
        (AdapterFormatError, ValueError),
        "meta",
    ),  # fmt: skip
    # -- analysis over adapter files --------------------------------------------------------
    Case(
        "resize an integer adapter",
        _analysis(
            lambda s, o: resize_adapter(s, o, 1), lambda d: edit_weights(d, _to(torch.int64))
        ),
        AdapterFormatError,
        "int64",
    ),  # fmt: skip
    Case(
        "resize a .bin-only adapter",
        _analysis(lambda s, o: resize_adapter(s, o, 1), _only_pickle),
        AdapterFormatError,
        "pickle",
    ),  # fmt: skip
    Case(
        "resize energy out of range",
        _analysis(lambda s, o: resize_adapter(s, o, energy=1.5)),
        ValueError,
        "energy.*1.5",
    ),  # fmt: skip
    Case(
        "combine weights of the wrong length",
        _analysis(lambda s, o: combine_adapters([s, s], o, [1.0])),
        ValueError,
        "weights has 1",
    ),  # fmt: skip
    Case(
        "combine with density 2",
        _analysis(lambda s, o: combine_adapters([s, s], o, method="ties", density=2.0)),
        ValueError,
        "density",
    ),  # fmt: skip
]


def test_catalogue_has_forty_cases_in_all() -> None:
    from test_rel_catalogue_cli import CASES as CLI
    from test_rel_catalogue_lora import CASES as LORA

    assert len(CASES) + len(LORA) + len(CLI) >= 40


@pytest.mark.parametrize("case", as_params(CASES))
def test_bad_input(case: Case, tmp_path: Path) -> None:
    check_case(case, tmp_path)


def test_unknown_fields_are_ignored_for_newer_peft(tmp_path: Path) -> None:
    """Documented behaviour: unknown (future PEFT) fields are ignored, the adapter loads as is."""
    directory = good_adapter(tmp_path / "a")
    edit_config(directory, some_future_peft_field={"x": 1})
    reference = load_adapter(tiny(), good_adapter(tmp_path / "b"))
    loaded = load_adapter(tiny(), directory)
    ref, got = reference.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_loading_never_writes_into_the_adapter_directory(tmp_path: Path) -> None:
    directory = good_adapter(tmp_path / "a")
    before = tree_digest(tmp_path)
    load_adapter(tiny(), directory)
    read_adapter_config(directory)
    assert tree_digest(tmp_path) == before
