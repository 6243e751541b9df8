"""What kind of module a layer is, for the LoRA wrappers: transformers' ``Conv1D`` recognised by
name (transformers stays unimported), a linear layer's dims, and whether a base layer and its
factor modules are *plain* (exact class, no hooks, ``forward`` not replaced), so a wrapper may
compute them inline instead of calling them as modules."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as module_mod


def _plain(module: nn.Module) -> bool:
    """An ``nn.Linear`` / ``Conv1D`` of the exact class, its ``forward`` not replaced on the
    instance (accelerate's offload hooks do that, filling meta weights in) and no forward or
    backward hooks, its own or global: its forward is exactly ``x W^T + b`` (``x W + b`` for
    Conv1D) on the weights it holds, so it may be computed inline. Otherwise it is called as a
    module, as PEFT does."""
    return not _global_hooks() and _own_plain(module)


def plain_adapter(base: nn.Module, lora_A: nn.Module, lora_B: nn.Module) -> bool:
    """The base layer and both factor modules may be computed inline (:func:`_plain`)."""
    return not _global_hooks() and _own_plain(base) and _own_plain(lora_A) and _own_plain(lora_B)


def _global_hooks() -> bool:
    return bool(
        module_mod._global_forward_hooks
        or module_mod._global_forward_pre_hooks
        or module_mod._global_backward_hooks
        or module_mod._global_backward_pre_hooks
    )


def _own_plain(module: nn.Module) -> bool:
    d = module.__dict__  # (per call at a few tokens: plain dict reads, no attribute lookups)
    if type(module) is not nn.Linear and not is_hf_conv1d(module):
        return False
    return not (
        "forward" in d
        or d["_forward_hooks"]
        or d["_forward_pre_hooks"]
        or d["_backward_hooks"]
        or d["_backward_pre_hooks"]
    )


def linear_dims(base_layer: nn.Module) -> tuple[bool, int, int]:
    """``(fan_in_fan_out, in_features, out_features)`` of an ``nn.Linear`` (``W: (out, in)``)
    or a transformers ``Conv1D`` (``W: (in, out)``, hence ``fan_in_fan_out``)."""
    conv1d = is_hf_conv1d(base_layer)
    shape = base_layer.weight.shape  # type: ignore[union-attr]
    in_f, out_f = (shape[0], shape[1]) if conv1d else (shape[1], shape[0])
    return conv1d, int(in_f), int(out_f)


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), recognised by class name so transformers stays unimported."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")
