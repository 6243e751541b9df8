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

    ``save_embedding_layers``: as :func:`rankwise.io.save_adapter`'s (PEFT's rule).

    ``for_original_base`` (:func:`rankwise.io.save_adapter`'s): ``None`` (the default) writes
    a LoRA-GA adapter, whose plain save is refused, and a randomized-PiSSA one, whose residual
    PEFT would draw differently, as a plain rank-2r LoRA for the unmodified base, which both
    rankwise and PEFT load to the trained model's predictions; other adapters as they are.
    ``True`` / ``False`` force either."""

    def __init__(
        self, *, save_embedding_layers: bool | str = "auto", for_original_base: bool | None = None
    ) -> None:
        if for_original_base not in (None, True, False):
            raise TypeError(
                f"for_original_base: expected None, True or False, found {for_original_base!r}"
            )
        self.save_embedding_layers = save_embedding_layers
        self.for_original_base = for_original_base

    def _save(self, model: nn.Module | None, directory: Path, state: TrainerState) -> None:
        from rankwise.io import save_adapter

        if not state.is_world_process_zero:
            return
        if model is None:
            raise ValueError("SaveAdapterCallback: Trainer passed no model to the callback")
        original = self.for_original_base
        if original is None:
            from rankwise.lora.inject import get_config

            original = get_config(model).initializer in ("lora_ga", "pissa")
        save_adapter(
            model,
            directory,
            for_original_base=original,
            save_embedding_layers=self.save_embedding_layers,
        )

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
