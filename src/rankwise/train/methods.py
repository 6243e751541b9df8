"""Fine-tuning methods: what trains. ``full`` (every parameter, the baseline), ``lora`` and the
variants that are a change of :class:`rankwise.lora.LoraConfig` alone.

``lora`` injects adapters ``h = W0 x + (alpha / r) B A x`` (Hu et al. 2021) into the modules
named by ``--targets`` with :func:`rankwise.lora.inject`; for classification the task type is
``SEQ_CLS``, so the classifier head is trained in full and saved beside the adapter
(``modules_to_save``, as PEFT does). ``dora`` (``use_dora``), ``pissa`` (exact SVD, so the
residual base is rebuilt identically wherever the adapter is loaded), ``olora`` and ``lora-fa``
(A frozen) and ``rslora`` (``use_rslora``: ``s = alpha / sqrt(r)``, Kalajdzievski 2023) are
config fields (:data:`VARIANT_FIELDS`). ``loraplus`` is plain LoRA adapters trained with
LoRA+'s parameter groups, ``lora-ga`` plain LoRA adapters initialized from gradients
(:func:`rankwise.lora.lora_ga_init`, on ``gradient_batches``), ``adalora`` an
:class:`rankwise.lora.AdaLoraConfig` (``target_r = r``, ``init_r``, the budget schedule of
:func:`adalora_schedule`); their loop hooks live in :mod:`rankwise.train.hooks`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from rankwise.errors import ConfigError
from rankwise.train.config import DEFAULT_TARGETS, TrainConfig, is_pattern_target

# Method -> the LoraConfig fields that make it (every other field as for plain LoRA).
VARIANT_FIELDS: dict[str, dict[str, Any]] = {
    "lora": {},
    "dora": {"use_dora": True},
    "pissa": {"init_lora_weights": "pissa_exact"},
    "olora": {"init_lora_weights": "olora"},
    "lora-fa": {"use_lora_fa": True},
    "rslora": {"use_rslora": True},
    "loraplus": {},  # plain LoRA adapters; the optimizer's groups differ (train.hooks)
    "lora-ga": {},  # plain LoRA adapters; lora_ga_init sets the factors and the base
}
AVAILABLE = (*VARIANT_FIELDS, "adalora", "full")
# AdaLoRA's schedule as fractions of the run's optimizer steps (PEFT's examples use about
# 10% warm-up at the full budget, 20-30% at the final ranks, masks recomputed every 1%).
ADALORA_TINIT, ADALORA_TFINAL, ADALORA_DELTA_T = 0.1, 0.2, 0.01
ADALORA_ORTH_REG_WEIGHT = 0.1  # Zhang et al. 2023, §4 (PEFT's default is 0.5)
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


def adalora_schedule(total_steps: int) -> dict[str, int]:
    """``tinit``, ``tfinal``, ``deltaT`` of a run of ``total_steps`` optimizer steps.

    ``tinit = floor(0.1 T)`` steps at the initial budget, the cubic decrease of Zhang et al.
    2023 eq. (13) until ``T - tfinal`` with ``tfinal = floor(0.2 T)``, masks recomputed every
    ``deltaT = max(1, floor(0.01 T))`` steps; the final ranks are fixed at step ``T - tfinal``
    (at the last step when ``tfinal = 0``).
    """
    return {
        "tinit": math.floor(ADALORA_TINIT * total_steps),
        "tfinal": math.floor(ADALORA_TFINAL * total_steps),
        "deltaT": max(1, math.floor(ADALORA_DELTA_T * total_steps)),
    }


def target_modules_of(targets: tuple[str, ...]) -> list[str] | str:
    """``LoraConfig.target_modules`` for ``--targets``: module names (exact or dotted suffix),
    or a single ``all-linear`` or regular expression (full match), as PEFT's string form."""
    if len(targets) == 1 and is_pattern_target(targets[0]):
        return targets[0]
    return list(targets)


def lora_config_for(
    config: TrainConfig, *, base_model: str | None = None, total_steps: int | None = None
) -> Any:
    """The :class:`rankwise.lora.LoraConfig` (or ``AdaLoraConfig``) of a run (PEFT names).

    ``total_steps`` (the run's optimizer steps) is needed for ``adalora`` only.
    """
    from rankwise.lora import AdaLoraConfig, LoraConfig

    if config.method == "adalora":
        if total_steps is None or config.init_r is None:
            raise ConfigError("method 'adalora': the total steps and a resolved init_r are needed")
        return AdaLoraConfig(
            target_r=config.r,
            init_r=config.init_r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=target_modules_of(config.targets),
            task_type=TASK_TYPES[config.task],
            base_model_name_or_path=base_model,
            total_step=total_steps,
            orth_reg_weight=ADALORA_ORTH_REG_WEIGHT,
            **adalora_schedule(total_steps),
        )
    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=target_modules_of(config.targets),
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
    total_steps: int | None = None,
    gradient_batches: list[dict[str, torch.Tensor]] | None = None,
) -> Prepared:
    """Make ``model`` trainable by ``config.method`` (in place); counts trainable parameters.

    ``generator`` (or a seed) fixes the random initial adapter factors; ``total_steps`` is
    AdaLoRA's schedule length; ``gradient_batches`` are LoRA-GA's gradient batches.
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

        lora_config = lora_config_for(config, base_model=base_model, total_steps=total_steps)
        if config.method == "lora-ga":
            from rankwise.train.hooks import lora_ga_prepare

            lora_ga_prepare(model, lora_config, gradient_batches, config, generator=generator)
        else:
            try:
                inject(model, lora_config, generator=generator)
            except ValueError as err:
                if tuple(config.targets) != DEFAULT_TARGETS or "matches no module" not in str(err):
                    raise
                raise type(err)(
                    f"{err}; the default --targets are BERT's (query,key,value,dense): pass this "
                    "model's, e.g. c_attn,c_proj for GPT-2 or q_proj,k_proj,v_proj,o_proj for Llama"
                ) from None
    params = {id(p): p for p in model.parameters()}.values()  # tied weights counted once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return Prepared(model, config.method, lora_config, trainable, total)


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Every trainable tensor under its in-memory name (what a checkpoint must hold)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
