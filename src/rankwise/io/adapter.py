"""Save and load LoRA adapters in PEFT's on-disk format, exactly.

A directory holds ``adapter_config.json`` (see :mod:`rankwise.io.config_json`) and
``adapter_model.safetensors`` whose keys are ``base_model.model.`` + the model's own state
names: ``<module>.lora_A.weight`` / ``.lora_B.weight``, embeddings
``<module>.lora_embedding_A`` / ``_B``, ``modules_to_save`` under their original keys and
biases per the bias mode (PEFT 0.21.2 ``get_peft_model_state_dict``). PEFT's extra copies of
``modules_to_save`` (``<m>.modules_to_save.<k>``, ``<m>.original_module.<k>``, written with
``bias="all"``) are understood on reading.

Loading checks everything first — config, file header, every key and shape, every value
finite (:mod:`rankwise.io.adapter_keys`) — and only then injects (if needed) and copies, so a
bad adapter leaves the model as it was. A model that already has adapters of the same shapes
gets its weights swapped in place (:mod:`rankwise.io.swap`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from rankwise.errors import AdapterFormatError, ConfigError, InjectionError
from rankwise.io.adapter_keys import (
    A_KEY,
    B_KEY,
    PICKLE_NAME,
    PREFIX,
    WEIGHTS_NAME,
    check_aliases,
    check_keys,
    check_materialized,
    check_values,
    copy_in,
    rank_pattern_hint,
    rename_keys,
    target_dtypes,
)
from rankwise.io.config_json import CONFIG_NAME, read_adapter_config, write_adapter_config
from rankwise.io.embeddings import embedding_state, optional_embedding_shapes
from rankwise.io.files import read_header, read_tensors, replaced_dir, write_safetensors
from rankwise.io.swap import adopt_config, base_keys, check_base_kept, expected_for_swap
from rankwise.lora.adalora import AdaLoraConfig, truncate_to_rank_pattern
from rankwise.lora.config import RESIDUAL_INITIALIZERS, LoraConfig
from rankwise.lora.init_svd import initial_factors, original_base_config, original_base_factors
from rankwise.lora.inject import (
    STATE_ATTR,
    apply_plan,
    check_wrappers,
    get_config,
    get_state,
    lora_layers,
    set_trainable,
)
from rankwise.lora.state import adapter_state_dict, planned_shapes
from rankwise.lora.targets import Plan, resolve

__all__ = [
    "A_KEY",
    "B_KEY",
    "PICKLE_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "adapter_weights_file",
    "load_adapter",
    "needs_original_base",
    "peft_cannot_rebuild",
    "save_adapter",
]


def peft_cannot_rebuild(model: nn.Module) -> str | None:
    """Why PEFT 0.21.2 cannot rebuild the residual base of ``model``'s PiSSA/OLoRA adapter
    from a plain save, or None: it refuses those inits on convolutions, and its OLoRA ignores
    a ``Conv1D`` layer's transposed weight (GPT-2: factors of the wrong shapes)."""
    config = get_config(model)
    if config.initializer not in RESIDUAL_INITIALIZERS:
        return None
    layers = list(lora_layers(model))
    convs = [name for name, layer in layers if layer.kind == "conv"]
    if convs:
        more = " and more" if len(convs) > 1 else ""
        return (
            f"init_lora_weights={config.init_lora_weights!r} on convolution layers "
            f"({convs[0]!r}{more}): PEFT refuses that init on convolutions"
        )
    transposed = [name for name, layer in layers if getattr(layer, "fan_in_fan_out", False)]
    if config.initializer == "olora" and transposed:
        more = " and more" if len(transposed) > 1 else ""
        return (
            f"OLoRA on Conv1D layers ({transposed[0]!r}{more}): PEFT's OLoRA ignores their "
            "transposed weight (factors of the wrong shapes)"
        )
    return None


def needs_original_base(model: nn.Module) -> bool:
    """Whether a plain save of ``model``'s adapter is one PEFT cannot use as trained: LoRA-GA
    (its plain save is refused), randomized PiSSA (PEFT draws its own residual) and what
    :func:`peft_cannot_rebuild` names; those are saved ``for_original_base``. Never for
    DoRA: its magnitudes depend on the base weight itself and cannot be re-expressed, so the
    plain save (with its warning) is the one there is."""
    config = get_config(model)
    if config.use_dora:
        return False
    return config.initializer in ("lora_ga", "pissa") or peft_cannot_rebuild(model) is not None


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    for_original_base: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> Path:
    """Write ``model``'s adapter to ``directory`` (created if needed) in PEFT's format.

    Returns the directory. Both files change together: they are written into a temporary
    directory beside ``directory`` (holding links to the files already there, which are kept)
    that is then swapped in atomically, so a crash leaves the old adapter or the new one, never
    new weights with an old config. A merged model is saved with
    its factors (merging does not change ``A`` and ``B``). AdaLoRA adapters are written in
    PEFT's ``ADALORA`` format, each layer cut to the triplets ``rank_pattern`` keeps.

    ``for_original_base=True`` (PiSSA, OLoRA, LoRA-GA, which moved ``s·B0 A0`` out of the
    base weight) writes a plain LoRA of rank ``2r`` relative to the *unmodified* base:
    ``ΔW = s (B A - B0 A0) = s [B | -B0] [A ; A0]``, ``r`` and ``lora_alpha`` doubled (PEFT's
    ``path_initial_model_for_weight_conversion``), which PEFT loads on the original model.

    ``save_embedding_layers`` (PEFT's argument and rule): also write the full input/output
    embedding weights — ``"auto"`` does when the config targets a module named
    ``embed_tokens``/``lm_head`` (the adapted layer's base weight) or when the vocabulary
    differs from the one of a local ``base_model_name_or_path``.

    A ``torch.compile``d model is saved as the model it wraps (as PEFT does): its module
    names carry no ``_orig_mod.``.
    """
    model = _uncompiled(model)
    config = get_config(model)
    if config.base_model_name_or_path is None:  # as PEFT: the model's own name_or_path, if any
        config = config.replace(base_model_name_or_path=model.__dict__.get("name_or_path") or None)
    auto_mapping = None
    if config.task_type is None:  # as PEFT: how to rebuild the base model class
        cls = type(model)
        auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    _check_saveable(model, config, for_original_base)
    out = Path(directory)
    state = {**embedding_state(model, config, save_embedding_layers), **adapter_state_dict(model)}
    if isinstance(config, AdaLoraConfig) and config.rank_pattern:
        state = truncate_to_rank_pattern(state, config.rank_pattern)
    if for_original_base:
        state, config = _for_original_base(model, state, config)
    tensors = {PREFIX + k: v for k, v in state.items()}
    with replaced_dir(out) as tmp:  # both files change together; other files are kept
        write_safetensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        write_adapter_config(tmp, config, auto_mapping=auto_mapping)
    return out


def _check_saveable(model: nn.Module, config: LoraConfig, for_original_base: bool) -> None:
    """Refuse a plain save of a LoRA-GA adapter (no loader can rebuild its base); warn when PEFT
    would rebuild another residual base than rankwise's (randomized PiSSA, OLoRA on Conv1D,
    PiSSA/OLoRA on convolutions) and the adapter is not saved for the original base."""
    if not for_original_base and config.initializer == "lora_ga":
        raise ConfigError(
            "save_adapter: a LoRA-GA adapter moved s·B0 A0 (from gradients) out of the base "
            "weight, which no loader can rebuild from the file; save it with "
            "for_original_base=True (a plain LoRA on the unmodified base)"
        )
    if not for_original_base and config.initializer == "pissa":
        warnings.warn(
            "save_adapter: a randomized-PiSSA adapter (init_lora_weights='pissa') is written "
            "for a base whose residual comes from a randomized SVD: rankwise.load_adapter "
            "rebuilds it exactly (fixed seed), PEFT draws its own and predicts differently; "
            + (
                "a DoRA adapter has no for_original_base form: for PEFT use init 'pissa_exact'"
                if config.use_dora
                else "for PEFT save with for_original_base=True, or use init 'pissa_exact'"
            ),
            RuntimeWarning,
            stacklevel=3,
        )
    if isinstance(config, AdaLoraConfig):
        conv1d = [n for n, layer in lora_layers(model) if isinstance(layer.base_layer, nn.Conv1d)]
        if conv1d:
            more = " and more" if len(conv1d) > 1 else ""
            warnings.warn(
                f"save_adapter: AdaLoRA on nn.Conv1d ({conv1d[0]!r}{more}): PEFT's AdaLoRA has "
                "no Conv1d layer and cannot load this file (rankwise.load_adapter can)",
                RuntimeWarning,
                stacklevel=3,
            )
    reason = None if for_original_base else peft_cannot_rebuild(model)
    if reason is not None:
        warnings.warn(
            f"save_adapter: {reason} and cannot load this file (rankwise.load_adapter can); "
            + (
                "a DoRA adapter has no for_original_base form, so PEFT cannot use it"
                if config.use_dora
                else "for PEFT save with for_original_base=True (a plain LoRA)"
            ),
            RuntimeWarning,
            stacklevel=3,
        )


def load_adapter(
    model: nn.Module, directory: str | Path, *, is_trainable: bool = False
) -> nn.Module:
    """Load the adapter in ``directory`` (written by rankwise or PEFT) into ``model``.

    A plain model gets adapters injected as the config says; a model that already has
    adapters of the same names and shapes gets its weights (and alpha/scaling) swapped in
    place. ``is_trainable=False`` (as PEFT) freezes every parameter and puts the model in eval
    mode. Raises AdapterFormatError / ShapeMismatchError (InjectionError when the config
    selects no module of ``model``) with the model unchanged. A ``torch.compile``d model gets
    the adapter in the model it wraps (the file's module names carry no ``_orig_mod.``, as
    :func:`save_adapter` writes them); the wrapper is returned. Files replaced while they are
    read (another process saving there) are read again, so the config and the weights loaded
    are always one save's.
    """
    wrapper, model = model, _uncompiled(model)
    directory = Path(directory)
    check_materialized(model)
    for _ in range(READ_ATTEMPTS):  # a save swapping the files in between: read them again
        before = _identity(directory)
        config, plan, values = _read_checked(model, directory, is_trainable)
        if _identity(directory) == before:
            break
    else:
        raise AdapterFormatError(
            f"{directory}: its files changed while being read, {READ_ATTEMPTS} times (another "
            "process saving to it?); load it once the save is done"
        )
    if plan is not None:
        try:
            apply_plan(model, plan, generator=torch.Generator().manual_seed(0), values_follow=True)
        except InjectionError as err:  # an initializer refusing the file's config: name it
            raise InjectionError(f"{directory}: {err}") from None
    else:
        adopt_config(model, config, is_trainable=is_trainable)
    copy_in(model, values)
    get_state(model).base_written = base_keys(model, values)
    set_trainable(model, trainable=is_trainable)
    if not is_trainable:
        wrapper.eval()
    return wrapper


# reads of a directory another process keeps replacing before load_adapter gives up
READ_ATTEMPTS = 3


def _identity(directory: Path) -> tuple[tuple[int, ...], ...]:
    """The directory's (device, inode) and its two files' (device, inode, size, mtime): a save
    in between (a swapped directory, a file replaced in place) changes it; other files coming
    and going in the directory (logs) do not. Missing: empty."""

    def of(path: Path, *, whole: bool = True) -> tuple[int, ...]:
        try:
            st = path.stat()
        except OSError:
            return ()
        return (
            (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if whole else (st.st_dev, st.st_ino)
        )

    return of(directory, whole=False), of(directory / CONFIG_NAME), of(directory / WEIGHTS_NAME)


def _read_checked(
    model: nn.Module, directory: Path, is_trainable: bool
) -> tuple[LoraConfig, Plan | None, dict[str, Tensor]]:
    """The file's config, the injection plan (None: a swap in place) and the values to copy,
    every check passed; reads only, the model untouched."""
    config = read_adapter_config(directory)
    if config.initializer == "lora_ga":
        raise AdapterFormatError(
            f"{directory}: init_lora_weights='lora_ga': the base weight it was trained on had "
            "s·B0 A0 (from gradients) taken out, which cannot be rebuilt from the file; save "
            "LoRA-GA adapters for the original base (save_adapter(..., for_original_base=True))"
        )
    weights = adapter_weights_file(directory)
    _warn_peft_randomized_pissa(directory, config)
    header = read_header(weights)
    renamed, aliases = rename_keys(header, source=weights)
    if config.use_dora and not any(k.endswith(".lora_magnitude_vector") for k in renamed):
        raise AdapterFormatError(
            f"{weights}: the config sets use_dora=True but the file holds no "
            "lora_magnitude_vector (not a DoRA adapter)"
        )
    injected = hasattr(model, STATE_ATTR)
    if injected and get_state(model).swapped:
        # the block shows stand-ins for modules_to_save and trained biases: values loaded into
        # them would be dropped when the block puts the trained tensors back
        raise AdapterFormatError(
            f"{directory}: the model is inside disable_adapters(); load the adapter after the block"
        )
    if injected:
        expected = expected_for_swap(model, config)
        plan = None
    else:
        plan = resolve(model, config.replace(inference_mode=not is_trainable), strict=False)
        check_wrappers(plan)  # e.g. DoRA on a convolution: InjectionError naming it
        expected = planned_shapes(model, plan)
    found = {k: header[f].shape for k, f in renamed.items()}
    # PEFT also writes whole input/output embeddings (save_embedding_layers): optional keys
    targets = None if plan is None else {t.name for t in plan.targets}
    optional = optional_embedding_shapes(model, targets)
    expected.update({k: v for k, v in optional.items() if k in found and k not in expected})
    check_keys(expected, found, source=weights, hint=rank_pattern_hint(config))
    tensors = read_tensors(weights, [*renamed.values(), *(k for v in aliases.values() for k in v)])
    values = {k: tensors[f] for k, f in renamed.items()}
    check_aliases(values, aliases, tensors, source=weights)
    check_values(values, target_dtypes(model, plan, values), source=weights)
    if plan is None:
        check_base_kept(model, values, source=weights)
    return config, plan, values


def _warn_peft_randomized_pissa(directory: Path, config: LoraConfig) -> None:
    """A randomized-PiSSA file PEFT wrote (it records ``peft_version``; rankwise does not):
    its residual base came from PEFT's own random draw, which the file does not hold, so the
    one rebuilt here differs (logits 0.15 off on a tiny Llama, as PEFT's own reload under
    another seed). rankwise's own such files are rebuilt exactly (a fixed seed)."""
    if config.initializer != "pissa":
        return
    try:
        written = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # read_adapter_config has just read it; nothing to add
    if isinstance(written, dict) and "peft_version" in written:
        warnings.warn(
            f"{directory}: a randomized-PiSSA adapter written by PEFT "
            f"(init_lora_weights={written.get('init_lora_weights')!r}): its residual base came "
            "from a random draw the file does not record, and the one rebuilt here differs, "
            "so predictions differ from the model that saved it; in PEFT, save it with "
            "path_initial_model_for_weight_conversion (a plain LoRA on the original base)",
            RuntimeWarning,
            stacklevel=3,
        )


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else ``model``."""
    inner = model.__dict__.get("_modules", {}).get("_orig_mod")
    return (
        inner
        if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule"
        else model
    )


def _for_original_base(
    model: nn.Module, state: dict[str, Tensor], config: LoraConfig
) -> tuple[dict[str, Tensor], LoraConfig]:
    """The rank-2r factors relative to the original base (see :func:`save_adapter`)."""
    if config.parametrization != "vanilla":
        raise ConfigError(
            f"for_original_base: {config.parametrization} adapters depend on the base weight "
            "itself and cannot be re-expressed as a plain LoRA on the original base"
        )
    out = dict(state)
    for name, layer in lora_layers(model):
        A, B = (t.detach() for t in layer.factors())  # (r, in), (out, r)
        init = initial_factors(layer)  # None: the base was not changed (B0 A0 = 0)
        A0, B0 = init if init is not None else (torch.zeros_like(A), torch.zeros_like(B))
        A2, B2 = original_base_factors(A, B, A0, B0)  # (2r, in), (out, 2r)
        (key_a, shape_a), (key_b, shape_b) = (
            type(layer).factor_shapes(layer.base_layer, 2 * layer.r).items()
        )
        out[f"{name}.{key_a}"] = A2.reshape(shape_a)
        out[f"{name}.{key_b}"] = B2.reshape(shape_b)
        base_key = f"{name}.base_layer.weight"  # a targeted embedding/lm_head's, if written
        if init is not None and base_key in out:  # the residual W - s·B0 A0: W again
            out[base_key] = layer.shifted_base_weight(+1, out[base_key])
    return out, original_base_config(config)


def adapter_weights_file(directory: Path) -> Path:
    """The adapter's ``adapter_model.safetensors`` in ``directory``; an AdapterFormatError when
    it is missing, with an explanation when only a pickle ``adapter_model.bin`` is there."""
    path = directory / WEIGHTS_NAME
    if path.is_file():
        return path
    if (directory / PICKLE_NAME).exists():
        raise AdapterFormatError(
            f"{directory}: holds only {PICKLE_NAME}, a pickle; rankwise never unpickles (it can "
            "run arbitrary code). Convert it with PEFT (save_pretrained(..., "
            "safe_serialization=True)) in a process you trust"
        )
    raise AdapterFormatError(f"{directory}: no {WEIGHTS_NAME}")
