"""The key of rankwise's weight caches (the eval-mode inference weight, DoRA's norms): what
changes whenever a tensor the cached value was computed from changes."""

from __future__ import annotations

from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

_OPTIMIZER_STEPS = [0]  # steps taken by any torch.optim optimizer in this process


def _count_optimizer_step(optimizer: object, args: object, kwargs: object) -> None:
    _OPTIMIZER_STEPS[0] += 1


# torch's fused optimizers (``fused=True``; transformers.Trainer's default "adamw_torch_fused")
# update parameters in place without bumping their version counters, so every step counts
register_optimizer_step_post_hook(_count_optimizer_step)


def weights_key(*tensors: Tensor) -> tuple[object, ...]:
    """Identity, version counter and dtype of each tensor, and the number of optimizer steps
    taken so far: changes on every in-place write (``copy_``, an optimizer step, fused or not)
    and on ``.data =`` swaps, so a cache keyed on it stays valid."""
    key: list[object] = [_OPTIMIZER_STEPS[0]]
    for t in tensors:  # a loop, not a generator: this runs on every cached eval forward
        key += (t.data_ptr(), t._version, t.dtype)
    return tuple(key)
