"""The on-disk adapter format (PEFT-compatible), defined here and nowhere else.

``save_adapter(model, directory)`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` exactly as PEFT does; ``load_adapter(model, directory)`` reads
them (from rankwise or PEFT), checking every key and shape before touching the model;
``read_adapter_config(directory)`` returns the :class:`~rankwise.lora.LoraConfig`.
"""

from __future__ import annotations

from rankwise.io.adapter import (
    PICKLE_NAME,
    WEIGHTS_NAME,
    adapter_weights_file,
    load_adapter,
    save_adapter,
)
from rankwise.io.config_json import CONFIG_NAME, read_adapter_config, write_adapter_config

__all__ = [
    "CONFIG_NAME",
    "PICKLE_NAME",
    "WEIGHTS_NAME",
    "adapter_weights_file",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
    "write_adapter_config",
]
