"""LoRA adapters on any PyTorch / transformers model (Hu et al. 2021).

``h = W0 x + s · B A x`` with ``A: (r, in)``, ``B: (out, r)``, ``B = 0`` at the start and
``s = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA). Typical use::

    from rankwise.lora import LoraConfig, inject, trainable_report, merge_and_unload
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    inject(model, cfg)            # in place; only adapters (+ classifier) train
    print(trainable_report(model))
    ...                           # train
    model = merge_and_unload(model)  # plain modules again, zero extra latency
"""

from __future__ import annotations

from rankwise.lora.config import SCALING_RULES, LoraConfig
from rankwise.lora.initializers import INITIALIZERS, LoraInit
from rankwise.lora.inject import get_config, inject, lora_layers
from rankwise.lora.layers import (
    WRAPPERS,
    LoraConv,
    LoraEmbedding,
    LoraFactors,
    LoraLayer,
    LoraLinear,
)
from rankwise.lora.merge import disable_adapters, merge, merge_and_unload, unload, unmerge
from rankwise.lora.report import TrainableReport, trainable_report

__all__ = [
    "INITIALIZERS",
    "SCALING_RULES",
    "WRAPPERS",
    "LoraConfig",
    "LoraConv",
    "LoraEmbedding",
    "LoraFactors",
    "LoraInit",
    "LoraLayer",
    "LoraLinear",
    "TrainableReport",
    "disable_adapters",
    "get_config",
    "inject",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "trainable_report",
    "unload",
    "unmerge",
]
