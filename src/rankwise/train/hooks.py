"""Per-method hooks of the training loop: parameter groups, an extra loss, a step hook, state.

The loop (:mod:`rankwise.train.loop`) asks a :class:`MethodHooks` for

* ``param_groups(model)`` — the optimizer's groups (AdamW, weight decay on matrices only);
* ``extra_loss(model)`` — a term added to the *mean* task loss of every optimizer step
  (``None``: nothing);
* ``after_optimizer_step(step)`` — called with the 1-based optimizer step after
  ``optimizer.step()`` and before ``zero_grad()`` (gradients still present);
* ``state_dict()`` / ``load_state_dict()`` — tensors and plain containers kept in checkpoints;
* ``base_digest`` — a SHA-256 of weights the method changed outside the trainable set
  (LoRA-GA's residual base), stored in checkpoints and checked on ``--resume``.

Methods: ``loraplus`` (Hayou et al. 2024: ``B`` at ``lr · ratio``, ``A`` and the classifier
head at ``lr``, :func:`rankwise.lora.loraplus_param_groups`), ``adalora`` (Zhang et al. 2023:
``+ orth_reg_weight · R(P, Q)`` and :class:`rankwise.lora.RankAllocator`), ``lora-ga`` (Wang
et al. 2024: the initialization of :func:`lora_ga_prepare`); every other method: the plain
hooks.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from rankwise.errors import ConfigError
from rankwise.train.batching import (
    Encoded,
    collate,
    count_targets,
    epoch_generator,
    length_grouped_batches,
)
from rankwise.train.config import TrainConfig
from rankwise.train.evaluate import loss_sum


def _decay_groups(
    params: list[tuple[str, nn.Parameter]], *, lr: float, decay: float, tag: str
) -> list[dict[str, Any]]:
    """Matrices with ``decay``, vectors (biases, norms) without; empty groups dropped."""
    groups = [
        {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": decay, "lr": lr,
         "name": tag},
        {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr,
         "name": f"{tag}_no_decay"},
    ]  # fmt: skip
    return [g for g in groups if g["params"]]


class MethodHooks:
    """The plain loop: one learning rate, no extra loss, nothing after a step, no state."""

    base_digest: str | None = None

    def __init__(self, config: TrainConfig, model: nn.Module) -> None:
        self.config = config

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        lr, decay = float(self.config.lr or 0.0), self.config.weight_decay
        return _decay_groups(params, lr=lr, decay=decay, tag="params")

    def extra_loss(self, model: nn.Module) -> Tensor | None:
        return None

    def after_optimizer_step(self, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(
                f"checkpoint: method {self.config.method!r} keeps no hook state, found "
                f"{sorted(state)}"
            )


class LoraPlusHooks(MethodHooks):
    """LoRA+ groups: adapters per :func:`rankwise.lora.loraplus_param_groups` (``lora_B`` at
    ``lr · loraplus_ratio``, ``lora_A`` at ``lr``); the trained-in-full head at ``lr``."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        from rankwise.lora import loraplus_param_groups

        lr, decay = float(self.config.lr or 0.0), self.config.weight_decay
        adapter = {id(p) for n, p in model.named_parameters() if "lora_" in n}
        groups = []
        for g in loraplus_param_groups(
            model, lr, ratio=self.config.loraplus_ratio, weight_decay=decay
        ):
            kept = [p for p in g["params"] if id(p) in adapter]
            if kept:
                groups.append({**g, "params": kept})
        head = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter
        ]
        return groups + _decay_groups(head, lr=lr, decay=decay, tag="head")


class AdaLoraHooks(MethodHooks):
    """``loss + orth_reg_weight · R(P, Q)`` (eq. 4) and the rank allocator after every step.

    Under DDP the allocator reads gradients already all-reduced (and clipped) and identical
    weights, so every process makes the same pruning decisions without communicating.
    """

    def __init__(self, config: TrainConfig, model: nn.Module) -> None:
        from rankwise.lora import RankAllocator, get_config

        super().__init__(config, model)
        self.lora_config = get_config(model)  # the config object save_adapter will read
        self.allocator = RankAllocator(model, self.lora_config)

    def extra_loss(self, model: nn.Module) -> Tensor | None:
        from rankwise.lora import orthogonal_regularization

        weight = float(self.lora_config.orth_reg_weight)
        return weight * orthogonal_regularization(model) if weight > 0 else None

    def after_optimizer_step(self, step: int) -> None:
        self.allocator.update_and_allocate(step)

    def state_dict(self) -> dict[str, Any]:
        return self.allocator.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.allocator.load_state_dict(state)
        except ValueError as err:
            raise ValueError(f"checkpoint: {err}") from None


class LoraGaHooks(MethodHooks):
    """Plain hooks; remembers a digest of the residual base weights LoRA-GA wrote."""

    def __init__(self, config: TrainConfig, model: nn.Module) -> None:
        from rankwise.lora import lora_layers

        super().__init__(config, model)
        digest = hashlib.sha256()
        for name, layer in lora_layers(model):
            w = layer.base_layer.weight.detach().contiguous().cpu()
            digest.update(name.encode())
            digest.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
        self.base_digest = digest.hexdigest()


# method -> its hooks (every other method: the plain MethodHooks)
HOOKS: dict[str, type[MethodHooks]] = {
    "loraplus": LoraPlusHooks,
    "adalora": AdaLoraHooks,
    "lora-ga": LoraGaHooks,
}


def make_hooks(config: TrainConfig, model: nn.Module) -> MethodHooks:
    """The hooks of ``config.method`` for ``model`` (already prepared)."""
    return HOOKS.get(config.method, MethodHooks)(config, model)


GA_CHUNK = 4  # examples per forward/backward of LoRA-GA's gradient pass


def gradient_batches(
    encoded: Encoded, config: TrainConfig, *, pad_id: int, world_size: int = 1
) -> list[dict[str, Tensor]]:
    """LoRA-GA's gradient batches: the first ``ga_batches`` global batches (batch size × grad
    accum × processes examples) of epoch 0's order, the training's own first batches.

    Each is run in chunks of :data:`GA_CHUNK` examples, a size that does not depend on how the
    global batch is split, so 2 processes × 8, 1 × 16 and 1 × 8 × accum 2 (and a resume that
    changes the split) build the same initialization, bit for bit; every process runs them all
    (the same initialization everywhere, no communication). A chunk carries ``ga_weight`` so
    that the gradient is the mean over the batches of each batch's mean loss over its terms
    (examples, or predicted tokens), as with one pass per batch."""
    task = config.task
    global_batch = config.batch_size * config.grad_accum * world_size
    order = length_grouped_batches(
        encoded.lengths(), global_batch, generator=epoch_generator(config.seed, 0)
    )
    if config.ga_batches > len(order):  # capped: said, not silent (config.yaml keeps the value)
        warnings.warn(
            f"option --ga-batches {config.ga_batches}: one epoch holds {len(order)} batches of "
            f"{global_batch} examples; LoRA-GA estimates the gradient on those {len(order)}",
            RuntimeWarning,
            stacklevel=2,
        )
    order = order[: config.ga_batches]
    per_batch = [
        [
            collate(encoded, ids[i : i + GA_CHUNK], pad_id=pad_id)
            for i in range(0, len(ids), GA_CHUNK)
        ]
        for ids in order
    ]
    chunks = sum(len(parts) for parts in per_batch)
    out = []
    for parts in per_batch:
        terms = max(1, sum(count_targets(part, task) for part in parts))
        for part in parts:  # lora_ga_init averages over chunks: undo that, weigh by terms
            part["ga_weight"] = torch.tensor(chunks / (len(per_batch) * terms), dtype=torch.float64)
            out.append(part)
    return out


def lora_ga_prepare(
    model: nn.Module,
    lora_config: Any,
    batches: list[dict[str, Tensor]] | None,
    config: TrainConfig,
    *,
    generator: torch.Generator | int | None,
) -> None:
    """:func:`rankwise.lora.lora_ga_init` with the training loss (mean over each batch's terms:
    examples, or predicted tokens), the model in eval mode (no dropout: deterministic), then
    the mode restored."""
    from rankwise.lora import lora_ga_init

    if not batches:
        raise ConfigError("method 'lora-ga': no training batch to estimate gradients on")
    task = config.task

    def loss_fn(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        total, _ = loss_sum(m, batch, task)
        if "ga_weight" in batch:  # a chunk of a batch (gradient_batches)
            return total * float(batch["ga_weight"])
        return total / max(1, count_targets(batch, task))

    was_training = model.training
    model.eval()
    try:
        lora_ga_init(model, lora_config, batches, loss_fn=loss_fn, generator=generator)
    finally:
        model.train(was_training)
