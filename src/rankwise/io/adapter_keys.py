"""An adapter file's keys and values, and the checks a load runs before it writes anything.

The file names and key layout of PEFT's format (``base_model.model.<module path>.<tensor>``),
the mapping of PEFT's extra key spellings to the model's state names (:func:`rename_keys`),
and the refusals :func:`~rankwise.io.adapter.load_adapter` makes before touching the model:
keys and shapes (:func:`check_keys`), duplicate keys that disagree (:func:`check_aliases`),
integer or non-finite values (:func:`check_values`, after the cast to the dtype each value
will have), and a model on the meta device (:func:`check_materialized`). :func:`copy_in` is
the one write, run only once every check has passed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from rankwise.errors import AdapterFormatError, ShapeMismatchError
from rankwise.lora.config import LoraConfig
from rankwise.lora.layers import adapter_dtype
from rankwise.lora.targets import Plan

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# a linear / convolution factor pair's file keys: <PREFIX><module><A_KEY>, <PREFIX><module><B_KEY>
A_KEY, B_KEY = ".lora_A.weight", ".lora_B.weight"


def rename_keys(header: dict, *, source: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """In-memory name -> file key; PEFT's ``modules_to_save``/``original_module`` copies mapped.

    Also returns name -> further keys holding the same name (checked equal once read)."""
    out: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}
    for key in header:
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{source}: key {key!r} does not start with {PREFIX!r}")
        name = key[len(PREFIX) :]
        if "" in name.split("."):  # torch refuses empty module names: '..', a leading '.'
            raise AdapterFormatError(
                f"{source}: key {key!r} is not a module path (an empty name between dots)"
            )
        if ".original_module." in name:
            continue  # PEFT's copy of the untrained module (bias="all"); the base holds it
        owner, sep, rest = name.partition(".modules_to_save.")
        if sep:
            # PEFT strips the adapter name only just before the last part: a leaf module's
            # copy is ``m.modules_to_save.bias``, a module with children keeps it,
            # ``m.modules_to_save.<adapter>.dense.bias`` (bias="all" writes such keys)
            parts = rest.split(".")
            name = ".".join([owner, *(parts[1:] if len(parts) > 1 else parts)])
        if name.endswith(".lora_magnitude_vector.weight"):
            # PEFT's save_embedding_layers also writes a DoRA embedding's magnitude under its
            # module key (``….lora_magnitude_vector.weight``) beside the usual one
            name = name.removesuffix(".weight")
        if name in out:
            aliases.setdefault(name, []).append(key)
        else:
            out[name] = key
    return out, aliases


def check_aliases(
    values: dict[str, Tensor],
    aliases: dict[str, list[str]],
    tensors: dict[str, Tensor],
    *,
    source: Path,
) -> None:
    """Two keys for one tensor (PEFT's bias="all" with modules_to_save writes ``m.bias`` and
    ``m.modules_to_save.bias``; its save_embedding_layers a DoRA embedding's magnitude twice)
    must hold the same value."""
    for name, keys in aliases.items():
        for key in keys:
            if not torch.equal(tensors[key], values[name]):
                raise AdapterFormatError(
                    f"{source}: keys {PREFIX + name!r} and {key!r} both hold {name!r} but "
                    "their values differ; expected one value"
                )


def rank_pattern_hint(config: LoraConfig) -> str:
    """Why a rank from ``rank_pattern`` may not fit the file: PEFT (0.21) writes its config
    with ``sort_keys=True``, so patterns that overlap can match in another order when read
    back (the first match wins) and PEFT itself refuses the file with a size mismatch."""
    if len(config.rank_pattern or {}) < 2:
        return ""
    return (
        " (the config's rank_pattern holds several patterns, matched in the file's order; "
        "PEFT saves them with the keys sorted, which can change which one a module matches "
        "first: PEFT refuses such a file too)"
    )


def _rank_differs(key: str, expected: tuple[int, ...], found: tuple[int, ...]) -> bool:
    """Whether a factor's shapes differ in its rank dimension only (lora_A's first, lora_B's
    second, as lora_embedding_A's and _B's): what a rank_pattern matched otherwise gives."""
    expected, found = tuple(expected), tuple(found)
    if len(expected) != len(found) or len(expected) < 2 or ".lora_" not in key:
        return False
    a_side = ".lora_A." in key or ".lora_embedding_A" in key  # rank first (r, ...)
    b_side = ".lora_B." in key or ".lora_embedding_B" in key  # rank second (out, r, ...)
    dim = 0 if a_side else 1 if b_side else None
    if dim is None:
        return False
    others = [i for i in range(len(expected)) if i != dim]
    return expected[dim] != found[dim] and all(expected[i] == found[i] for i in others)


def check_keys(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    *,
    source: Path,
    hint: str = "",
) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise AdapterFormatError(
            f"{source}: keys do not fit the model: missing {few(missing)}, unexpected {few(extra)}"
        )
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            module = key.split(".lora_")[0] if ".lora_" in key else key.rsplit(".", 1)[0]
            module = module.removesuffix(".base_layer")
            raise ShapeMismatchError(
                f"{source}: module {module!r}, key {key!r}: expected shape {tuple(shape)}, "
                f"found {tuple(found[key])}"
                + (hint if _rank_differs(key, shape, found[key]) else "")
            )


def few(keys: list[str]) -> str:
    return "none" if not keys else f"{keys[:4]}{' …' if len(keys) > 4 else ''} ({len(keys)})"


def check_materialized(model: nn.Module) -> None:
    """Refuse a model with meta-device tensors: ``copy_`` into them drops every value."""
    for kind, named in (("parameter", model.named_parameters), ("buffer", model.named_buffers)):
        for key, t in named():
            if t.is_meta:
                module = key.rpartition(".")[0] or "<root>"
                raise AdapterFormatError(
                    f"load_adapter: module {module!r} has {kind} {key!r} on the meta device "
                    "(shape only, no storage); expected a materialized model so the adapter's "
                    "values can be written: load the model's weights first (for a model "
                    "offloaded by accelerate, load the adapter before offloading it)"
                )


def target_dtypes(
    model: nn.Module, plan: Plan | None, values: dict[str, Tensor]
) -> dict[str, torch.dtype]:
    """Key -> dtype the value will have in the model (what ``_copy_in`` casts it to).

    Existing tensors keep their dtype; LoRA tensors a ``plan`` will create get
    :func:`adapter_dtype` of their base weight (float32 for fp16/bf16 bases).
    """
    live = model.state_dict(keep_vars=True)
    modules = dict(model.named_modules())
    targets = [t.name for t in plan.targets] if plan is not None else []
    out: dict[str, torch.dtype] = {}
    for key in values:
        if key in live:
            out[key] = live[key].dtype
        elif key.replace(".base_layer.", ".") in live:
            out[key] = live[key.replace(".base_layer.", ".")].dtype
        else:
            owner = max((n for n in targets if key.startswith(n + ".")), key=len, default=None)
            weight = getattr(modules.get(owner), "weight", None) if owner is not None else None
            if isinstance(weight, Tensor):
                out[key] = adapter_dtype(weight.dtype)
    return out


def check_values(
    values: dict[str, Tensor], dtypes: dict[str, torch.dtype], *, source: Path
) -> None:
    """Float tensors where the model holds floats (LoRA factors, a float modules_to_save
    weight: an integer value would be silently cast), and every value finite *after* the cast
    to its live dtype (float64 values beyond float32's range would otherwise load as inf)."""
    for key, value in values.items():
        wants_float = ".lora_" in key or (key in dtypes and dtypes[key].is_floating_point)
        if wants_float and not value.is_floating_point():
            raise AdapterFormatError(
                f"{source}: tensor {key!r} has dtype {value.dtype}, expected a float"
            )
        if not value.is_floating_point():
            continue
        dtype = dtypes.get(key, value.dtype)
        if not _all_finite(value, dtype if dtype.is_floating_point else value.dtype):
            where = "" if dtype == value.dtype else f" once cast from {value.dtype} to {dtype}"
            raise AdapterFormatError(f"{source}: tensor {key!r} holds inf or nan{where}")


def _all_finite(value: Tensor, dtype: torch.dtype, block: int = 1 << 22) -> bool:
    """Every entry of ``value`` finite once cast to ``dtype``, checked in blocks of ``block``
    entries: the values read from the file are memory-mapped, and a whole-tensor cast and
    test (a 131 MB embedding: +312 MB at peak) cost more than the tensor itself."""
    for part in value.reshape(-1).split(block):
        if not bool(torch.isfinite(part.to(dtype)).all()):
            return False
    return True


def copy_in(model: nn.Module, values: dict[str, Tensor]) -> None:
    live = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in values.items():
            live[key].copy_(value.to(dtype=live[key].dtype))
