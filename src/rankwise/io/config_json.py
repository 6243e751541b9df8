"""``adapter_config.json``: PEFT's LoRA config file, read and written field for field.

Written with every field PEFT 0.21.2 writes (``peft.LoraConfig`` ``to_dict``), the fields
rankwise does not implement at their PEFT defaults, so PEFT — and tools that read PEFT files —
find what they expect. ``inference_mode`` is written as ``true``, as ``save_pretrained`` does.

Read: ``peft_type`` must be ``"LORA"``; fields of features rankwise does not implement
(``lora_bias``, ``layer_replication``, ``target_parameters``, ...) must be at their defaults,
otherwise :class:`AdapterFormatError` names the field; unknown fields (newer PEFT versions) are
ignored, with a warning naming those set to anything but an empty value (a newer feature might
change what the adapter computes).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

from rankwise.errors import AdapterFormatError, ConfigError
from rankwise.io.files import atomic_write_bytes
from rankwise.lora.adalora import AdaLoraConfig
from rankwise.lora.config import LoraConfig
from rankwise.lora.init_svd import from_peft_init, to_peft_init

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "LORA"
# peft_type -> config class (AdaLoRA: PEFT's "ADALORA" format, rank_pattern = kept triplets)
CONFIG_CLASSES: dict[str, type[LoraConfig]] = {"LORA": LoraConfig, "ADALORA": AdaLoraConfig}
# rankwise-only training flags: not written (PEFT does not know them), defaults on reading
_LOCAL_ONLY = ("use_lora_fa",)

# Fields PEFT 0.21.2 writes for features rankwise does not (yet) implement, at their defaults.
PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "auto_mapping": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "loftq_config": {},
    "lora_bias": False,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "monteclora_config": None,
    "qalora_group_size": 16,
    "revision": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}
# Fields whose value does not change how the adapter computes (any value accepted on read).
# lora_ga_config only steers an initialization from gradients and eva_config one from
# activations (EVA: A from their SVD, B = 0, the base untouched; the ranks and alphas it
# chose are in rank_pattern/alpha_pattern), which loading never redoes
_INERT = {
    "auto_mapping",
    "revision",
    "megatron_core",
    "qalora_group_size",
    "lora_ga_config",
    "eva_config",
}


# Written by PEFT beside the config's fields, not read as fields
_KNOWN = {"peft_type", "peft_version", "runtime_config"}  # runtime_config: older PEFT's,
# runtime-only (ephemeral GPU offload), nothing the adapter computes
_EMPTY: tuple[Any, ...] = (None, False, "", [], {})


def config_to_json(
    config: LoraConfig, *, auto_mapping: dict[str, str] | None = None
) -> dict[str, Any]:
    """The JSON object PEFT writes for ``config`` (keys sorted as PEFT's ``save_pretrained``).

    ``auto_mapping`` (PEFT writes it when ``task_type`` is None): the base model's class name
    and module, ``{"base_model_class": ..., "parent_library": ...}``.
    """
    data = {**PEFT_DEFAULTS, **config.to_dict(), "auto_mapping": auto_mapping}
    for key in _LOCAL_ONLY:
        data.pop(key, None)
    init = data["init_lora_weights"]
    data["init_lora_weights"] = to_peft_init({"kaiming": True, "random": False}.get(init, init))
    if isinstance(config, AdaLoraConfig) and not config.rank_pattern:
        data["rank_pattern"] = None  # PEFT's AdaLoRA default
    data["inference_mode"] = True
    data["peft_type"] = config.peft_type
    return dict(sorted(data.items()))


def config_from_json(data: Any, *, source: str) -> LoraConfig:
    """A :class:`LoraConfig` from a parsed ``adapter_config.json``; AdapterFormatError if not LoRA."""
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{source}: expected a JSON object, found {type(data).__name__}")
    peft_type = data.get("peft_type")
    cls = CONFIG_CLASSES.get(peft_type) if isinstance(peft_type, str) else None
    if cls is None:
        raise AdapterFormatError(
            f"{source}: peft_type is {peft_type!r}; rankwise reads {sorted(CONFIG_CLASSES)} adapters"
        )
    for key, default in PEFT_DEFAULTS.items():
        if key in _INERT or key not in data:
            continue
        value = data[key]
        if value != default and not (default in (None, False, {}) and not value):
            raise AdapterFormatError(
                f"{source}: {key}={value!r} is a PEFT feature rankwise does not implement "
                f"(expected {default!r})"
            )
    names = {f.name for f in dataclasses.fields(cls)}  # ClassVars (peft_type) excluded
    unknown = sorted(
        k
        for k, v in data.items()
        if k not in names and k not in PEFT_DEFAULTS and k not in _KNOWN and v not in _EMPTY
    )
    if unknown:
        warnings.warn(
            f"{source}: ignoring field(s) {', '.join(unknown)} that rankwise does not know "
            f"(written by peft {data.get('peft_version', '?')}); if they change what the "
            "adapter computes, the loaded adapter will differ from PEFT's",
            stacklevel=3,
        )
    fields = {k: v for k, v in data.items() if k in names}
    if "init_lora_weights" in fields:
        fields["init_lora_weights"] = from_peft_init(fields["init_lora_weights"])
        if cls is AdaLoraConfig and fields["init_lora_weights"] not in (True, False):
            # PEFT's AdaLoRA reads any true value as its own init (the base is never moved)
            fields["init_lora_weights"] = bool(data["init_lora_weights"])
    if cls is AdaLoraConfig:
        # options PEFT's AdaLoRA accepts and ignores (its scale is always alpha / init_r):
        # dropped with a warning (AdaLoraConfig refuses them when built)
        ignored = {k: fields.pop(k) for k in ("use_rslora", "alpha_pattern") if fields.get(k)}
        if ignored:
            warnings.warn(
                f"{source}: AdaLoRA ignores {', '.join(f'{k}={v!r}' for k, v in ignored.items())} "
                "(as PEFT does: the scale is lora_alpha / init_r); dropped",
                RuntimeWarning,
                stacklevel=3,
            )
    if fields.get("rank_pattern", {}) is None:
        del fields["rank_pattern"]
    if isinstance(fields.get("target_modules"), (list, tuple)):
        fields["target_modules"] = sorted(fields["target_modules"], key=str)
    if fields.get("target_modules") is None:  # named here, not by the injection's error
        raise AdapterFormatError(
            f"{source}: target_modules is missing or null; expected the adapted modules (a "
            "list of names, a regex or 'all-linear')"
        )
    try:
        return cls(**fields)
    except (ConfigError, TypeError) as err:
        raise AdapterFormatError(f"{source}: invalid LoRA config ({err})") from None


def write_adapter_config(
    directory: Path, config: LoraConfig, *, auto_mapping: dict[str, str] | None = None
) -> None:
    """Write ``directory/adapter_config.json`` atomically."""
    data = config_to_json(config, auto_mapping=auto_mapping)
    text = json.dumps(_sorted_keys(data), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(Path(directory) / CONFIG_NAME, text.encode("utf-8"))


# The first matching key of a pattern wins (PEFT's get_pattern_key): their order is meaning.
_ORDERED = ("rank_pattern", "alpha_pattern")


def _sorted_keys(value: Any, key: str | None = None) -> Any:
    """``value`` with its mappings' keys sorted (a stable file), except the patterns': sorting
    ``{"query": 3, "layer\\.0\\..*query": 30}`` would hand layer 0 the other value on reading."""
    if not isinstance(value, dict):
        return value
    items = value.items() if key in _ORDERED else sorted(value.items())
    return {k: _sorted_keys(v, k) for k, v in items}


def read_adapter_config(directory: str | Path) -> LoraConfig:
    """The :class:`LoraConfig` in ``directory/adapter_config.json`` (written by rankwise or PEFT)."""
    path = Path(directory) / CONFIG_NAME
    if Path(directory).is_file():  # the weights file itself, say
        raise AdapterFormatError(
            f"{directory}: not an adapter directory: expected a directory holding {CONFIG_NAME}, "
            "found a file"
            + (f"; give its directory {str(Path(directory).parent)!r}" if path.parent.name else "")
        )
    if not path.is_file():
        raise AdapterFormatError(f"{directory}: no {CONFIG_NAME} (not an adapter directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise AdapterFormatError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:  # the parser's own limit (a crafted file of nested arrays)
        raise AdapterFormatError(f"{path}: not valid JSON (nested too deeply)") from None
    return config_from_json(data, source=str(path))


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} is not allowed")
