"""Fine-tuning: data loading, batching, the training loop, checkpoints, torchrun.

``rankwise.train.train(TrainConfig(...))`` is what ``rankwise finetune`` runs. Heavy
libraries (transformers, matplotlib, datasets, yaml) are imported inside functions.
"""

from __future__ import annotations

from rankwise.train.config import TrainConfig, resolve
from rankwise.train.loop import TrainResult, train

__all__ = ["SaveAdapterCallback", "TrainConfig", "TrainResult", "resolve", "train"]


def __getattr__(name: str) -> object:
    if name == "SaveAdapterCallback":  # imports transformers: only when asked for
        from rankwise.train.trainer_callback import SaveAdapterCallback

        return SaveAdapterCallback
    raise AttributeError(f"module 'rankwise.train' has no attribute {name!r}")
