"""Merge, unmerge, unload and temporarily disable adapters.

Merging writes ``W <- W0 + s · B A`` into each base weight (in float32, float64 for float64
weights, cast back to the weight's dtype) so inference runs the plain base layers at no extra
cost; unmerging subtracts the same product. Both are all-or-nothing (validate, then mutate):
every new weight is checked (finite in the weight's dtype, not on the meta device) before any
is written, so a failure raises :class:`MergeError` naming the layer and leaves every weight
bit-identical. A float32/float64 linear weight whose result a bound proves finite is then updated in place, one layer's
``s·B A`` at a time (:meth:`~rankwise.lora.layers.LoraLayer.plan_write`); any other is
computed first and copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from rankwise.errors import MergeError
from rankwise.lora.inject import (
    STATE_ATTR,
    _set_submodule,
    get_state,
    lora_layers,
    tied_weights,
)
from rankwise.lora.layers import LoraLayer


def merge(model: nn.Module) -> nn.Module:
    """Add every adapter's ``s · B A`` into its base weight; returns ``model``."""
    get_state(model)
    layers = list(lora_layers(model))
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise MergeError(
            f"merge: layers already merged: {merged[:3]}{'…' if len(merged) > 3 else ''}"
        )
    _check_untied(model)
    _apply(layers, "merge")
    return model


def _apply(layers: list[tuple[str, LoraLayer]], what: str) -> None:
    """Plan every layer's new weight (raising MergeError naming the layer), then write all.
    Where a bound proves the result finite the plan is None and the write runs in place
    (:meth:`LoraLayer.plan_write`): no weight-sized temporary per layer, none kept for all."""
    planned = []
    for name, layer in layers:
        try:
            planned.append((layer, layer.plan_write(what)))
        except MergeError as err:
            raise MergeError(f"{what}: layer {name!r}: {err}") from None
    for layer, new in planned:
        layer.write_weight(new, what)


def _check_untied(model: nn.Module) -> None:
    """Refuse to merge into a weight shared with another module (e.g. GPT-2's ``wte`` tied to
    ``lm_head``): the merged product would also change the other module's output."""
    reason = merge_blocker(model)
    if reason is not None:
        raise MergeError(f"merge: {reason}")


def merge_blocker(model: nn.Module) -> str | None:
    """Why ``merge(model)`` would be refused (an adapted weight tied to another module, an
    embedding with ``max_norm``), or None: lets a training run find out before it trains
    rather than after."""
    layers = list(lora_layers(model))
    for name, layer in layers:
        refusal = layer.merge_refusal()
        if refusal is not None:
            return f"layer {name!r}: {refusal}"
    tied = tied_weights(model, [name for name, _ in layers])
    if not tied:
        return None
    name, others = next(iter(tied.items()))
    return (
        f"the weight of {name!r} is tied to {others}; merging would change those "
        "modules too. Untie the weights first or keep this adapter unmerged"
    )


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every adapter's ``s · B A`` from its (merged) base weight; returns ``model``."""
    get_state(model)
    layers = list(lora_layers(model))
    unmerged = [name for name, layer in layers if not layer.merged]
    if unmerged:
        raise MergeError(
            f"unmerge: layers not merged: {unmerged[:3]}{'…' if len(unmerged) > 3 else ''}"
        )
    _apply(layers, "unmerge")
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the plain base modules back: no wrapper is left (zero-latency model).

    ``modules_to_save`` keep their trained values and parameters get back the
    ``requires_grad`` flags they had before injection.
    """
    layers = list(lora_layers(model))
    if not all(layer.merged for _, layer in layers):
        if any(layer.merged for _, layer in layers):
            raise MergeError("merge_and_unload: the model is partly merged; unmerge() it first")
        merge(model)
    return _strip(model)


def unload(model: nn.Module) -> nn.Module:
    """Drop the adapters (unmerging first if merged) and return the model with its original
    module types; ``modules_to_save`` keep their trained values (as PEFT's ``unload``).

    A layer whose initializer moved ``s·B0 A0`` out of the base weight (PiSSA, OLoRA, LoRA-GA)
    gets it back: the model returned is the base model, up to one rounding of that sum (PEFT's
    ``unload`` leaves the residual weight, a model that never existed)."""
    get_state(model)
    if any(layer.merged for _, layer in lora_layers(model)):
        unmerge(model)
    restored: list[LoraLayer] = []
    with torch.no_grad():  # one layer's temporary at a time (not a copy of every weight)
        try:
            for _, layer in lora_layers(model):
                weight = layer.original_base_weight()
                if weight is not None:
                    layer.base_weight.copy_(weight)
                    restored.append(layer)
        except BaseException:  # e.g. out of memory midway: the residuals back, up to rounding
            for layer in restored:
                layer.base_weight.copy_(layer.shifted_base_weight(-1))
            raise
    return _strip(model)


def _strip(model: nn.Module) -> nn.Module:
    state = get_state(model)
    if state.swapped:  # inside disable_adapters: the trained tensors back, under their names
        _restore_saved(model, state.swapped)
        state.swapped = {}
    for name, layer in list(lora_layers(model)):
        _set_submodule(model, name, layer.base_layer)
    params = dict(model.named_parameters(remove_duplicate=False))  # the base names again
    for name, flag in state.requires_grad.items():
        if name in params:  # a parameter the user removed since has nothing to restore
            params[name].requires_grad_(flag)
    object.__delattr__(model, STATE_ATTR)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block: adapters bypassed, ``modules_to_save`` showing
    their values from injection time, and a base weight from which an initializer moved
    ``s·B0 A0`` (PiSSA, OLoRA, LoRA-GA) run as ``W_res + s·B0 A0``, the original weight (PEFT
    runs the residual). Merged layers are unmerged for the block and merged again.
    Blocks nest: leaving an inner one leaves the adapters disabled for the outer one.

    The ``modules_to_save`` tensors (and the biases ``bias="all"``/``"lora_only"`` trains) are
    swapped, not overwritten: for the block the modules hold
    (frozen) tensors of their injection-time values, and the trained ones, untouched, come back
    after it. So a graph built before the block still backpropagates (a DPO-style reference
    forward inside it, as TRL's ``disable_adapter()``), and :func:`~rankwise.io.save_adapter`
    inside it saves the trained values, as PEFT does.
    """
    state = get_state(model)
    named = list(lora_layers(model))
    layers = [layer for _, layer in named]
    # every merged layer (all of them, or some merged one by one with LoraLayer.merge(): the
    # disabled forward of a merged layer runs its merged weight) unmerged for the block
    was_merged = [(name, layer) for name, layer in named if layer.merged]
    _apply(was_merged, "unmerge")
    outer = bool(state.swapped)  # an enclosing block already shows the injection-time values
    if not outer:
        state.swapped = _swap_saved(model, state.originals)
    before = [layer.disabled for layer in layers]  # nested blocks: the outer one stays disabled
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before, strict=True):
            layer.disabled = flag
        if not outer:
            _restore_saved(model, state.swapped)
            state.swapped = {}
        if getattr(model, STATE_ATTR, None) is state:  # not unloaded inside the block
            _apply(was_merged, "merge")


def set_inference_cache(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn the eval-mode inference cache of every adapted layer on (the default) or off.

    With it on, a LoRA/DoRA linear layer in eval mode with autograd off runs one GEMM with
    ``W0 + s·B A`` (DoRA: its merged weight), formed once and rebuilt when a weight changes;
    it holds one extra ``(out, in)`` matrix per adapted layer until ``train()``. Off, inference
    runs the three-GEMM path with no extra memory (for a model whose weights fill the device).
    Returns ``model``.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"set_inference_cache: 'enabled' must be a bool, found {enabled!r}")
    get_state(model)
    for _, layer in lora_layers(model):
        layer.inference_cache = enabled
        layer.drop_inference_cache()
    return model


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str, dict[str, Any]]:
    """The module holding tensor ``key`` of ``model``, its attribute name and the dict
    (``_parameters`` or ``_buffers``) it lives in."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    return owner, attr, owner._parameters if attr in owner._parameters else owner._buffers


def _swap_saved(model: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put new tensors holding ``values`` at the named parameters/buffers (frozen parameters,
    in each one's dtype and device); returns the tensors they replaced, untouched."""
    previous = {}
    for key, value in values.items():
        _, attr, store = _owner(model, key)
        current = store[attr]  # a tensor: recorded from the module's state_dict at injection
        shown = value.to(device=current.device, dtype=current.dtype)
        if isinstance(current, nn.Parameter):
            store[attr] = nn.Parameter(shown, requires_grad=False)
        else:  # a buffer (running statistics): a copy, so the block cannot change the record
            store[attr] = shown.clone() if shown is value else shown
        previous[key] = current
    return previous


def _restore_saved(model: nn.Module, previous: dict[str, torch.Tensor]) -> None:
    """Put back the tensors :func:`_swap_saved` replaced."""
    for key, tensor in previous.items():
        _, attr, store = _owner(model, key)
        store[attr] = tensor
