"""LoRA+: a larger learning rate for ``B`` than for ``A`` (a training hook, one variant axis).

Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", §3–4: in the
infinite-width limit LoRA learns features efficiently only if ``η_B = λ · η_A`` with ``λ ≫ 1``
(Theorem 1; ``λ = 2^4 = 16`` is the paper's recommended default). The grouping follows the
reference code (github.com/nikhil-ghosh-berkeley/loraplus) and PEFT 0.21.2
``create_loraplus_optimizer`` exactly:

======================================  ==================  =====================
parameter                               learning rate       weight decay
======================================  ==================  =====================
adapters of an embedding layer (A, B)   ``embedding_lr``    ``weight_decay``
``lora_B`` and every other 1-D param    ``lr · ratio``      ``weight_decay``, but
(biases, norms, DoRA's magnitude)                           0 for biases / LayerNorm
everything else trainable (``lora_A``,  ``lr``              ``weight_decay``
``modules_to_save`` matrices)
======================================  ==================  =====================

Embedding adapters get their own small rate (default ``1e-6``, as the reference) because a
one-hot input makes the paper's width argument inapplicable there. Frozen parameters are left
out. The groups work with any ``torch.optim.Optimizer``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rankwise.lora.embedding import LoraEmbedding

DEFAULT_RATIO = 16.0
DEFAULT_EMBEDDING_LR = 1e-6


def _positive(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name}: expected a finite positive number, found {value!r}")
    return float(value)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters exempt from weight decay: biases and LayerNorm parameters (as PEFT)."""
    out = set()
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(module, nn.LayerNorm) or "bias" in full:
                out.add(full)
    return out


def _embedding_adapter_names(model: nn.Module) -> set[str]:
    out = set()
    for mname, module in model.named_modules():
        if isinstance(module, LoraEmbedding):
            for pname, _ in module.named_parameters():
                # the embedding factors only (PEFT: a DoRA magnitude is a group-B tensor)
                if pname.startswith(("lora_embedding_A", "lora_embedding_B")):
                    out.add(f"{mname}.{pname}" if mname else pname)
    return out


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    *,
    ratio: float = DEFAULT_RATIO,
    weight_decay: float = 0.0,
    embedding_lr: float = DEFAULT_EMBEDDING_LR,
) -> list[dict[str, Any]]:
    """Parameter groups for any torch optimizer: ``B`` at ``lr · ratio``, ``A`` at ``lr``.

    Returns non-empty groups (each a dict with ``params``, ``lr``, ``weight_decay`` and a
    ``name``: ``"A"``, ``"embedding"``, ``"B"``, ``"B_no_decay"``), see the module docstring.
    """
    lr = _positive("lr", lr)
    ratio = _positive("ratio", ratio)
    embedding_lr = _positive("embedding_lr", embedding_lr)
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or not (math.isfinite(weight_decay) and weight_decay >= 0)
    ):
        raise ValueError(f"weight_decay: expected a finite number >= 0, found {weight_decay!r}")
    no_decay = _no_decay_names(model)
    embedding = _embedding_adapter_names(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in embedding:
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    settings = {
        "A": (lr, weight_decay),
        "embedding": (embedding_lr, weight_decay),
        "B": (lr * ratio, weight_decay),
        "B_no_decay": (lr * ratio, 0.0),
    }
    return [
        {
            "params": params,
            "lr": settings[key][0],
            "weight_decay": float(settings[key][1]),
            "name": key,
        }
        for key, params in groups.items()
        if params
    ]


# PEFT's keyword names (peft.optimizers.create_loraplus_optimizer) -> ours
_PEFT_NAMES = {
    "loraplus_lr_ratio": "ratio",
    "loraplus_weight_decay": "weight_decay",
    "loraplus_lr_embedding": "embedding_lr",
}


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    *,
    ratio: float | None = None,
    weight_decay: float | None = None,
    embedding_lr: float | None = None,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    **peft_kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_cls`` over :func:`loraplus_param_groups` (``optimizer_kwargs`` passed on,
    e.g. ``{"betas": (0.9, 0.999)}``; defaults: ``ratio`` 16, ``weight_decay`` 0,
    ``embedding_lr`` 1e-6). Raises ValueError if nothing is trainable.

    PEFT's call works as it is: ``loraplus_lr_ratio``, ``loraplus_weight_decay`` and
    ``loraplus_lr_embedding`` are ``ratio``, ``weight_decay`` and ``embedding_lr``, and any
    other keyword goes to the optimizer (as ``optimizer_kwargs``). One difference: a
    ``weight_decay=`` alone is the groups' decay here, where PEFT hands it to the optimizer as
    a default that its groups then override (no decay at all); beside
    ``loraplus_weight_decay=`` it is overridden, as in PEFT (with a warning)."""
    ours: dict[str, Any] = {
        "ratio": ratio,
        "weight_decay": weight_decay,
        "embedding_lr": embedding_lr,
    }
    for peft_name, name in _PEFT_NAMES.items():
        if peft_name not in peft_kwargs:
            continue
        value = peft_kwargs.pop(peft_name)
        if ours[name] is not None and name == "weight_decay":  # PEFT's groups override it
            warnings.warn(
                f"create_loraplus_optimizer: weight_decay={ours[name]!r} is overridden by "
                f"{peft_name}={value!r}, as in PEFT (each group sets its own decay)",
                RuntimeWarning,
                stacklevel=2,
            )
        elif ours[name] is not None:
            raise TypeError(
                f"create_loraplus_optimizer: {name}= and {peft_name}= (PEFT's name for it) "
                "are both given"
            )
        ours[name] = value
    kwargs = dict(optimizer_kwargs or {})
    both = sorted(set(kwargs) & set(peft_kwargs))
    if both:
        raise TypeError(
            f"create_loraplus_optimizer: {both[0]!r} is given both as a keyword and in "
            "optimizer_kwargs"
        )
    kwargs.update(peft_kwargs)
    groups = loraplus_param_groups(model, lr, **{k: v for k, v in ours.items() if v is not None})
    if not groups:
        raise ValueError(
            f"model: {type(model).__name__} has no trainable parameters; inject adapters first"
        )
    for reserved in ("lr", "params"):
        if reserved in kwargs:
            raise ValueError(
                f"create_loraplus_optimizer: the optimizer keyword {reserved!r} is set by "
                "create_loraplus_optimizer itself (each group's); drop it"
            )
    if "weight_decay" in kwargs:  # every group sets its own: the optimizer default is never read
        raise ValueError(
            f"optimizer_kwargs: 'weight_decay' ({kwargs['weight_decay']!r}) would be ignored, "
            "each parameter group sets its own; pass weight_decay= to create_loraplus_optimizer"
        )
    return optimizer_cls(groups, lr=groups[0]["lr"], **kwargs)
