"""Fine-tuning: data loading, batching, the training loop, checkpoints, torchrun.

``rankwise.train.train(TrainConfig(...))`` is what ``rankwise finetune`` runs. Heavy
libraries (transformers, matplotlib, datasets, yaml) are imported inside functions.
"""

from __future__ import annotations

from rankwise.train.config import TrainConfig, resolve
from rankwise.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "resolve", "train"]
