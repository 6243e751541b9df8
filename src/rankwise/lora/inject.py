"""Inject LoRA adapters into a model in place: resolve, check, initialize, then swap modules.

Nothing is changed until every target is resolved, its wrapper built and its factors
initialized; then each target module is replaced by its wrapper in one pass, parameters are
frozen except the adapters (plus ``modules_to_save`` and the chosen bias mode), and the
effective :class:`LoraConfig` is attached to the model as ``model._rankwise_lora.config``
(read it with :func:`get_config`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, overload

import torch
from torch import Tensor, nn

from rankwise.errors import ConfigError, InjectionError, RankwiseError
from rankwise.lora.config import LoraConfig
from rankwise.lora.init_svd import record_initial_factors
from rankwise.lora.initializers import (
    FILE_REPLACED,
    INITIALIZERS,
    WEIGHT_READING,
    as_generator,
    placeholder_init,
)
from rankwise.lora.layers import LoraLayer
from rankwise.lora.registry import WRAPPERS
from rankwise.lora.targets import Plan, Target, check_ranks, resolve, warn_aliased_targets

STATE_ATTR = "_rankwise_lora"
# LoRA-FA (Zhang et al. 2023): the down-projection A is frozen, only B (and the rest) train
LORA_FA_FROZEN = ("lora_A", "lora_embedding_A")


@dataclass
class LoraState:
    """What injection attached to the model (``model._rankwise_lora``).

    ``config``: the effective config; ``modules_to_save``: qualified names trained in full;
    ``requires_grad``: every parameter's flag before injection, by name (restored by unload
    to whatever parameter holds that name then: ``load_state_dict(assign=True)`` or a dtype
    conversion may have replaced the objects);
    ``originals``: copies of the modules_to_save tensors at injection (for disable_adapters);
    ``base_written``: base-model tensors (biases, whole embeddings) the loaded file set;
    ``swapped``: inside :func:`~rankwise.lora.disable_adapters`, the trained modules_to_save
    tensors its injection-time ones stand in for (empty otherwise).
    """

    config: LoraConfig
    modules_to_save: tuple[str, ...]
    requires_grad: dict[str, bool] = field(default_factory=dict)
    originals: dict[str, Tensor] = field(default_factory=dict)
    base_written: frozenset[str] = frozenset()
    swapped: dict[str, Tensor] = field(default_factory=dict)


def parametrization_name(config: LoraConfig) -> str:
    """Row of :data:`WRAPPERS` for ``config`` (``"vanilla"``, ``"dora"``, ``"adalora"``)."""
    return config.parametrization


@overload
def inject(
    model: nn.Module,
    config: LoraConfig,
    *,
    dry_run: Literal[False] = ...,
    generator: torch.Generator | int | None = ...,
) -> nn.Module: ...
@overload
def inject(
    model: nn.Module,
    config: LoraConfig,
    *,
    dry_run: Literal[True],
    generator: torch.Generator | int | None = ...,
) -> list[str]: ...
def inject(
    model: nn.Module,
    config: LoraConfig,
    *,
    dry_run: bool = False,
    generator: torch.Generator | int | None = None,
) -> nn.Module | list[str]:
    """Add LoRA adapters to ``model`` in place and return it.

    ``h = W0 x + s · B A x`` on every module ``config`` selects (Hu et al. 2021). With
    ``dry_run=True`` the matched module names are returned and the model is not touched.
    ``generator`` (or a seed) makes the random initial factors reproducible.
    Raises :class:`InjectionError` (nothing changed) for unknown or unsupported targets or a
    model that already has adapters.
    """
    if not isinstance(config, LoraConfig):
        raise InjectionError(
            f"config: expected a rankwise LoraConfig, found {type(config).__name__}"
        )
    if config.initializer == "lora_ga":  # B = 0, the base as it is: nothing of LoRA-GA
        raise ConfigError(
            "init_lora_weights='lora_ga' initializes from gradients on training batches: call "
            "rankwise.lora_ga_init(model, config, batches, ...) instead of inject"
        )
    plan = resolve(model, config)
    check_ranks(model, plan)
    if dry_run:
        return [t.name for t in plan.targets]
    apply_plan(model, plan, generator=as_generator(generator))
    return model


def apply_plan(
    model: nn.Module,
    plan: Plan,
    *,
    generator: torch.Generator | None,
    values_follow: bool = False,
) -> None:
    """Build and initialize every wrapper, then swap them in and set the trainable flags.
    ``values_follow``: the caller copies every factor in next (a loaded file), so an
    initializer that does not move the base weight is not run (zero placeholders)."""
    modules = dict(model.named_modules())
    cfg = plan.config
    check_wrappers(plan)
    warn_aliased_targets(model, plan)
    # every wrapper built and initialized first; residual base weights are written only after
    built = {
        t.name: _build(modules[t.name], t, cfg, generator, values_follow=values_follow)
        for t in plan.targets
    }
    check_residual_untied(
        model, [n for n, (_, residual) in built.items() if residual is not None], cfg
    )
    for name, others in tied_weights(model, list(built)).items():
        # transformers' save_pretrained (Trainer checkpoints) drops a tied copy only under a
        # name its _tied_weights_keys patterns match, read from every submodule: the wrapped
        # name is declared here, else saving fails with "shared tensors ... not properly
        # defined" (GPT-2's lm_head, tied to wte, as a target)
        built[name][0]._tied_weights_keys = {"base_layer.weight": others[0]}
    untied = _untie_modules_to_save(model, plan.modules_to_save)
    if untied:
        _record_untied_embeddings(model)
    state = LoraState(
        config=cfg,
        modules_to_save=plan.modules_to_save,
        requires_grad={
            n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)
        },
        originals={
            f"{m}.{k}": v.detach().clone()
            for m in plan.modules_to_save
            for k, v in modules[m].state_dict().items()
        },
    )
    for name, (wrapper, residual) in built.items():
        if residual is not None:
            wrapper.set_base_matrix(residual)  # PiSSA/OLoRA: W_res = W - s·B0 A0
        _set_submodule(model, name, wrapper)
    state.originals.update(trained_biases(model, cfg.bias, list(built), state.originals))
    object.__setattr__(model, STATE_ATTR, state)
    set_trainable(model, trainable=not cfg.inference_mode)


def trained_biases(
    model: nn.Module, mode: str, targets: list[str], recorded: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Copies of the biases ``bias="all"`` (every ``*.bias``) or ``"lora_only"`` (the adapted
    layers') trains, under their names in the wrapped model, for
    :func:`~rankwise.lora.disable_adapters` to show the base model (those of ``recorded``,
    the modules_to_save, are there already)."""
    if mode == "none":
        return {}
    if mode == "lora_only":
        wanted = {f"{t}.base_layer.bias" for t in targets}
    else:
        wanted = None
    params = list(model.named_parameters(remove_duplicate=False))
    trained = {  # every name of a shared bias: each owner gets its stand-in in the block
        id(p)
        for name, p in params
        if name.rsplit(".", 1)[-1] == "bias" and (wanted is None or name in wanted)
    }
    return {
        name: p.detach().clone() for name, p in params if id(p) in trained and name not in recorded
    }


def tied_weights(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """For each module in ``names`` whose ``weight`` is shared with a parameter of another
    module (GPT-2's ``lm_head`` tied to ``wte``): the other owners' parameter names."""
    owners: dict[int, list[str]] = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(full)
    out: dict[str, list[str]] = {}
    for name in names:
        module = model.get_submodule(name)
        weight = module.base_weight if isinstance(module, LoraLayer) else module.weight
        others = [n for n in owners.get(id(weight), []) if not n.startswith(name + ".")]
        if others:
            out[name] = others
    return out


def check_residual_untied(model: nn.Module, names: list[str], cfg: LoraConfig) -> None:
    """Refuse a residual initializer (PiSSA, OLoRA, LoRA-GA: ``W0 - s·B0 A0`` written into the
    base weight) on a weight shared with another module: the write would change that module
    too, so the output at step 0 would not be the base model's and an adapter re-expressed for
    the original base would not reproduce the trained model."""
    tied = tied_weights(model, names)
    if tied:
        name, others = next(iter(tied.items()))
        raise InjectionError(
            f"{name}: its weight is shared with {others}; init_lora_weights="
            f"{cfg.init_lora_weights!r} writes a residual into it, which would change those "
            f"modules too. Leave {name!r} out of target_modules, untie the weights, or use "
            "an initializer that keeps the base weight (init_lora_weights=True)"
        )


def _untie_modules_to_save(model: nn.Module, names: list[str]) -> list[tuple[nn.Parameter, bool]]:
    """Give each ``modules_to_save`` parameter that is shared with a module outside it (GPT-2's
    ``lm_head`` tied to ``wte``) its own copy, so training or loading the saved module leaves
    the other one as it was — PEFT trains a copy of the module. Returns the new parameters with
    their flags (``unload`` restores flags by name; the module keeps its trained, untied copy,
    as PEFT's)."""
    owners: dict[int, list[str]] = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(full)
    out: list[tuple[nn.Parameter, bool]] = []
    for name in names:  # each saved module its own copy (two tied saved modules train apart)
        clones: dict[int, nn.Parameter] = {}
        for sub in model.get_submodule(name).modules():
            for key, p in list(sub._parameters.items()):
                if p is None or all(o.startswith(name + ".") for o in owners[id(p)]):
                    continue
                if id(p) not in clones:
                    clones[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    out.append((clones[id(p)], p.requires_grad))
                setattr(sub, key, clones[id(p)])
    return out


def _record_untied_embeddings(model: nn.Module) -> None:
    """After untying a saved input/output embedding, say so in a transformers config
    (``tie_word_embeddings=False``): otherwise a merged model saved with ``save_pretrained`` is
    re-tied on loading by transformers versions that honour the flag, losing the trained one."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return
    weights = [getattr(m, "weight", None) for m in (inputs, outputs)]
    if all(isinstance(w, torch.Tensor) for w in weights) and weights[0] is not weights[1]:
        config.tie_word_embeddings = False


def check_wrappers(plan: Plan) -> None:
    """InjectionError naming the first target whose layer type the parametrization lacks."""
    row = WRAPPERS.get(parametrization_name(plan.config), {})
    for t in plan.targets:
        if t.kind not in row:
            raise InjectionError(
                f"{t.name}: {parametrization_name(plan.config)} adapters support "
                f"{sorted(row)} layers, not {t.kind!r}; exclude it from target_modules"
            )


def _build(
    base: nn.Module,
    target: Target,
    cfg: LoraConfig,
    g: torch.Generator | None,
    *,
    values_follow: bool = False,
) -> tuple[LoraLayer, Tensor | None]:
    """The initialized wrapper and the residual base weight to write (or None)."""
    cls = WRAPPERS[parametrization_name(cfg)][target.kind]
    # The factor modules (nn.Linear / conv) draw their default init from torch's global RNG;
    # the initializer overwrites it below. Restoring the state keeps inject (and load_adapter)
    # from advancing the global stream by an amount that depends on r and the targets.
    with torch.random.fork_rng(devices=[]):
        layer = cls(
            base,
            r=target.r,
            lora_alpha=target.lora_alpha,
            scaling=cfg.scaling(r=target.r, alpha=target.lora_alpha),
            lora_dropout=cfg.lora_dropout,
        )
    layer.train(base.training)
    replaced = values_follow and cfg.initializer in FILE_REPLACED
    init = placeholder_init if replaced else INITIALIZERS[cfg.initializer]
    with torch.no_grad():
        W = layer.base_matrix().detach()  # (out, in)
        finite = cfg.initializer not in WEIGHT_READING or bool(torch.isfinite(W).all())
        if not finite:  # counted only then: a passing check is one pass over W
            bad = int((~torch.isfinite(W)).sum())
            raise InjectionError(
                f"{target.name}: the base weight holds {bad} NaN/inf entries; "
                f"init_lora_weights={cfg.init_lora_weights!r} factors it, so it needs a "
                "finite weight (is the checkpoint broken?)"
            )
        try:
            result = init(
                W, r=layer.r, scaling=layer.scaling, embedding=layer.kind == "embedding",
                generator=g,
            )  # fmt: skip
        except RankwiseError:  # already rankwise's own, naming what it found
            raise
        except ValueError as err:  # e.g. OLoRA's r above min(out, in) from a file's config
            raise InjectionError(f"module {target.name!r}: {err}") from None
    layer.set_factors(result.A, result.B)
    layer.initialize_extras(cfg.initializer, g)
    if result.base is not None:
        record_initial_factors(layer)  # A0, B0 for save_adapter(..., for_original_base=True)
    return layer, result.base


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def get_state(model: nn.Module) -> LoraState:
    """The :class:`LoraState` attached by :func:`inject`; InjectionError if there is none."""
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, LoraState):
        owners = [
            name
            for name, m in model.named_modules()
            if name and isinstance(getattr(m, STATE_ATTR, None), LoraState)
        ]
        if owners:  # inject() ran on a submodule: its state, and the operations, live there
            raise InjectionError(
                f"model: {type(model).__name__} holds adapters injected into its submodule "
                f"{owners[0]!r}; call this on that submodule (model.get_submodule"
                f"({owners[0]!r}))"
            )
        raise InjectionError(
            f"model: {type(model).__name__} has no rankwise LoRA adapters; call inject() first"
        )
    return state


def get_config(model: nn.Module) -> LoraConfig:
    """The effective :class:`LoraConfig` attached to ``model`` at injection."""
    return get_state(model).config


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(qualified_name, layer)`` for every LoRA wrapper in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def set_trainable(model: nn.Module, *, trainable: bool) -> None:
    """Freeze everything, then (if ``trainable``) unfreeze adapters, modules_to_save and biases.

    ``bias="all"``: every parameter named ``*bias``; ``"lora_only"``: the biases of the
    adapted base layers (PEFT's ``mark_only_lora_as_trainable``).
    """
    state = get_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if not trainable:
        return
    for _, layer in lora_layers(model):
        for name, p in layer.named_parameters():
            if name.startswith("base_layer."):
                continue
            if state.config.use_lora_fa and name.split(".")[0] in LORA_FA_FROZEN:
                continue  # LoRA-FA: A stays at its initialization
            p.requires_grad_(True)
        if state.config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(True)
    for name in state.modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    if state.config.bias == "all":
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                p.requires_grad_(True)


def replace_state_config(model: nn.Module, config: LoraConfig) -> None:
    """Attach ``config`` as the model's effective config (used when swapping adapters)."""
    get_state(model).config = config
