"""Fine-tuning methods: what trains. ``full`` (every parameter, the baseline), ``lora`` and the
variants that are a change of :class:`rankwise.lora.LoraConfig` alone.

``lora`` injects adapters ``h = W0 x + (alpha / r) B A x`` (Hu et al. 2021) into the modules
named by ``--targets`` with :func:`rankwise.lora.inject`; for classification the task type is
``SEQ_CLS``, so the classifier head is trained in full and saved beside the adapter
(``modules_to_save``, as PEFT does). ``dora`` (``use_dora``), ``pissa`` (exact SVD, so the
residual base is rebuilt identically wherever the adapter is loaded), ``olora`` and ``lora-fa``
(A frozen) are config fields (:data:`VARIANT_FIELDS`). Methods that need a hook in the loop
(``lora-ga``: a gradient pass; ``adalora``: a rank allocator; ``loraplus``: parameter groups)
are refused with a clear error rather than approximated.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from rankwise.errors import ConfigError
from rankwise.train.config import TrainConfig

# Method -> the LoraConfig fields that make it (every other field as for plain LoRA).
VARIANT_FIELDS: dict[str, dict[str, Any]] = {
    "lora": {},
    "dora": {"use_dora": True},
    "pissa": {"init_lora_weights": "pissa_exact"},
    "olora": {"init_lora_weights": "olora"},
    "lora-fa": {"use_lora_fa": True},
}
AVAILABLE = (*VARIANT_FIELDS, "full")
TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


class Prepared(NamedTuple):
    model: Any  # the transformers model, adapted in place
    method: str
    lora_config: Any  # rankwise.lora.LoraConfig, or None for full fine-tuning
    trainable: int
    total: int


class MergeCheck(NamedTuple):
    """Merged vs unmerged model on the held-out set."""

    examples: int
    identical: bool  # same predicted class for every example (or same loss, causal LM)
    mismatches: int
    max_abs_diff: float  # largest |logit difference| (classification) or |loss difference|


def lora_config_for(config: TrainConfig, *, base_model: str | None = None) -> Any:
    """The :class:`rankwise.lora.LoraConfig` of a run (PEFT field names)."""
    from rankwise.lora import LoraConfig

    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.targets),
        task_type=TASK_TYPES[config.task],
        base_model_name_or_path=base_model,
        **VARIANT_FIELDS[config.method],
    )


def prepare(
    model: Any,
    config: TrainConfig,
    *,
    base_model: str | None = None,
    generator: torch.Generator | int | None = None,
) -> Prepared:
    """Make ``model`` trainable by ``config.method`` (in place); counts trainable parameters.

    ``generator`` (or a seed) fixes the random initial adapter factors.
    """
    if config.method not in AVAILABLE:
        raise ConfigError(
            f"method {config.method!r} is not available yet in this version of rankwise; "
            f"available: {', '.join(AVAILABLE)}"
        )
    lora_config = None
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from rankwise.lora import inject

        lora_config = lora_config_for(config, base_model=base_model)
        inject(model, lora_config, generator=generator)
    params = {id(p): p for p in model.parameters()}.values()  # tied weights counted once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return Prepared(model, config.method, lora_config, trainable, total)


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Every trainable tensor under its in-memory name (what a checkpoint must hold)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
