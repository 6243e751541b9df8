"""Resolve a :class:`LoraConfig` against a model: which modules get adapters, at which rank.

Pure with respect to the model: it reads ``named_modules()`` and never changes anything, so
injection can check every target before touching the model ("validate, then mutate").

Matching follows PEFT 0.21.2 (``peft.tuners.tuners_utils.check_target_module_exists``):

* list ``target_modules``: a module matches if its qualified name equals an entry or ends
  with ``"." + entry``; a str: ``re.fullmatch(target_modules, name)``; ``"all-linear"``: every
  ``nn.Linear`` / ``Conv1D`` except the output embeddings (``get_output_embeddings()``) or,
  when those are absent and ``task_type == "SEQ_CLS"``, the ``classifier``/``score`` head.
* ``exclude_modules`` uses the same rules and wins; modules inside ``modules_to_save`` are
  never adapted. ``SEQ_CLS``/``TOKEN_CLS`` add ``classifier``/``score`` and ``QUESTION_ANS``
  adds ``qa_outputs`` to ``modules_to_save`` first, as PEFT's task models do (PEFT's
  token-classification and QA models add theirs only after matching, and then fail if
  ``"all-linear"`` adapted the head).
* ``layers_to_transform``: with a list ``target_modules`` only, the layer index is the first
  numbered segment after ``<layers_pattern>.`` (or after any segment when no pattern is given).
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from collections.abc import Callable, Iterable
from typing import NamedTuple

from torch import nn

from rankwise.errors import InjectionError
from rankwise.lora.config import (
    ALL_LINEAR,
    RESIDUAL_INITIALIZERS,
    SEQ_CLS_HEAD_NAMES,
    TASK_HEAD_NAMES,
    LoraConfig,
    layers_regex,
)
from rankwise.lora.layers import LoraLayer, wrapper_kind
from rankwise.lora.module_kinds import is_hf_conv1d


class Target(NamedTuple):
    """One module to adapt: qualified name, wrapper kind, rank and alpha."""

    name: str
    kind: str
    r: int
    lora_alpha: float


class Plan(NamedTuple):
    """Everything injection will do, decided before the model is touched.

    ``config`` is the effective configuration (``all-linear`` expanded to module names,
    ``SEQ_CLS`` heads added to ``modules_to_save``, ``fan_in_fan_out`` set for ``Conv1D``,
    as PEFT records them).
    """

    targets: tuple[Target, ...]
    modules_to_save: tuple[str, ...]
    config: LoraConfig


def resolve(model: nn.Module, config: LoraConfig, *, strict: bool = True) -> Plan:
    """The :class:`Plan` for injecting ``config`` into ``model``; raises InjectionError.

    ``strict``: every ``target_modules`` / ``modules_to_save`` entry must match a module (a
    typo is an error). ``load_adapter`` passes ``False``, as PEFT loads a file whose generic
    list (``["q_proj", "v_proj", "query", "value"]``) matches in part.

    Every target's weight must be non-empty (a zero-size layer has nothing to adapt and would
    divide by zero in the initializers); checked here, before anything is allocated.
    """
    if any(isinstance(m, LoraLayer) for m in model.modules()) or hasattr(model, "_rankwise_lora"):
        raise InjectionError(
            "model: adapters are already injected; call rankwise.lora.unload(model) or "
            "merge_and_unload(model) first, or load_adapter() to swap weights in place"
        )
    config.validate()  # a field assigned after construction is checked too
    if config.target_modules is None:
        raise InjectionError(
            "target_modules: expected a list of names, a regex or 'all-linear', found None"
        )
    modules = dict(model.named_modules())
    _check_materialized_params(modules)
    names, save_names, cfg = selected_names(model, config, modules, strict=strict)
    targets = []
    for name in names:
        kind = wrapper_kind(modules[name])
        _check_supported(name, modules[name], kind)
        _check_not_bypassed(model, name)
        r, alpha = cfg.rank_and_alpha(name)
        _check_nonempty(name, modules[name])
        targets.append(Target(name, kind, r, alpha))  # type: ignore[arg-type]
    if not targets:
        entries = cfg.target_modules
        kept = [n for n in save_names if not isinstance(entries, str) and n in (entries or [])]
        if kept:  # the task's head: trained in full, so not also adapted (PEFT refuses too)
            raise InjectionError(
                f"target_modules: {kept[0]!r} is kept in full (modules_to_save: the task's "
                "head trains whole), so it cannot also get an adapter; target other modules"
            )
        if cfg.exclude_modules:  # "close candidates: ['query']" for 'query' itself misled
            unexcluded = cfg.replace(exclude_modules=None)
            hits = [n for n in modules if n and _is_target(unexcluded, n, save_names)]
            if hits:
                raise InjectionError(
                    f"target_modules: {entries!r} matched {len(hits)} module(s) (e.g. "
                    f"{hits[0]!r}), every one excluded by exclude_modules="
                    f"{cfg.exclude_modules!r}; nothing is left to adapt"
                )
        hint = "" if isinstance(entries, str) or not entries else _candidates(entries[0], modules)
        aliases = _aliases(model, modules)
        hint = _alias_hint(model, aliases, lambda a: _is_target(cfg, a, save_names)) or hint
        raise InjectionError(f"target_modules: {entries!r} matched no module{hint}")
    # as PEFT: fan_in_fan_out follows the layer type (True for GPT-2-style Conv1D), not the flag
    conv1d = any(is_hf_conv1d(modules[t.name]) for t in targets)
    if cfg.fan_in_fan_out != conv1d:
        cfg = cfg.replace(fan_in_fan_out=conv1d)
    return Plan(tuple(targets), save_names, _condensed(cfg, modules))


# PEFT condenses a target_modules list of this many entries or more (MIN_TARGET_MODULES_FOR_
# OPTIMIZATION), "all-linear" after its expansion to full names included
CONDENSE_MIN_ENTRIES = 20


def _condensed(cfg: LoraConfig, modules: dict[str, nn.Module]) -> LoraConfig:
    """``cfg`` with a long ``target_modules`` list replaced by the fewest name suffixes that
    match the same modules, as PEFT rewrites it before injecting (so the config attached to
    the model and written to files names what PEFT's does: ``["dense", "key", "query",
    "value"]`` for MiniLM's all-linear, not 37 module paths)."""
    entries = cfg.target_modules
    if isinstance(entries, str) or len(entries or []) < CONDENSE_MIN_ENTRIES:
        return cfg
    if cfg.layers_to_transform is not None:  # a full name is adapted whatever the layers say,
        return cfg  # a suffix only in them: a condensed list would select fewer modules
    others = [n for n in modules if n and not _suffix_match(n, entries)]
    shorter = minimal_suffixes(entries, others)
    return cfg.replace(target_modules=shorter) if len(shorter) < len(entries) else cfg


def _suffixes(name: str) -> list[str]:
    """A dotted name's suffixes at part boundaries, shortest first (``c``, ``b.c``, ``a.b.c``)."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def minimal_suffixes(entries: Iterable[str], others: Iterable[str]) -> list[str]:
    """A small set of suffixes that suffix-match every name in ``entries`` and no name in
    ``others`` (which match no entry): greedily, each entry not yet matched takes its shortest
    suffix that no other name ends with, entries in the order of their suffixes. Sorted."""
    taken = {suffix for name in others for suffix in _suffixes(name)}
    chosen: list[str] = []
    for entry in sorted(set(entries), key=_suffixes):
        if _suffix_match(entry, chosen):
            continue
        chosen.append(next(s for s in _suffixes(entry) if s not in taken))
    return sorted(chosen)


def selected_names(
    model: nn.Module, config: LoraConfig, modules: dict[str, nn.Module], *, strict: bool = True
) -> tuple[list[str], tuple[str, ...], LoraConfig]:
    """The module names ``config`` adapts and keeps in full among ``modules`` (qualified name
    -> module; :func:`unwrapped_modules` for a model that has adapters), and the effective
    config; with ``strict``, InjectionError for an entry that matches nothing."""
    cfg = _with_task_heads(config)
    save_names = _modules_to_save(modules, cfg, strict=strict)
    if cfg.target_modules == ALL_LINEAR:
        cfg = cfg.replace(target_modules=_all_linear(model, modules, cfg))
    names = [n for n in modules if n and _is_target(cfg, n, save_names)]
    if strict:
        _check_every_entry_matched(cfg, modules, model)
    return names, save_names, cfg


def unwrapped_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``named_modules()`` as the model was before injection: each LoRA wrapper stands for its
    base layer under its own name, and the modules inside wrappers are left out."""
    out: dict[str, nn.Module] = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, LoraLayer):
            wrapped.append(name)
            module = module.base_layer
        out[name] = module
    return out


def _with_task_heads(config: LoraConfig) -> LoraConfig:
    heads = TASK_HEAD_NAMES.get(config.task_type or "", ())
    if not heads:
        return config
    extra = [n for n in heads if n not in (config.modules_to_save or [])]
    return config.replace(modules_to_save=[*(config.modules_to_save or []), *extra])


def _suffix_match(name: str, entries: Iterable[str]) -> bool:
    return any(name == e or name.endswith("." + e) for e in entries)


def _modules_to_save(
    modules: dict[str, nn.Module], cfg: LoraConfig, *, strict: bool = True
) -> tuple[str, ...]:
    wanted = cfg.modules_to_save or []
    found: list[str] = []
    for entry in wanted:
        # PEFT's _set_trainable: a plain ``endswith`` (no dot boundary), so "classifier" also
        # keeps DistilBERT's pre_classifier and "norm" every *_layernorm; files depend on it.
        hits = [n for n in modules if n and n.endswith(entry)]
        hits = [n for n in hits if not any(n.startswith(f + ".") for f in found)]
        task_head = entry in TASK_HEAD_NAMES.get(cfg.task_type or "", ())
        if not hits and strict and not task_head:
            raise InjectionError(
                f"modules_to_save: {entry!r} matches no module{_candidates(entry, modules)}"
            )
        found.extend(h for h in hits if h not in found)
    # keep the outermost module when both a module and its child match
    return tuple(n for n in found if not any(n.startswith(o + ".") for o in found if o != n))


def _is_target(cfg: LoraConfig, name: str, save_names: tuple[str, ...]) -> bool:
    if _excluded(cfg, name):
        return False
    if any(name == s or name.startswith(s + ".") for s in save_names):
        return False
    if isinstance(cfg.target_modules, str):
        return re.fullmatch(cfg.target_modules, name) is not None
    if name in (cfg.target_modules or []):
        return True  # as PEFT: a full name is adapted whatever layers_to_transform says
    if not _suffix_match(name, cfg.target_modules or []):
        return False
    return _in_layers(cfg, name)


def _excluded(cfg: LoraConfig, name: str) -> bool:
    ex = cfg.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, name) is not None
    return _suffix_match(name, ex)


def _in_layers(cfg: LoraConfig, name: str) -> bool:
    idx = cfg.layers_to_transform
    if idx is None or (isinstance(idx, list) and not idx):
        return True
    patterns = cfg.layers_pattern
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)  # the first numbered segment
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(layers_regex(pattern), name)
            if match is not None:
                break
    if match is None:
        return False
    layer = int(match.group("idx"))
    return layer == idx if isinstance(idx, int) else layer in idx


# Mamba-style models whose forward reads these layers' weights itself (the CUDA kernel path,
# and on every device Mamba's time-step projection ``dt_proj.weight @ x`` and its causal
# convolution), so an adapter on them is bypassed unmerged and changes the output once merged.
# PEFT 0.21 refuses out_proj and conv1d on these model types; dt_proj as measured here
# (transformers 5.25: unmerged output equal to the base's, no gradient reaching the factors).
BYPASSED_LAYERS: dict[str, frozenset[str]] = {
    "mamba": frozenset({"out_proj", "conv1d", "dt_proj"}),
    "falcon_mamba": frozenset({"out_proj", "conv1d", "dt_proj"}),
    "mamba2": frozenset({"out_proj", "conv1d"}),
    "falcon_h1": frozenset({"out_proj", "conv1d"}),
    "nemotron_h": frozenset({"out_proj", "conv1d"}),
}


def _bypassed(model: nn.Module, name: str) -> bool:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return name.rpartition(".")[2] in BYPASSED_LAYERS.get(str(model_type), ())


def _check_not_bypassed(model: nn.Module, name: str) -> None:
    if _bypassed(model, name):
        model_type = model.config.model_type  # type: ignore[union-attr]
        raise InjectionError(
            f"target_modules: module {name!r} cannot take an adapter in a {model_type!r} model: "
            "its forward reads the layer's weight directly (dt_proj on every device, the "
            "others on the fused-kernel path), so an adapter there would do nothing until "
            "merged and then change the output (PEFT refuses out_proj and conv1d there too); "
            f"expected none of {sorted(BYPASSED_LAYERS[model_type])}"
        )


# config fields holding a mixture-of-experts model's expert count (transformers' names)
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _warn_fused_experts(model: nn.Module, names: list[str]) -> None:
    """All-linear on a mixture-of-experts model whose experts are fused 3-D parameters
    (transformers 5's Mixtral: ``experts.gate_up_proj: (experts, 2·ffn, hidden)``), not linear
    layers: they stay frozen here, where PEFT adapts them through ``target_parameters``."""
    config = getattr(model, "config", None)
    counts = {getattr(config, f, None) for f in EXPERT_COUNT_FIELDS}
    counts = {c for c in counts if isinstance(c, int) and c > 1}
    fused = [n for n, p in model.named_parameters() if p.dim() == 3 and p.shape[0] in counts]
    if fused:
        more = f" and {len(fused) - 1} more" if len(fused) > 1 else ""
        warnings.warn(
            f"target_modules='all-linear': the model's experts are fused parameters "
            f"({fused[0]!r}{more}), not linear layers, and stay frozen; the adapter covers "
            f"{len(names)} linear layers (PEFT also adapts the experts, with target_parameters, "
            "which rankwise does not support)",
            RuntimeWarning,
            stacklevel=6,  # inject's caller
        )


def _all_linear(model: nn.Module, modules: dict[str, nn.Module], cfg: LoraConfig) -> list[str]:
    names = [n for n, m in modules.items() if n and (isinstance(m, nn.Linear) or is_hf_conv1d(m))]
    bypassed = [n for n in names if _bypassed(model, n)]
    if bypassed:  # PEFT refuses all-linear there; the other linear layers take adapters
        names = [n for n in names if n not in bypassed]
        warnings.warn(
            f"target_modules='all-linear': left out {bypassed[0]!r}"
            f"{f' and {len(bypassed) - 1} more' if len(bypassed) > 1 else ''}: the "
            f"{model.config.model_type!r} model reads "  # type: ignore[union-attr]
            f"{'/'.join(sorted({n.rpartition('.')[2] for n in bypassed}))} weights directly, "
            "past any adapter",
            RuntimeWarning,
            stacklevel=5,  # inject's caller
        )
    head: nn.Module | None = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
    if head is None and cfg.task_type == "SEQ_CLS":
        head = next((getattr(model, h) for h in SEQ_CLS_HEAD_NAMES if hasattr(model, h)), None)
    if isinstance(head, LoraLayer):  # an adapted head: its base layer stands in modules
        head = head.base_layer
    if head is not None:
        names = [n for n in names if modules[n] is not head]
    _warn_fused_experts(model, names)
    return names


def _check_every_entry_matched(
    cfg: LoraConfig, modules: dict[str, nn.Module], model: nn.Module
) -> None:
    if isinstance(cfg.target_modules, str):
        return  # a regex: checked as a whole (no hit -> "matched no module")
    for entry in cfg.target_modules or []:
        if not any(_suffix_match(n, [entry]) for n in modules if n):
            aliases = _aliases(model, modules)
            hint = _alias_hint(model, aliases, lambda a, e=entry: _suffix_match(a, [e]))
            raise InjectionError(
                f"target_modules: {entry!r} matches no module{hint or _candidates(entry, modules)}"
            )


def _aliases(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Second names of shared modules: ``named_modules()`` (``modules``) lists a module object
    reached by two paths under its first name only, as PEFT matches targets; alias -> first."""
    first = {id(m): n for n, m in modules.items()}
    return {
        n: first[id(m)]
        for n, m in model.named_modules(remove_duplicate=False)
        if n not in modules and id(m) in first
    }


def _registered_twice(model: nn.Module, alias: str, first: str) -> bool:
    """Whether ``alias`` is a second registration of the module (``self.tied = self.enc``: a
    wrapper set under ``first`` leaves ``alias`` on the base layer), not the same registration
    reached through a shared parent (``ModuleList([blk, blk])``: the wrapper replaces
    ``blk.q``, which every path then reaches)."""

    def registration(name: str) -> tuple[int, str]:
        parent, _, attr = name.rpartition(".")
        return id(model.get_submodule(parent)), attr

    return registration(alias) != registration(first)


def _alias_hint(model: nn.Module, aliases: dict[str, str], matches: Callable[[str], bool]) -> str:
    """The hint for a target that names a shared module by its second name: the first of
    ``aliases`` (:func:`_aliases`) that ``matches`` (else "")."""
    alias = next((a for a in aliases if matches(a)), None)
    if alias is None:
        return ""
    first = aliases[alias]
    if not _registered_twice(model, alias, first):
        return (
            f"; {alias!r} is module {first!r} reached through a shared parent module: target "
            f"{first!r}, its first name, as in PEFT (the adapter then runs on every path)"
        )
    return (
        f"; {alias!r} is a second name of module {first!r} (one module registered "
        f"twice): target {first!r}, its first name, as in PEFT (calls through "
        f"{alias!r} then still run the base layer without the adapter)"
    )


def warn_aliased_targets(model: nn.Module, plan: Plan) -> None:
    """Warn where a target module is registered under other names too: the wrapper replaces
    it under its first name only (as PEFT's injection does), so calls through the others run
    the base layer without the adapter."""
    modules = dict(model.named_modules())
    aliases = _aliases(model, modules)
    for t in plan.targets:
        others = [
            a
            for a, first in aliases.items()
            if first == t.name and _registered_twice(model, a, first)
        ]
        if others:
            warnings.warn(
                f"target {t.name!r} is the same module as {others}; the adapter replaces it "
                f"under {t.name!r} only (as in PEFT), so calls through {others[0]!r} run the "
                "base layer without the adapter",
                UserWarning,
                stacklevel=4,
            )


def _candidates(entry: str, modules: dict[str, object]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in modules if n} | {n for n in modules if n})
    close = difflib.get_close_matches(entry, leaves, n=5, cutoff=0.5)
    return f"; close candidates: {close}" if close else ""


def _check_supported(name: str, module: nn.Module, kind: str | None) -> None:
    if kind is None:
        raise InjectionError(
            f"target_modules: module {name!r} is a {type(module).__name__}; supported types are "
            "nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d and transformers' Conv1D"
        )
    if kind == "conv":
        groups, dilation = module.groups, tuple(module.dilation)  # type: ignore[union-attr]
        mode = module.padding_mode  # type: ignore[union-attr]
        if groups != 1 or any(d != 1 for d in dilation) or mode != "zeros":
            raise InjectionError(
                f"target_modules: convolution {name!r} has groups={groups}, dilation={dilation}, "
                f"padding_mode={mode!r}; LoRA supports groups=1, dilation=1, padding_mode='zeros'"
            )


# A rank beyond both dims whose factors would hold more than this many numbers is a typo
# (r=2**40 would otherwise reach the allocator), refused before anything is allocated.
MAX_OVERSIZED_FACTOR_ELEMENTS = 2**26


def check_ranks(model: nn.Module, plan: Plan) -> None:
    """Warn (once per call) when ``r`` exceeds what a target's update can hold; refuse an
    absurd one.

    ``B A`` has rank at most ``min(out, in)`` (a convolution's ``in`` counts ``in · ∏kernel``,
    an embedding's ``min(num_embeddings, dim)``), so a larger ``r`` only adds parameters that
    cannot raise the rank of ΔW. PEFT accepts such an ``r`` (and writes files with it), so
    rankwise does too — a small layer in a list of targets, or a tiny test model, is common —
    but says so, naming the first such module and the limit. An ``r`` above ``max(out, in)``
    whose factors would hold more than :data:`MAX_OVERSIZED_FACTOR_ELEMENTS` numbers is
    refused (InjectionError naming the module), as a mistyped value.
    (``load_adapter`` does not call this: a file's shapes are checked against the model instead.)
    """
    modules = dict(model.named_modules())
    over = []
    for t in plan.targets:
        shape = tuple(modules[t.name].weight.shape)  # type: ignore[union-attr]
        dims = (shape[0], math.prod(shape[1:]))
        limit = min(dims)
        if t.r > max(dims) and t.r * sum(dims) > MAX_OVERSIZED_FACTOR_ELEMENTS:
            raise InjectionError(
                f"r: module {t.name!r} (weight shape {shape}): r={t.r} exceeds both dims and its "
                f"factors would hold {t.r * sum(dims):,} numbers; expected r <= {limit} "
                "(a larger r cannot raise the rank of the update)"
            )
        if t.r > limit:
            # r singular triplets (or QR columns) of the weight: r <= min(out, in)
            if plan.config.initializer in RESIDUAL_INITIALIZERS and t.kind != "embedding":
                # the top-r singular triplets must exist (embeddings use the default init)
                raise InjectionError(
                    f"r: module {t.name!r} (weight shape {shape}): "
                    f"init_lora_weights={plan.config.init_lora_weights!r} needs "
                    f"r <= min(out, in) = {limit}, found r={t.r}"
                )
            over.append((t.name, shape, limit, t.r))
    if over:
        name, shape, limit, r = over[0]
        more = f" and {len(over) - 1} more module(s)" if len(over) > 1 else ""
        warnings.warn(
            f"r: module {name!r} (weight shape {shape}) has r={r} > min(out, in) = {limit}"
            f"{more}; the update B A cannot have rank above {limit}, so the extra ranks only "
            "add parameters",
            UserWarning,
            stacklevel=3,
        )


def _check_materialized_params(modules: dict[str, nn.Module]) -> None:
    """Refuse a model holding a parameter not materialized yet (``nn.LazyLinear``,
    ``nn.LazyConv2d``), target or not, naming its module: torch's error named none, and came
    after the model was changed (from the trainable flags or the bias copies)."""
    for name, module in modules.items():
        if any(isinstance(p, nn.parameter.UninitializedParameter)
               for p in module._parameters.values()):  # fmt: skip
            raise InjectionError(
                f"module {name!r} is a lazy {type(module).__name__} whose parameters are not "
                "initialized yet; run one forward pass before injecting adapters"
            )


def _check_nonempty(name: str, module: nn.Module) -> None:
    """Refuse a weight with a zero dimension, naming the module and its shape."""
    shape = tuple(module.weight.shape)  # type: ignore[union-attr]
    if 0 in shape:
        raise InjectionError(
            f"target_modules: module {name!r} has a zero-size weight of shape {shape}; "
            "expected every dimension > 0"
        )
