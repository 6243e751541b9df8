"""Fine-tuning: data loading, batching, the training loop, checkpoints, torchrun.

``rankwise.train.train(TrainConfig(...))`` is what ``rankwise finetune`` runs. Heavy
libraries (transformers, matplotlib, datasets, yaml) are imported inside functions.
"""

from __future__ import annotations

from rankwise.train.config import TrainConfig, resolve
from rankwise.train.loop import TrainResult, train

__all__ = [
    "AdaLoraCallback",
    "SaveAdapterCallback",
    "TrainConfig",
    "TrainResult",
    "resolve",
    "train",
]


def __getattr__(name: str) -> object:
    if name in ("SaveAdapterCallback", "AdaLoraCallback"):  # import transformers: when asked
        from rankwise.train import trainer_callback

        return getattr(trainer_callback, name)
    raise AttributeError(f"module 'rankwise.train' has no attribute {name!r}")
