"""The key of rankwise's weight caches (the eval-mode inference weight, DoRA's norms): what
changes whenever a tensor the cached value was computed from changes."""

from __future__ import annotations

import weakref
from collections.abc import Callable

from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

_OPTIMIZER_STEPS = [0]  # steps taken by any torch.optim optimizer in this process


def _count_optimizer_step(optimizer: object, args: object, kwargs: object) -> None:
    _OPTIMIZER_STEPS[0] += 1


# torch's fused optimizers (``fused=True``; transformers.Trainer's default "adamw_torch_fused")
# update parameters in place without bumping their version counters, so every step counts
register_optimizer_step_post_hook(_count_optimizer_step)


def _dead() -> None:
    return None


class _Same:
    """Equal to another ``_Same`` only while both name the same live tensor object: a weak
    reference, so the key keeps nothing alive, and a tensor freed and replaced by a new one
    (``load_state_dict(..., assign=True)``) never matches, even at the same address and
    version (data pointer and version alone matched a swapped-in adapter's stale weight).

    A copy or an unpickled key (``copy.deepcopy``, ``torch.save(model)``; a weak reference
    cannot be pickled) names no tensor, so it matches nothing and the cache is rebuilt."""

    __slots__ = ("ref",)

    def __init__(self, t: Tensor) -> None:
        self.ref: Callable[[], Tensor | None] = weakref.ref(t)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Same):
            return NotImplemented
        t = self.ref()
        return t is not None and t is other.ref()

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Callable[[], _Same], tuple[()]]:
        return (_Same.unmatched, ())

    @staticmethod
    def unmatched() -> _Same:
        """A key naming no tensor (what a copy or an unpickled key is)."""
        same = _Same.__new__(_Same)
        same.ref = _dead
        return same


def weights_key(*tensors: Tensor) -> tuple[object, ...]:
    """Identity (the tensor object and its data pointer), version counter and dtype of each
    tensor, and the number of optimizer steps taken so far: changes on every in-place write
    (``copy_``, an optimizer step, fused or not), on ``.data =`` swaps and on replaced
    parameters, so a cache keyed on it stays valid. Not on a write through ``.data``
    (``p.data.add_(...)``), which no version counter sees: ``model.eval()`` (or ``train()``)
    drops the caches after one.

    An inference tensor (made under ``torch.inference_mode()``, e.g. an adapter loaded there)
    has no version counter, so in-place writes to it cannot be seen: its key matches nothing
    and the cached value is rebuilt on every call."""
    key: list[object] = [_OPTIMIZER_STEPS[0]]
    for t in tensors:  # a loop, not a generator: this runs on every cached eval forward
        if t.is_inference():
            key.append(_Same.unmatched())
            continue
        # a view (W.t(), flatten(1): made afresh on each call, freed at once) is named by the
        # tensor it views, which lives on, and by its own shape and strides; it shares that
        # tensor's version counter (a weak reference to the view matched nothing, ever)
        base = t._base
        if base is None:
            key += (_Same(t), t.data_ptr(), t._version, t.dtype)
        else:
            key += (_Same(base), t.data_ptr(), t._version, t.dtype, t.shape, t.stride())
    return tuple(key)
