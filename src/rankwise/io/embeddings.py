"""The full embedding weights PEFT writes beside an adapter, and reads back.

PEFT 0.21.2 ``save_pretrained`` (``save_embedding_layers="auto"``) also writes the whole input
and output embedding of a transformers model when the config targets a module named
``embed_tokens`` or ``lm_head`` — under ``<module>.base_layer.<key>`` for the adapted layer —
or, when the embedding is not adapted, when the vocabulary was resized against the base model
(``<module>.<key>``). Loading copies them into the base layer. rankwise writes and reads the
same keys; only the model's input/output embeddings may carry them.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from torch import Tensor, nn

from rankwise.lora.config import LoraConfig
from rankwise.lora.layers import LoraLayer

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES


def embeddings_targeted(model: nn.Module, config: LoraConfig) -> bool:
    """PEFT's test: a list of targets naming ``embed_tokens``/``lm_head`` literally, or a
    regex (not ``all-linear``) that full-matches a module whose name ends in one of them."""
    targets = config.target_modules
    if isinstance(targets, str):
        if targets == "all-linear":
            return False
        ends = re.compile(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$")
        return any(
            re.fullmatch(targets, name) for name, _ in model.named_modules() if ends.match(name)
        )
    return bool(targets) and any(e in targets for e in EMBEDDING_LAYER_NAMES)


def _vocab_resized(model: nn.Module, config: LoraConfig) -> bool:
    """The model's vocabulary differs from the one of ``base_model_name_or_path``'s config
    (a local directory only: no network here; PEFT, too, assumes "not resized" when it
    cannot tell)."""
    model_config = getattr(model, "config", None)
    vocab = getattr(model_config, "vocab_size", None)
    path = config.base_model_name_or_path
    if not vocab or not path:
        return False
    local = Path(path) / "config.json"
    found = str(local) if local.is_file() else _cached_hub_config(path)
    if found is None:
        warnings.warn(
            f"save_embedding_layers='auto': no config.json found for base_model_name_or_path "
            f"{path!r} (not a local directory, not in the Hugging Face cache); assuming the "
            "vocabulary was not resized. If it was, save with save_embedding_layers=True",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    return vocab != type(model_config).from_pretrained(str(Path(found).parent)).vocab_size


def _cached_hub_config(repo_id: str) -> str | None:
    """The path of a hub model's ``config.json`` in the local Hugging Face cache, or None
    (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id=repo_id, filename="config.json")
    except Exception:  # an id the hub would refuse (e.g. a path that does not exist)
        return None
    return hit if isinstance(hit, str) else None


def _io_embeddings(model: nn.Module) -> list[nn.Module]:
    out = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(layer, nn.Module):
            out.append(layer)
    return out


def _module_name(model: nn.Module, layer: nn.Module, targeted: bool) -> str | None:
    """PEFT's ``get_embedding_layer_name``: the base layer of an adapted embedding, or (when
    embeddings are not targeted) the layer itself."""
    base = layer.base_layer if isinstance(layer, LoraLayer) else None
    for name, module in model.named_modules():
        if (not targeted and module is layer) or (base is not None and module is base):
            return name
    return None


def embedding_state(
    model: nn.Module, config: LoraConfig, save_embedding_layers: bool | str
) -> dict[str, Tensor]:
    """The embedding tensors :func:`~rankwise.io.save_adapter` adds to the file (PEFT's rule)."""
    if save_embedding_layers not in (True, False, "auto"):
        raise ValueError(
            f"save_embedding_layers: expected True, False or 'auto', found {save_embedding_layers!r}"
        )
    targeted = embeddings_targeted(model, config)
    if save_embedding_layers == "auto":
        save_embedding_layers = targeted or _vocab_resized(model, config)
    if not save_embedding_layers:
        return {}
    layers = _io_embeddings(model)
    if not layers:
        warnings.warn(
            "save_embedding_layers: the model has no get_input_embeddings/get_output_embeddings "
            "(not a transformers model); no embedding weights written",
            stacklevel=3,
        )
    full = model.state_dict(keep_vars=True)
    out: dict[str, Tensor] = {}
    for layer in layers:
        if targeted and not isinstance(layer, LoraLayer):
            continue  # as PEFT: only an adapted embedding's base layer, when targeted
        name = _module_name(model, layer, targeted)
        if name:
            out.update({k: v for k, v in full.items() if k.startswith(name + ".")})
            if isinstance(layer, LoraLayer) and layer.merged:
                # the live weight holds W0 + s·B A; the file's base must be W0 (the factors
                # are saved too: a loader adds them again). ``name`` is the base layer's when
                # embeddings are targeted, else the wrapper's, whose key has "base_layer."
                inner = "" if model.get_submodule(name) is layer.base_layer else "base_layer."
                out[f"{name}.{inner}weight"] = layer.planned_weight("unmerge")
    return out


def optional_embedding_shapes(
    model: nn.Module, targets: set[str] | None = None
) -> dict[str, tuple[int, ...]]:
    """Keys a file may add for the model's input/output embeddings, with their shapes.

    ``targets``: module names about to be adapted (a plain model being injected); in an
    injected model the adapted embeddings are the wrappers. An adapted embedding's keys are
    ``<module>.base_layer.<key>``, a plain one's ``<module>.<key>``.
    """
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, tuple[int, ...]] = {}
    for layer in _io_embeddings(model):
        name = names.get(id(layer))
        if name is None:
            continue
        if isinstance(layer, LoraLayer):
            prefix, base = f"{name}.base_layer.", layer.base_layer
        elif targets is not None and name in targets:
            prefix, base = f"{name}.base_layer.", layer
        else:
            prefix, base = f"{name}.", layer
        out.update({prefix + k: tuple(v.shape) for k, v in base.state_dict().items()})
    return out
