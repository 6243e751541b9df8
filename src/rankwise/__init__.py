"""rankwise: low-rank approximation and low-rank adaptation (LoRA) for PyTorch.

``import rankwise`` stays light: it imports torch only. Subpackages (``rankwise.linalg``,
``rankwise.lora``, ``rankwise.io``, ``rankwise.analysis``, ``rankwise.train``) load on first
use, and heavy integrations (transformers, matplotlib, scipy, datasets) load lazily at the edge.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it. Filled in as each part of the library lands.
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        (
            "LoraConfig",
            "inject",
            "merge",
            "unmerge",
            "merge_and_unload",
            "unload",
            "disable_adapters",
            "set_inference_cache",
            "trainable_report",
            "lora_layers",
            "get_config",
            "AdaLoraConfig",
            "RankAllocator",
            "orthogonal_regularization",
            "lora_ga_init",
            "loraplus_param_groups",
            "create_loraplus_optimizer",
        ),
        "rankwise.lora",
    ),
    **dict.fromkeys(("save_adapter", "load_adapter", "read_adapter_config"), "rankwise.io"),
    **dict.fromkeys(("TrainConfig", "TrainResult"), "rankwise.train"),
}

_SUBPACKAGES = ("linalg", "lora", "io", "analysis", "train", "cli")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"rankwise.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rankwise' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))


__all__ = ["__version__", *_LAZY]
