"""Loading an adapter into a model that already has adapters: the weights are swapped in
place (no re-injection) when the file's adapter has the same parametrization, modules,
ranks and residual base; otherwise a clear refusal, with the model unchanged.

:func:`expected_for_swap` refuses what cannot be swapped and gives the keys and shapes the
file must hold; :func:`check_base_kept` refuses a file that would leave base tensors of the
old adapter (trained biases, whole embeddings) in place; :func:`adopt_config` gives the
layers the file's scales and dropout and the model its config, once the file has passed
every check.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from rankwise.errors import AdapterFormatError, MergeError, ShapeMismatchError
from rankwise.io.adapter_keys import few
from rankwise.lora.config import RESIDUAL_INITIALIZERS, LoraConfig
from rankwise.lora.init_svd import initial_factors
from rankwise.lora.inject import (
    get_state,
    lora_layers,
    replace_state_config,
    trained_biases,
)
from rankwise.lora.state import adapter_state_dict
from rankwise.lora.targets import selected_names, unwrapped_modules


def expected_for_swap(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    if any(layer.merged for _, layer in lora_layers(model)):
        raise MergeError("load_adapter: the model's adapters are merged; unmerge(model) first")
    kinds = {"vanilla": "plain LoRA", "dora": "DoRA", "adalora": "AdaLoRA"}
    have, want = get_state(model).config.parametrization, config.parametrization
    if have != want:  # other tensors per layer: the keys' mismatch named neither
        raise AdapterFormatError(
            f"load_adapter: cannot swap adapters in place: the model's adapters are "
            f"{kinds.get(have, have)}, the file's {kinds.get(want, want)}. Load it into a fresh "
            "copy of the base model (or rankwise.lora.unload(model) first)"
        )
    residual = [name for name, layer in lora_layers(model) if initial_factors(layer) is not None]
    if (residual or config.initializer in RESIDUAL_INITIALIZERS) and not same_residual(
        model, config
    ):
        # the base weights hold W - s·B0 A0 of the current adapter's init (or must hold the
        # new one's): swapping only the factors would pair them with the wrong base
        which = (
            f"the model's adapter changed the base weights ({residual[0]!r}"
            f"{' and more' if len(residual) > 1 else ''}: a residual initializer)"
            if residual
            else f"the file's init_lora_weights={config.init_lora_weights!r} needs its own "
            "residual base weights"
        )
        raise AdapterFormatError(
            f"load_adapter: cannot swap adapters in place: {which}. Load it into a fresh copy "
            "of the base model"
        )
    check_same_modules(model, config)
    for name, layer in lora_layers(model):
        r, _ = config.rank_and_alpha(name)
        if r != layer.r:
            raise ShapeMismatchError(
                f"{name}: the adapter config gives r={r}, the model's layer has r={layer.r}"
            )
    return {k: tuple(v.shape) for k, v in adapter_state_dict(model, bias=config.bias).items()}


def same_residual(model: nn.Module, config: LoraConfig) -> bool:
    """The file's adapter would leave the base weights as the model's adapter did: the same
    residual initializer at the same rank and scale on every layer (another checkpoint of the
    same run, say), so its factors belong with the residual already there."""
    current = get_state(model).config
    if current.initializer != config.initializer or config.initializer == "lora_ga":
        return False
    for name, layer in lora_layers(model):
        r, alpha = config.rank_and_alpha(name)
        if r != layer.r or config.scaling(r=r, alpha=alpha) != layer.scaling:
            return False
    return True


def check_same_modules(model: nn.Module, config: LoraConfig) -> None:
    """A swap in place needs the file's config to select the modules the model has adapters
    on (and keeps in full): otherwise the attached config would describe other modules than
    the weights, and a later save would write an adapter no loader reads back the same."""
    names, save_names, _ = selected_names(model, config, unwrapped_modules(model), strict=False)
    state = get_state(model)
    for what, want, have in (
        ("adapts", set(names), {n for n, _ in lora_layers(model)}),
        ("keeps in full (modules_to_save)", set(save_names), set(state.modules_to_save)),
    ):
        if want != have:
            diff = [f"also {few(sorted(want - have))}"] if want - have else []
            diff += [f"not {few(sorted(have - want))}"] if have - want else []
            raise AdapterFormatError(
                f"load_adapter: the adapter's config {what} other modules than the model's "
                f"adapters: {', '.join(diff)}; load it into the base model "
                "(rankwise.lora.unload(model) first)"
            )


def base_keys(model: nn.Module, keys: object) -> frozenset[str]:
    """The keys among ``keys`` that are base-model tensors: not LoRA factors, not
    modules_to_save (biases of ``bias="all"``/``"lora_only"``, whole embedding weights)."""
    kept = tuple(m + "." for m in get_state(model).modules_to_save)
    return frozenset(k for k in keys if ".lora_" not in k and not k.startswith(kept))  # type: ignore[attr-defined]


def check_base_kept(model: nn.Module, values: dict[str, Tensor], *, source: Path) -> None:
    """A swap must overwrite every base tensor the current adapter changed (trained or loaded
    biases, whole embeddings): otherwise the old adapter's values would stay in the model."""
    state = get_state(model)
    changed = state.base_written | base_keys(model, adapter_state_dict(model))
    left = sorted(changed - base_keys(model, values))
    if left:
        raise AdapterFormatError(
            f"load_adapter: the model's adapter (bias={state.config.bias!r}) changed base "
            f"tensors {few(left)} that {source} does not set; swapping in place would keep the "
            "old values. Load it into a fresh copy of the base model"
        )


def set_layer_scales(model: nn.Module, config: LoraConfig) -> None:
    for name, layer in lora_layers(model):
        r, alpha = config.rank_and_alpha(name)
        layer.lora_alpha = alpha
        layer.scaling = config.scaling(r=r, alpha=alpha)
        layer.set_dropout(config.lora_dropout)


def adopt_config(model: nn.Module, config: LoraConfig, *, is_trainable: bool) -> None:
    """Give the model's adapters the file's ``config`` before its values are copied in: each
    layer's alpha, scale and dropout, the biases it trains, and the config itself."""
    set_layer_scales(model, config)
    # a file training more biases than the injection did (bias "all" into "none"):
    # their values before the copy are the base ones disable_adapters shows
    state = get_state(model)
    layers = [name for name, _ in lora_layers(model)]
    state.originals.update(trained_biases(model, config.bias, layers, state.originals))
    # files do not record LoRA-FA (PEFT has no such field): A stays frozen as it was
    lora_fa = state.config.use_lora_fa
    replace_state_config(
        model, config.replace(inference_mode=not is_trainable, use_lora_fa=lora_fa)
    )
