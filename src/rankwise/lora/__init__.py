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

from rankwise.lora.adalora import (
    AdaLoraConfig,
    AdaLoraConv,
    AdaLoraLayer,
    AdaLoraLinear,
    adalora_init,
    adalora_random_init,
    orthogonal_regularization,
)
from rankwise.lora.adalora_alloc import RankAllocator
from rankwise.lora.config import RESIDUAL_INITIALIZERS, SCALING_RULES, LoraConfig
from rankwise.lora.conv import LoraConv
from rankwise.lora.dora import DoraConv, DoraEmbedding, DoraLinear
from rankwise.lora.embedding import LoraEmbedding
from rankwise.lora.init_svd import olora_init, pissa_exact_init, pissa_init
from rankwise.lora.initializers import INITIALIZERS, WEIGHT_READING, LoraInit, kaiming_init
from rankwise.lora.inject import get_config, inject, lora_layers
from rankwise.lora.layers import LoraFactors, LoraLayer, LoraLinear
from rankwise.lora.lora_ga import lora_ga_init
from rankwise.lora.loraplus import create_loraplus_optimizer, loraplus_param_groups
from rankwise.lora.merge import (
    disable_adapters,
    merge,
    merge_and_unload,
    set_inference_cache,
    unload,
    unmerge,
)
from rankwise.lora.registry import WRAPPERS
from rankwise.lora.report import TrainableReport, trainable_report

# -- variants: one registry entry each (initializer axis, parametrization axis) ---------------
INITIALIZERS.update(
    {
        "pissa": pissa_init,  # randomized SVD, within 1% of the optimal residual
        "pissa_exact": pissa_exact_init,  # full SVD (PEFT's "pissa")
        "olora": olora_init,
        # LoRA-GA needs gradients (lora_ga_init); without them (e.g. loading a file) the
        # factors start as the default and are overwritten, as in PEFT
        "lora_ga": kaiming_init,
        "adalora": adalora_init,
        "adalora_random": adalora_random_init,
    }
)
WEIGHT_READING.update(RESIDUAL_INITIALIZERS)

__all__ = [
    "AdaLoraConfig",
    "AdaLoraConv",
    "AdaLoraLayer",
    "AdaLoraLinear",
    "DoraConv",
    "DoraEmbedding",
    "DoraLinear",
    "RankAllocator",
    "create_loraplus_optimizer",
    "lora_ga_init",
    "loraplus_param_groups",
    "olora_init",
    "orthogonal_regularization",
    "pissa_init",
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
    "set_inference_cache",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "trainable_report",
    "unload",
    "unmerge",
]
