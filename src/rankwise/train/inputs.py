"""Everything a run reads before it writes anything: datasets, split, model and tokenizer.

Loading all inputs first means a bad file, column, label or model path fails before the
output directory is created, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from rankwise.train.config import TrainConfig
from rankwise.train.data import Split, TextDataset, held_out_split, load_dataset, relabeled
from rankwise.train.models import Loaded, load_pretrained


class RunData(NamedTuple):
    split: Split
    loaded: Loaded


def load_split(config: TrainConfig, *, eval_label_names: Sequence[str] | None = None) -> Split:
    """Training and evaluation sets: ``--eval-data``, or a seeded held-out split of ``--data``.

    ``eval_label_names``: the label order an ``--eval-data`` file's integer labels are
    positions in (default: the training set's names)."""
    full = load_dataset(config.data, task=config.task, **_columns(config))
    if config.eval_data is None:
        return held_out_split(full, config.eval_split or 0.1, generator=config.seed)
    return Split(full, _eval_set(config, eval_label_names or full.label_names))


def _columns(config: TrainConfig) -> dict[str, str | None]:
    return {"text_column": config.text_column, "label_column": config.label_column}


def _eval_set(config: TrainConfig, names: Sequence[str]) -> TextDataset:
    classes = tuple(names) if config.task == "classification" else None
    return load_dataset(config.eval_data, task=config.task, label_names=classes, **_columns(config))


def load_run_data(config: TrainConfig) -> RunData:
    """The datasets, numbered in the label order of the model's head, and the model.

    An ``--eval-data`` file is read after the model, against that order: the one the run
    records and ``rankwise evaluate`` reads the file with, so its integer labels are positions
    in it for both (read against the training names first, a checkpoint head that orders the
    same names otherwise made them another class in the run's own evaluation)."""
    if config.eval_data is None:
        split = load_split(config)
        train = split.train
    else:
        train = load_dataset(config.data, task=config.task, **_columns(config))
    loaded = load_pretrained(
        config.model,
        task=config.task,
        label_names=train.label_names,
        model_dropout=config.model_dropout,
        adopt_label_order=True,
        for_training=True,
    )
    names = loaded.label_names
    reordered = config.task == "classification" and names != train.label_names
    if config.eval_data is not None:
        split = Split(relabeled(train, names) if reordered else train, _eval_set(config, names))
    elif reordered:  # the checkpoint's trained head orders the same names otherwise
        split = Split(*(relabeled(part, names) for part in split))
    return RunData(split, loaded)
