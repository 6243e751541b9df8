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

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


def checkpoint_folder(args: TrainingArguments, state: TrainerState) -> Path:
    """The folder ``Trainer`` saves (or resumed) the checkpoint of ``state.global_step`` in:
    ``output_dir/checkpoint-<step>``, or during ``hyperparameter_search`` the trial's
    ``output_dir/<run name>/checkpoint-<step>`` (``Trainer._get_output_dir``), the newest."""
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    direct = Path(args.output_dir) / name
    if direct.is_dir():
        return direct
    trials = [p for p in Path(args.output_dir).glob(f"*/{name}") if p.is_dir()]
    return max(trials, key=lambda p: p.stat().st_mtime_ns) if trials else direct


class SaveAdapterCallback(TrainerCallback):
    """Write the adapter (PEFT's format) into each checkpoint folder and, at the end of
    training, into ``args.output_dir``; on the main process only (``torchrun``).

    ``save_embedding_layers``: as :func:`rankwise.io.save_adapter`'s (PEFT's rule).

    ``for_original_base`` (:func:`rankwise.io.save_adapter`'s): ``None`` (the default) writes
    a LoRA-GA adapter, whose plain save is refused, a randomized-PiSSA one, whose residual
    PEFT would draw differently, and those PEFT cannot rebuild (OLoRA on GPT-2's Conv1D,
    PiSSA/OLoRA on convolutions) as a plain rank-2r LoRA for the unmodified base, which both
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
        self._run_dir: Path | None = None  # where this run's checkpoints went (a trial's folder)

    def _save(self, model: nn.Module | None, directory: Path, state: TrainerState) -> None:
        from rankwise.io import save_adapter

        if not state.is_world_process_zero:
            return
        if model is None:
            raise ValueError("SaveAdapterCallback: Trainer passed no model to the callback")
        original = self.for_original_base
        if original is None:
            from rankwise.io.adapter import needs_original_base

            original = needs_original_base(model)
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
        folder = checkpoint_folder(args, state)
        self._run_dir = folder.parent
        self._save(model, folder, state)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """The trained adapter into ``output_dir``, or into a hyperparameter-search trial's own
        folder (where its checkpoints went: trials would overwrite one another's). With
        ``load_best_model_at_end`` the best checkpoint's adapter, as this callback saved it
        there (unless a search trial was pruned, which ends before that load): the model
        Trainer loaded back is that checkpoint's, and the copy holds whatever
        else the save depends on at that step (AdaLoRA's ranks kept, which the allocator's
        callback restores in its own ``on_train_end``, perhaps after this one)."""
        directory = self._run_dir if self._run_dir is not None else Path(args.output_dir)
        self._run_dir = None
        best = state.best_model_checkpoint
        # Trainer loads the best model right after logging the run's summary (train_runtime);
        # a pruned search trial ends here mid-run, its model the last step's
        reloaded = bool(state.log_history) and "train_runtime" in state.log_history[-1]
        if args.load_best_model_at_end and best is not None and reloaded:
            if not state.is_world_process_zero or _copy_adapter(Path(best), directory):
                return
        self._save(model, directory, state)


def _copy_adapter(source: Path, directory: Path) -> bool:
    """Copy the adapter files of ``source`` into ``directory`` together (other files there are
    kept); False, copying nothing, when ``source`` does not hold both."""
    from rankwise.io import CONFIG_NAME, WEIGHTS_NAME
    from rankwise.io.files import atomic_write_bytes, replaced_dir

    names = (WEIGHTS_NAME, CONFIG_NAME)
    if not all((source / name).is_file() for name in names):
        return False
    with replaced_dir(directory) as tmp:
        for name in names:
            atomic_write_bytes(tmp / name, (source / name).read_bytes())
    return True


ALLOCATOR_FILE = "adalora_allocator.safetensors"


class AdaLoraCallback(TrainerCallback):
    """AdaLoRA under ``transformers.Trainer``: what PEFT's ``AdaLoraModel`` does in its
    ``forward`` and ``update_and_allocate``, for a model adapted by
    ``inject(model, AdaLoraConfig(...))``::

        allocator = RankAllocator(model, config)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       callbacks=[AdaLoraCallback(allocator),
                                                  SaveAdapterCallback()])

    * the loss of every training forward gets ``orth_reg_weight · R(P, Q)`` (eq. 4), added to
      the model output's ``loss`` as PEFT does, so it scales as that loss does under gradient
      accumulation and clipping sees it. (Trainer divides a micro-batch's loss by the
      accumulation steps unless the model takes ``num_items_in_batch``; a causal LM then
      normalizes its own loss by the step's tokens, and the term, as in PEFT, counts once per
      micro-batch. No rule fits every head: BERT's classifier takes the argument and ignores
      it.);
    * ``allocator.update_and_allocate(step)`` runs in ``on_optimizer_step``, after the
      optimizer step and before ``zero_grad`` (``step`` counts from 0, as PEFT's loop);
    * the allocator's state (smoothed scores, kept triplets) goes into every checkpoint folder
      (``adalora_allocator.safetensors``) and is read back when ``trainer.train(
      resume_from_checkpoint=…)`` resumes: without it a run resumed after the final mask kept
      training the pruned triplets. ``checkpoint`` names the folder to read when it is not
      ``output_dir/checkpoint-<step>``; resuming without the file is an error.
    """

    def __init__(self, allocator: Any, *, checkpoint: str | Path | None = None) -> None:
        from rankwise.lora import RankAllocator

        if not isinstance(allocator, RankAllocator):
            raise TypeError(
                f"allocator: expected a rankwise.lora.RankAllocator, found "
                f"{type(allocator).__name__}"
            )
        self.allocator = allocator
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self._hook: Any = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("AdaLoraCallback: Trainer passed no model to the callback")
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_hook(
            self._add_orthogonal_regularization, with_kwargs=True
        )
        if state.global_step > 0:
            folder = self.checkpoint or checkpoint_folder(args, state)
            self.allocator.load_state_dict(_read_allocator(folder / ALLOCATOR_FILE))

    def _add_orthogonal_regularization(
        self, module: nn.Module, inputs: Any, kwargs: dict[str, Any], output: Any
    ) -> Any:
        from rankwise.lora import orthogonal_regularization

        weight = float(self.allocator.config.orth_reg_weight)
        loss = getattr(output, "loss", None)
        if not module.training or weight <= 0 or not isinstance(loss, torch.Tensor):
            return None
        output.loss = loss + weight * orthogonal_regularization(module)
        return output

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.allocator.update_and_allocate(state.global_step)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        folder = checkpoint_folder(args, state)
        _write_allocator(folder / ALLOCATOR_FILE, self.allocator.state_dict())

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Remove the regularization hook; with ``load_best_model_at_end`` the best checkpoint's
        allocator comes back with its weights, so the ranks kept (``rank_pattern``, which a
        save cuts the factors to) are the best model's, not the last step's."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None:
            path = Path(best) / ALLOCATOR_FILE
            if not path.is_file():
                warnings.warn(
                    f"AdaLoraCallback: the best checkpoint {best} holds no {ALLOCATOR_FILE}: "
                    "the ranks kept stay the last step's, which may not be the loaded model's",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
            self.allocator.load_state_dict(_read_allocator(path))


def _write_allocator(path: Path, state: dict[str, Any]) -> None:
    from rankwise.io.files import write_safetensors

    tensors = {f"{field}/{key}": value for field in ("exp_avg_ipt", "exp_avg_unc")
               for key, value in state[field].items()}  # fmt: skip
    pattern = json.dumps(state["rank_pattern"], sort_keys=True)
    write_safetensors(path, tensors, metadata={"rank_pattern": pattern})


def _read_allocator(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    from rankwise.errors import ConfigError

    if not path.is_file():
        raise ConfigError(
            f"AdaLoraCallback: resuming, but {path} does not exist (the allocator's scores and "
            "kept triplets; without them the pruned triplets would train again); pass "
            "AdaLoraCallback(allocator, checkpoint=<the folder resumed from>)"
        )
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        metadata = fh.metadata() or {}
        state: dict[str, Any] = {"exp_avg_ipt": {}, "exp_avg_unc": {}}
        for key in fh.keys():
            field, _, name = key.partition("/")
            if field not in state:
                raise ConfigError(f"{path}: unexpected tensor {key!r}")
            state[field][name] = fh.get_tensor(key)
    try:
        state["rank_pattern"] = json.loads(metadata["rank_pattern"])
    except (KeyError, json.JSONDecodeError, RecursionError):
        raise ConfigError(f"{path}: no readable rank_pattern in its metadata") from None
    return state
