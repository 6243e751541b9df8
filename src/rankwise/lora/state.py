"""The adapter's tensors by name: what a file holds, for a live model or a planned injection.

Names are the model's own ``state_dict`` names (``<module>.lora_A.weight``,
``<module>.lora_embedding_A``, ``<module>.base_layer.bias``, ``<modules_to_save>.<key>``), which
are PEFT's file keys without the ``base_model.model.`` prefix. Selection follows PEFT 0.21.2
``get_peft_model_state_dict``: the LoRA factors; every ``modules_to_save`` tensor; with
``bias="all"`` every tensor named ``*.bias``; with ``"lora_only"`` the adapted layers' biases.
"""

from __future__ import annotations

from torch import Tensor, nn

from rankwise.lora.inject import get_state, lora_layers, parametrization_name
from rankwise.lora.layers import LoraLayer
from rankwise.lora.registry import WRAPPERS
from rankwise.lora.targets import Plan


def _is_bias(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == "bias"


def adapter_state_dict(model: nn.Module, *, bias: str | None = None) -> dict[str, Tensor]:
    """The live tensors an adapter file holds for ``model`` (not copies).

    ``bias`` overrides the bias mode of the attached config (used when checking a file
    written with another mode).
    """
    state = get_state(model)
    mode = state.config.bias if bias is None else bias
    full = model.state_dict(keep_vars=True)
    # inside disable_adapters: the trained modules_to_save tensors, not the stand-ins
    full |= {k: v for k, v in state.swapped.items() if k in full}
    out: dict[str, Tensor] = {}
    for name, layer in lora_layers(model):
        for key, p in layer.named_parameters():
            if not key.startswith("base_layer."):
                out[f"{name}.{key}"] = p
        if mode == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            out[f"{name}.base_layer.bias"] = full[f"{name}.base_layer.bias"]  # trained one
    for m in state.modules_to_save:
        prefix = m + "."
        out.update({k: v for k, v in full.items() if k.startswith(prefix)})
    if mode == "all":
        out.update({k: v for k, v in full.items() if _is_bias(k)})
    return out


def planned_shapes(model: nn.Module, plan: Plan) -> dict[str, tuple[int, ...]]:
    """The names and shapes :func:`adapter_state_dict` will have after injecting ``plan``."""
    modules = dict(model.named_modules())
    row = WRAPPERS[parametrization_name(plan.config)]
    out: dict[str, tuple[int, ...]] = {}
    target_names = {t.name for t in plan.targets}
    for t in plan.targets:
        cls: type[LoraLayer] = row[t.kind]
        for key, shape in cls.factor_shapes(modules[t.name], t.r).items():
            out[f"{t.name}.{key}"] = shape
        base_bias = getattr(modules[t.name], "bias", None)
        if plan.config.bias == "lora_only" and base_bias is not None:
            out[f"{t.name}.base_layer.bias"] = tuple(base_bias.shape)
    full = model.state_dict(keep_vars=True)
    for m in plan.modules_to_save:
        prefix = m + "."
        out.update({k: tuple(v.shape) for k, v in full.items() if k.startswith(prefix)})
    if plan.config.bias == "all":
        for k, v in full.items():
            if _is_bias(k):
                module, _, leaf = k.rpartition(".")
                key = f"{module}.base_layer.{leaf}" if module in target_names else k
                out[key] = tuple(v.shape)
    return out
