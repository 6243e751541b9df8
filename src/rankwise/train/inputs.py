"""Everything a run reads before it writes anything: datasets, split, model and tokenizer.

Loading all inputs first means a bad file, column, label or model path fails before the
output directory is created, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

from typing import NamedTuple

from rankwise.train.config import TrainConfig
from rankwise.train.data import Split, held_out_split, load_dataset, relabeled
from rankwise.train.models import Loaded, load_pretrained


class RunData(NamedTuple):
    split: Split
    loaded: Loaded


def load_split(config: TrainConfig) -> Split:
    """Training and evaluation sets: ``--eval-data``, or a seeded held-out split of ``--data``."""
    columns = {"text_column": config.text_column, "label_column": config.label_column}
    full = load_dataset(config.data, task=config.task, **columns)
    if config.eval_data is None:
        return held_out_split(full, config.eval_split or 0.1, generator=config.seed)
    held = load_dataset(
        config.eval_data,
        task=config.task,
        label_names=full.label_names if config.task == "classification" else None,
        **columns,
    )
    return Split(full, held)


def load_run_data(config: TrainConfig) -> RunData:
    split = load_split(config)
    loaded = load_pretrained(
        config.model,
        task=config.task,
        label_names=split.train.label_names,
        model_dropout=config.model_dropout,
        adopt_label_order=True,
        for_training=True,
    )
    if config.task == "classification" and loaded.label_names != split.train.label_names:
        # the checkpoint's trained head orders the same names otherwise: number the data so
        split = Split(*(relabeled(part, loaded.label_names) for part in split))
    return RunData(split, loaded)
