"""Adapter directories as plain factors: read ``ΔW = s·B A`` per module, write factors back.

The analysis layer works on the *effective* update of each adapted module, so it reads an
adapter directory (PEFT format: ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` ``(r, in)`` / ``.lora_B.weight`` ``(out, r)`` and
``adapter_config.json``) into ``{module: Factors(s·B, A)}``, the scaling ``s`` (``alpha/r`` or
``alpha/√r``, after ``rank_pattern``/``alpha_pattern``) folded into ``B``. Written adapters use
``lora_alpha = r`` per module (``s = 1``), so the stored factors *are* the update; PEFT and
rankwise load them on the base model unchanged. The file format itself is
:mod:`rankwise.io`'s; this module only maps it to and from factors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rankwise.analysis.algebra import Factors
from rankwise.errors import AdapterFormatError
from rankwise.io import adapter_weights_file as weights_file  # also refuses a pickle-only dir
from rankwise.io import read_adapter_config, write_adapter_config
from rankwise.io.adapter import A_KEY as _A
from rankwise.io.adapter import B_KEY as _B
from rankwise.io.adapter import PREFIX, WEIGHTS_NAME
from rankwise.io.adapter_keys import check_aliases, check_values, rename_keys
from rankwise.io.files import (
    made_parents,
    read_header,
    read_tensors,
    replaced_dir,
    write_safetensors,
)
from rankwise.lora.config import LoraConfig
from rankwise.lora.init_svd import to_peft_init

# Fields of a source adapter's config carried over into an adapter derived from it (with the
# tensors they name: modules_to_save, biases, full embedding weights; see read_extras).
_CARRIED = ("task_type", "base_model_name_or_path", "fan_in_fan_out", "modules_to_save", "bias")


def read_config(directory: str | os.PathLike[str]) -> LoraConfig:
    """The :class:`LoraConfig` of an adapter directory (:func:`rankwise.io.read_adapter_config`).

    Refuses AdaLoRA adapters (``lora_E`` between the factors): these functions read plain
    LoRA pairs.
    """
    config = read_adapter_config(directory)
    if config.peft_type != "LORA":
        raise AdapterFormatError(
            f"{directory}: peft_type {config.peft_type}; these operations read plain LoRA "
            "adapters (peft_type LORA)"
        )
    return config


# Initializers that leave the base weight alone (B A = 0 or random factors on top of W0)
BASE_KEEPING_INITS = frozenset({"kaiming", "gaussian", "random", "adalora", "adalora_random"})


def check_rewritable(directory: str | os.PathLike[str], config: LoraConfig) -> None:
    """Refuse to derive a new adapter (resize, combine) from a DoRA one: its magnitude
    vectors depend on the whole product ``W0 + s·B A``, so they cannot follow new factors."""
    if config.use_dora:
        raise AdapterFormatError(
            f"{directory}: a DoRA adapter (use_dora=true); its magnitude vectors depend on the "
            "whole product, so it cannot be resized or combined factor by factor"
        )


def read_extras(directory: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The tensors of an adapter file besides its LoRA factors — ``modules_to_save`` (e.g. a
    trained classifier), biases of ``bias="all"/"lora_only"``, full embedding weights — under
    their file keys, to be carried unchanged into a derived adapter (PEFT's copies of the
    untrained module, ``.original_module.``, left out)."""
    path = weights_file(Path(directory))
    header = read_header(path)
    names, aliases = rename_keys(header, source=path)  # every key a module path under PREFIX
    keys = [k for k in header if not k.endswith((_A, _B)) and ".original_module." not in k]
    extras = read_tensors(path, keys) if keys else {}
    # as load_adapter checks them (there against the model's dtypes): weights and biases are
    # floats, every float finite, and two keys for one tensor agree
    floats = {
        k: v.dtype if v.is_floating_point() else torch.float32
        for k, v in extras.items()
        if k.endswith((".weight", ".bias"))
    }
    check_values(extras, floats, source=path)
    by_name = {name: extras[key] for name, key in names.items() if key in extras}
    check_aliases(by_name, aliases, extras, source=path)
    return extras


def _read_tensors(directory: str | os.PathLike[str]) -> dict[str, Tensor]:
    path = weights_file(Path(directory))
    header = read_header(path)  # validated before any tensor is read
    rename_keys(header, source=path)  # every key a module path under PEFT's prefix
    embedding = [k for k in header if ".lora_embedding_" in k]
    if embedding:
        raise AdapterFormatError(
            f"{path}: embedding adapters ({embedding[0]!r}) are not supported by the analysis "
            "functions; they handle linear (lora_A/lora_B) layers"
        )
    return read_tensors(path, [k for k in header if k.endswith((_A, _B))])


def read_factors(directory: str | os.PathLike[str]) -> dict[str, Factors]:
    """``{module path: Factors(s·B, A)}`` for every LoRA pair in an adapter directory.

    Module paths are as in the base model (the ``base_model.model.`` prefix removed); ``s`` is
    the module's scaling after ``rank_pattern``/``alpha_pattern`` and ``use_rslora``.
    """
    config = read_config(directory)
    if config.initializer not in BASE_KEEPING_INITS:
        raise AdapterFormatError(
            f"{directory}: init_lora_weights={to_peft_init(config.init_lora_weights)!r} moved "
            "s·B0 A0 out of "
            "the base weight, so s·B A is not this adapter's update of the base; save it for "
            "the original base first (rankwise.load_adapter, then save_adapter(model, dir, "
            "for_original_base=True): a plain rank-2r LoRA) and pass that directory"
        )
    tensors = _read_tensors(directory)
    modules = sorted(
        k[len(PREFIX) : -len(_A)] for k in tensors if k.startswith(PREFIX) and k.endswith(_A)
    )
    if not modules:
        raise AdapterFormatError(
            f"{directory}: no '{PREFIX}<module>{_A}' tensors in {WEIGHTS_NAME}"
        )
    orphans = sorted(
        k for k in tensors if k.startswith(PREFIX) and k.endswith(_B)
        and k[len(PREFIX) : -len(_B)] not in set(modules)
    )  # fmt: skip
    if orphans:  # skipped before: the module's update left out of every result
        raise AdapterFormatError(
            f"{directory}: key {orphans[0]!r} has no matching '{_A}' in {WEIGHTS_NAME}"
            f"{f' ({len(orphans)} such keys)' if len(orphans) > 1 else ''}; expected each "
            "module's lora_A and lora_B"
        )
    out: dict[str, Factors] = {}
    for module in modules:
        A = tensors[f"{PREFIX}{module}{_A}"]  # (r, in)
        B = tensors.get(f"{PREFIX}{module}{_B}")  # (out, r)
        for key, factor in ((_A, A), (_B, B)):
            if factor is not None and not factor.is_floating_point():
                raise AdapterFormatError(
                    f"{directory}: key '{PREFIX}{module}{key}' has dtype {factor.dtype}; "
                    "expected a floating-point tensor"
                )
        if A.ndim > 2:
            raise AdapterFormatError(
                f"{directory}: module {module!r} is a convolution adapter (lora_A of shape "
                f"{tuple(A.shape)}); the analysis functions handle linear layers only"
            )
        if B is None or B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            found = None if B is None else tuple(B.shape)
            raise AdapterFormatError(
                f"{directory}: module {module!r} has lora_A {tuple(A.shape)} and lora_B {found}; "
                "expected (r, in) and (out, r)"
            )
        for key, factor in ((_A, A), (_B, B)):
            if not bool(torch.isfinite(factor).all()):
                raise AdapterFormatError(
                    f"{directory}: key '{PREFIX}{module}{key}' holds NaN or inf (a diverged "
                    "run?); expected finite entries"
                )
        r, alpha = config.rank_and_alpha(module)
        if r != A.shape[0]:
            raise AdapterFormatError(
                f"{directory}: module {module!r} has rank {A.shape[0]} in the weights, {r} in the config"
            )
        # s folded in float32 at least, then back to the file's dtype; where s·B does not fit
        # there (float16, r = 1, alpha = 256, |B| ~ 1e3 became inf; PEFT's delta weight, in
        # float32, is finite) both factors stay float32
        sB = config.scaling(r=r, alpha=alpha) * B.to(torch.promote_types(B.dtype, torch.float32))
        narrow = sB.to(B.dtype)
        if bool(torch.isfinite(narrow).all()):
            out[module] = Factors(narrow, A)
        else:
            out[module] = Factors(sB, A.to(sB.dtype))
    return out


def _config_for(factors: Mapping[str, Factors], carried: LoraConfig | None) -> LoraConfig:
    """PEFT config with ``lora_alpha = r`` everywhere (scaling 1) and per-module overrides."""
    ranks = {m: int(f.A.shape[0]) for m, f in factors.items()}
    values = list(ranks.values())
    r = max(set(values), key=values.count)  # the most common rank; others go to rank_pattern
    # PEFT matches a pattern key as a regex against any dotted suffix of a module's name
    # (get_pattern_key): the bare path '1' also set the rank of '0.1'. '^' + the escaped path
    # matches that one module only (the optional prefix group must then be empty)
    pattern = {"^" + re.escape(m): k for m, k in ranks.items() if k != r}
    keep: dict[str, Any] = {}
    if carried is not None:
        keep = {k: getattr(carried, k) for k in _CARRIED if getattr(carried, k) is not None}
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(factors),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        **keep,
    )


def write_factors(
    directory: str | os.PathLike[str],
    factors: Mapping[str, Factors],
    *,
    carried: LoraConfig | None = None,
    extras: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``{module: Factors(B, A)}`` as a PEFT LoRA adapter whose update is ``B A``.

    ``carried`` (a source adapter's config) supplies ``task_type``, ``base_model_name_or_path``,
    ``fan_in_fan_out``, ``modules_to_save`` and ``bias``; ``extras`` (:func:`read_extras`) the
    tensors those name, written under their keys. ``directory`` must be new or empty (another
    adapter there is never overwritten). The directory is written atomically: both files appear together or, on an error, neither
    (nor any parent directory made for it).
    """
    if not factors:
        raise ValueError("factors is empty: nothing to write")
    target = Path(directory)
    if target.is_file() or (target.is_dir() and any(target.iterdir())):
        raise FileExistsError(f"{target}: exists and is not an empty directory; choose a new one")
    tensors: dict[str, Tensor] = {k: v.detach() for k, v in (extras or {}).items()}
    for module, (B, A) in factors.items():
        tensors[f"{PREFIX}{module}{_A}"] = A.detach()
        tensors[f"{PREFIX}{module}{_B}"] = B.detach()
    config = _config_for(factors, carried)
    # both files or neither: written in a temporary directory that becomes ``target``
    with made_parents(target), replaced_dir(target) as tmp:
        write_safetensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        write_adapter_config(tmp, config)
    return target
