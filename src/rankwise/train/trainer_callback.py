"""Adapters in PEFT's format from ``transformers.Trainer`` runs.

``Trainer`` saves a model that is not a ``peft.PeftModel`` as a whole: ``model.safetensors``
with the wrapped layers' keys (``….query.base_layer.weight``, ``….query.lora_A.weight``),
which neither :func:`rankwise.io.load_adapter` nor ``peft.PeftModel.from_pretrained`` reads,
and which ``from_pretrained`` of the base class loads with the adapted layers re-initialized
(it reports their keys as missing). :class:`SaveAdapterCallback` adds the adapter files
(``adapter_model.safetensors`` + ``adapter_config.json``, :func:`rankwise.io.save_adapter`)
beside what ``Trainer`` writes: into every ``checkpoint-<step>`` folder it saves, and into
``output_dir`` when training ends::

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[SaveAdapterCallback()])
    trainer.train()
    rw.load_adapter(fresh_model, args.output_dir)   # or a checkpoint-<step> folder

Importing this module imports transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


class SaveAdapterCallback(TrainerCallback):
    """Write the adapter (PEFT's format) into each checkpoint folder and, at the end of
    training, into ``args.output_dir``; on the main process only (``torchrun``).

    ``save_embedding_layers``: as :func:`rankwise.io.save_adapter`'s (PEFT's rule)."""

    def __init__(self, *, save_embedding_layers: bool | str = "auto") -> None:
        self.save_embedding_layers = save_embedding_layers

    def _save(self, model: nn.Module | None, directory: Path, state: TrainerState) -> None:
        from rankwise.io import save_adapter

        if not state.is_world_process_zero:
            return
        if model is None:
            raise ValueError("SaveAdapterCallback: Trainer passed no model to the callback")
        save_adapter(model, directory, save_embedding_layers=self.save_embedding_layers)

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """After ``Trainer`` wrote ``checkpoint-<global_step>``: the adapter into it too."""
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self._save(model, folder, state)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """The trained adapter into ``output_dir``."""
        self._save(model, Path(args.output_dir), state)
