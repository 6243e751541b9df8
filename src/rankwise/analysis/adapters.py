"""Adapter directories in, reports (and new adapter directories) out.

Each function reads PEFT-format LoRA adapters as per-module factors of the effective update
``ΔW = s·B A`` (:func:`~rankwise.analysis.adapter_files.read_factors`), applies the tensor-level
function of :mod:`rankwise.analysis` module by module, and returns one report row per module.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from rankwise.analysis._common import as_generator
from rankwise.analysis.adapter_files import (
    check_rewritable,
    read_config,
    read_extras,
    read_factors,
    write_factors,
)
from rankwise.analysis.algebra import (
    CombineMethod,
    Factors,
    _check_weights,
    choose_rank,
    combine,
    combine_rank_cap,
    concatenate,
    factored_svd,
    split_svd,
)
from rankwise.analysis.amplification import rounded_rank
from rankwise.analysis.similarity import Factor, subspace_similarity
from rankwise.analysis.spectrum import Spectrum, spectrum
from rankwise.errors import AdapterFormatError
from rankwise.lora.config import LoraConfig

PathLike = str | os.PathLike[str]


class LayerReport(NamedTuple):
    """One module of a derived adapter (extract, resize, combine).

    ``source_rank`` is the rank of what the module came from (``r`` for resize, ``Σ rᵢ`` for
    combine, ``min(out, in)`` for a dense ``ΔW`` in extract); ``relative_error`` is
    ``‖ΔW_source − ΔW_new‖_F / ‖ΔW_source‖_F`` with ``ΔW_source = Σ wᵢ ΔWᵢ`` for combine.
    """

    module: str
    shape: tuple[int, int]  # (out, in)
    source_rank: int
    rank: int
    relative_error: float


class ModuleSimilarity(NamedTuple):
    """φ(i, j) for one module present in both adapters (LoRA paper Eq. 4)."""

    module: str
    rank1: int
    rank2: int
    dim: int  # d: in (A factors) or out (B factors); E φ(i, j) = max(i, j) / d at random
    phi: Tensor  # (rank1, rank2)


class ModuleSpectrum(NamedTuple):
    """One adapted module's ``ΔW`` spectrum: its name, ``(out, in)`` shape, adapter rank."""

    module: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    spectrum: Spectrum


def factored_norm(B: Tensor, A: Tensor) -> float:
    """``‖B A‖_F`` in ``O((out + in)·r²)``, never forming ``B A``.

    With ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``, ``‖B A‖_F = ‖R_B R_Aᵀ‖_F`` (orthonormal ``Q``s
    keep norms). Unlike ``sqrt(tr((BᵀB)(AAᵀ)))`` this does not cancel: a difference ``[B | −B']
    · [A; A']`` of relative size 1e-12 is measured as such, not as rounding noise of 1e-8.
    """
    _, r_b = torch.linalg.qr(B)  # (p, r)
    _, r_a = torch.linalg.qr(A.mT)  # (q, r)
    return float(torch.linalg.norm(r_b @ r_a.mT))


def factored_relative_error(reference: Factors, approx: Factors) -> float:
    """``‖B A − B' A'‖_F / ‖B A‖_F`` via the factors ``[B | −B'] · [A; A']`` (float64)."""
    dtype = torch.float64
    B = torch.cat([reference.B.to(dtype), -approx.B.to(dtype)], dim=1)  # (out, r + r')
    A = torch.cat([reference.A.to(dtype), approx.A.to(dtype)], dim=0)  # (r + r', in)
    scale = factored_norm(reference.B.to(dtype), reference.A.to(dtype))
    diff = factored_norm(B, A)
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def _shape(f: Factors) -> tuple[int, int]:
    return (int(f.B.shape[0]), int(f.A.shape[1]))


def resize_adapter(
    source: PathLike, destination: PathLike, rank: int | None = None, *, energy: float | None = None
) -> tuple[LayerReport, ...]:
    """Write ``source`` resized to ``rank`` (capped at each module's ``r``) or by ``energy``.

    Each module's update becomes its best rank-``k`` approximation (:func:`resize`, never
    forming ``B A``); per-module ranks that differ go to ``rank_pattern``.
    """
    config = read_config(source)
    check_rewritable(source, config)
    factors = read_factors(source)
    new: dict[str, Factors] = {}
    report = []
    for module, f in factors.items():
        r = f.A.shape[0]
        svd = factored_svd(f.B, f.A)
        keep = None if rank is None else min(rank, svd.S.numel())
        k = choose_rank(svd.S, keep, energy, available=svd.S.numel())
        new[module] = split_svd(svd, k, dtype=f.A.dtype)
        error = factored_relative_error(f, new[module])
        report.append(LayerReport(module, _shape(f), r, k, error))
    # a trained head, biases, embedding weights: carried unchanged
    write_factors(destination, new, carried=config, extras=read_extras(source))
    return tuple(report)


def combine_adapters(
    sources: Sequence[PathLike],
    destination: PathLike,
    weights: Sequence[float] | None = None,
    *,
    method: CombineMethod = "linear",
    rank: int | None = None,
    density: float = 0.5,
    generator: torch.Generator | int | None = None,
    extras_from: int | None = None,
) -> tuple[LayerReport, ...]:
    """Write the combination of several adapters (:func:`combine`, module by module).

    Their other tensors (a trained head in ``modules_to_save``, biases, embedding weights) are
    carried when all adapters agree on them; ``extras_from=i`` takes them from ``sources[i]``
    instead (e.g. two classification runs, each with its own head).

    A module missing from some adapters is combined from those that have it (a zero update
    elsewhere). ``rank=None`` (the truncating methods) is PEFT's default new rank, the largest
    ``r`` or ``rank_pattern`` entry of any input, for every module. ``rank`` is capped per
    module at what it can hold (``min(out, in)``, and ``Σ rᵢ`` for ``"svd"``), as
    :func:`resize_adapter` caps it at ``r``. ``generator`` (DARE) is shared across modules in
    sorted module order.
    """
    if len(sources) == 0:
        raise ValueError("sources must name at least one adapter directory")
    if method == "linear" and rank is not None:  # not per module: no module is at fault
        raise ValueError(
            f"rank: method='linear' is exact (its rank is the sum of the inputs' ranks) and "
            f"takes no rank, found rank={rank}; use method='svd' for a rank-{rank} result"
        )
    w = _check_weights(weights, len(sources), "sources")
    adapters = [read_factors(s) for s in sources]
    configs = [read_config(s) for s in sources]
    for source, config in zip(sources, configs, strict=True):
        check_rewritable(source, config)
    if extras_from is not None and (
        isinstance(extras_from, bool)
        or not isinstance(extras_from, int)
        or not 0 <= extras_from < len(sources)
    ):
        raise ValueError(
            f"extras_from: expected an index in [0, {len(sources) - 1}], found {extras_from!r}"
        )
    extras = _common_extras(sources, configs, extras_from)
    _check_module_prefixes(sources, adapters)
    _check_module_shapes(sources, adapters)
    _warn_unchecked(sources, adapters, configs)
    gen = as_generator(generator)  # one stream across modules, in sorted module order
    if rank is None and method != "linear":
        # PEFT's default new rank: the largest rank any input adapter declares (r or a
        # rank_pattern entry), for every module; a module whose own inputs are smaller (a lower
        # rank_pattern entry) still gets it, capped below at what the module can hold
        rank = max(_declared_rank(c, a) for c, a in zip(configs, adapters, strict=True))
    new: dict[str, Factors] = {}
    report = []
    for module in sorted(set().union(*adapters)):
        present = [(a[module], wi) for a, wi in zip(adapters, w) if module in a]
        pairs, ws = [p for p, _ in present], [wi for _, wi in present]
        # as resize: a rank above what this module can hold is capped (rank_pattern, r > dims)
        keep = None if rank is None else min(rank, combine_rank_cap(pairs, method))
        try:
            out = combine(pairs, ws, method=method, rank=keep, density=density, generator=gen)
        except ValueError as err:
            raise type(err)(f"module {module!r}: {err}") from None
        # the exact sum in the work dtype, not the inputs' (a half-precision sum can overflow
        # where the method's own result does not)
        exact = concatenate(pairs, ws)
        new[module] = out
        error = factored_relative_error(exact, out)
        report.append(LayerReport(module, _shape(out), exact.A.shape[0], out.A.shape[0], error))
    write_factors(destination, new, carried=configs[0], extras=extras)
    return tuple(report)


def _check_module_prefixes(
    sources: Sequence[PathLike],
    adapters: list[dict[str, Factors]],
    *,
    consequence: str = "combining them would keep both names and a loader would apply only one",
) -> None:
    """Refuse adapters saved on different model classes (a bare ``BertModel`` against
    ``BertForSequenceClassification``): a module of one, without some leading attribute names
    (``bert.``, ``model.``), is a module of the other or a sibling of one (``bert.encoder.
    layer.0.attention.self.query`` against ``encoder.layer.0.attention.self.value``). The
    union would hold both naming schemes, and a loader would apply one and skip the other
    without a word. A prefix holding a list index (``1.0`` against ``0.1``) names another part
    of one model, and so does one whose remainder has no such match (bert2bert's encoder and
    ``decoder.bert.encoder``)."""
    names = [set(a) for a in adapters]
    parents = [{m.rpartition(".")[0] for m in a} for a in names]
    for (i, a), (j, b) in itertools.permutations(enumerate(names), 2):
        for module in sorted(a - b):
            parts = module.split(".")
            for k in range(1, len(parts)):
                if parts[k - 1].isdigit():
                    break  # a list index: another part of the same model
                tail = ".".join(parts[k:])
                parent = tail.rpartition(".")[0]
                if tail in b or (parent and parent in parents[j] and parent not in parents[i]):
                    what = repr(tail) if tail in b else f"modules under {parent!r}"
                    raise ValueError(
                        f"sources: {str(sources[i])!r} adapts {module!r} and "
                        f"{str(sources[j])!r} {what}, the same part of the model under another "
                        "prefix (saved on different model classes, e.g. a bare model and one "
                        f"with a head); {consequence}"
                    )


def _check_module_shapes(sources: Sequence[PathLike], adapters: list[dict[str, Factors]]) -> None:
    """Refuse a module whose update has another shape in another adapter (a model of another
    size), naming both directories (the per-module check counted only the adapters holding
    the module, so its index named the wrong one, and no directory).

    Adapters on other layers of the same modules are compared too, by role (the name with
    the list indices that vary within the adapter as ``*``: ``encoder.layer.*.attention.self.
    key``; :func:`_layer_roles`), where each adapter's modules of the role have one shape:
    evidence that the model's layers share it (layers that differ in size, OpenELM's or
    Swin's stages, give several shapes or other roles and are not compared)."""
    first: dict[str, tuple[int, tuple[int, int]]] = {}
    for i, adapter in enumerate(adapters):
        for module, (B, A) in adapter.items():
            shape = (int(B.shape[0]), int(A.shape[1]))
            j, seen = first.setdefault(module, (i, shape))
            if seen != shape:
                raise ValueError(
                    f"module {module!r}: {str(sources[i])!r} (sources[{i}]) holds a {shape} "
                    f"update, {str(sources[j])!r} (sources[{j}]) a {seen} one: adapters of "
                    "models of other sizes cannot be combined"
                )
    by_role: dict[str, tuple[int, str, tuple[int, int]]] = {}
    for i, adapter in enumerate(adapters):
        shapes: dict[str, dict[tuple[int, int], str]] = {}
        roles = _layer_roles(list(adapter))
        for module, factors in sorted(adapter.items()):
            shapes.setdefault(roles[module], {}).setdefault(_shape(factors), module)
        for role, found in shapes.items():
            if "*" not in role or len(found) != 1:
                continue  # one module (compared by name), or layers of other sizes
            ((shape, module),) = found.items()
            j, other, seen = by_role.setdefault(role, (i, module, shape))
            if seen != shape:
                raise ValueError(
                    f"module {module!r}: {str(sources[i])!r} (sources[{i}]) holds a {shape} "
                    f"update, {str(sources[j])!r} (sources[{j}]) a {seen} one for the same "
                    f"module of another layer ({other!r}): adapters of models of other sizes "
                    "cannot be combined"
                )


def _layer_roles(modules: Sequence[str]) -> dict[str, str]:
    """Each module's name with ``*`` for each list index that varies among the modules of the
    same kind (``encoder.layer.*.attention.self.key`` across BERT's layers); an index that does
    not vary stays (Swin's stage in ``layers.0.blocks.*``: its stages differ in width, so stage
    0's modules are not compared with stage 1's)."""
    kinds: dict[str, list[list[str]]] = {}
    for module in modules:
        kinds.setdefault(_role(module), []).append(module.split("."))
    out = {}
    for kin in kinds.values():
        varying = {i for i in range(len(kin[0])) if len({parts[i] for parts in kin}) > 1}
        for parts in kin:
            out[".".join(parts)] = ".".join(
                "*" if i in varying and part.isdigit() else part for i, part in enumerate(parts)
            )
    return out


def _role(module: str) -> str:
    """A module's name with its list indices as ``*`` (the same module in every layer)."""
    return ".".join("*" if part.isdigit() else part for part in module.split("."))


def _warn_unchecked(
    sources: Sequence[PathLike], adapters: list[dict[str, Factors]], configs: list[LoraConfig]
) -> None:
    """Warn when two inputs adapt no common module, not even on other layers, and do not both
    name their base model: nothing here shows they belong to one model (one of another size
    would fail only when the combination is loaded)."""
    roles = [{_role(m) for m in a} for a in adapters]
    for (i, a), (j, b) in itertools.combinations(enumerate(roles), 2):
        named = configs[i].base_model_name_or_path and configs[j].base_model_name_or_path
        if not a & b and not named:
            warnings.warn(
                f"sources: {str(sources[i])!r} and {str(sources[j])!r} adapt no common module "
                "and do not both record base_model_name_or_path: rankwise cannot check that "
                "they adapt one model (adapters of a model of another size would fail only "
                "when the result is loaded)",
                RuntimeWarning,
                stacklevel=3,
            )


def _declared_rank(config: LoraConfig, factors: dict[str, Factors]) -> int:
    """The largest rank an adapter declares: ``r`` or a ``rank_pattern`` entry (or, if larger,
    a module's actual rank)."""
    declared = [int(config.r), *(int(v) for v in (config.rank_pattern or {}).values())]
    return max(*declared, *(int(f.A.shape[0]) for f in factors.values()))


def _common_extras(
    sources: Sequence[PathLike], configs: list[LoraConfig], extras_from: int | None = None
) -> dict[str, Tensor]:
    """The non-factor tensors all ``sources`` share (a head, biases, embeddings), which the
    combination carries; adapters of different base models, layer layouts, heads or bias
    modes are refused, naming the field and the two directories."""
    first = configs[0]
    for source, config in zip(sources[1:], configs[1:], strict=True):
        for field in ("base_model_name_or_path", "fan_in_fan_out", "task_type", "bias"):
            a, b = getattr(first, field), getattr(config, field)
            if a != b and not (field == "base_model_name_or_path" and (a is None or b is None)):
                raise ValueError(
                    f"{sources[0]} and {source}: {field} differs ({a!r} vs {b!r}); combine "
                    "adapters of one base model with the same settings"
                )
        if sorted(first.modules_to_save or []) != sorted(config.modules_to_save or []):
            raise ValueError(
                f"{sources[0]} and {source}: modules_to_save differs ({first.modules_to_save!r} "
                f"vs {config.modules_to_save!r})"
            )
    if extras_from is not None:
        return read_extras(sources[extras_from])
    extras = [read_extras(s) for s in sources]
    for source, other in zip(sources[1:], extras[1:], strict=True):
        if other.keys() != extras[0].keys() or any(
            not torch.equal(other[k], extras[0][k]) for k in other
        ):
            raise ValueError(
                f"{sources[0]} and {source}: their trained non-LoRA tensors (modules_to_save, "
                "biases or embeddings) differ; a combination has one of each, so combine "
                "adapters whose heads agree, or take them from one (extras_from / --head-from)"
            )
    return extras[0]


def adapter_similarity(
    first: PathLike, second: PathLike, *, factor: Factor = "A"
) -> tuple[ModuleSimilarity, ...]:
    """φ between two adapters for every module they share (e.g. r = 8 vs r = 64, two seeds);
    modules only one adapts are named in a warning."""
    one, two = read_factors(first), read_factors(second)
    shared = sorted(set(one) & set(two))
    if not shared:
        # the same layers saved on two model classes (bert.encoder... vs encoder...): say so
        _check_module_prefixes(
            (first, second), [one, two], consequence="their modules cannot be paired by name"
        )
        raise AdapterFormatError(f"adapters {first} and {second} share no adapted module")
    for source, own, other in ((first, one, two), (second, two, one)):
        alone = sorted(set(own) - set(other))
        if alone:
            warnings.warn(
                f"{source}: {len(alone)} module(s) the other adapter does not adapt are not "
                f"compared ({', '.join(alone[:3])}{', ...' if len(alone) > 3 else ''})",
                RuntimeWarning,
                stacklevel=2,
            )
    rows, deficient = [], []
    for module in shared:
        x1 = one[module].A if factor == "A" else one[module].B
        x2 = two[module].A if factor == "A" else two[module].B
        try:
            phi = subspace_similarity(x1, x2, factor=factor)
        except ValueError as err:  # which module of which adapters (e.g. an untrained B)
            raise type(err)(f"module {module!r} ({first} vs {second}): {err}") from None
        for source, x in ((first, x1), (second, x2)):
            rank, size = _factor_rank(x), min(x.shape)
            if rank < size:
                deficient.append(f"{module} in {source}: rank {rank} of {size}")
        dim = x1.shape[1] if factor == "A" else x1.shape[0]
        rows.append(ModuleSimilarity(module, phi.shape[0], phi.shape[1], int(dim), phi))
    if deficient:  # φ(i, ·) past a factor's rank compares directions its SVD made up
        warnings.warn(
            f"{len(deficient)} factor(s) have fewer independent directions than rows "
            f"({'; '.join(deficient[:3])}{'; ...' if len(deficient) > 3 else ''}): phi(i, j) "
            "beyond that rank compares arbitrary directions (e.g. an adapter extracted or "
            "resized above its update's rank)",
            RuntimeWarning,
            stacklevel=2,
        )
    return tuple(rows)


def _factor_rank(X: Tensor) -> int:
    """Numerical rank of a factor given in its own dtype (:func:`rounded_rank`)."""
    S = torch.linalg.svdvals(X.to(torch.promote_types(X.dtype, torch.float32)))
    return rounded_rank(S, (int(X.shape[0]), int(X.shape[1])), X.dtype)


def adapter_spectrum(directory: PathLike) -> tuple[ModuleSpectrum, ...]:
    """The :class:`Spectrum` of every module's effective update ``s·B A`` (factored).

    DoRA adapters are refused: their update ``m ⊙ (W + s·B A)/‖W + s·B A‖ − W`` depends on
    the base weights and is not ``s·B A`` (:func:`~rankwise.analysis.adapter_amplification`
    measures it against a base model).
    """
    if read_config(directory).use_dora:
        raise AdapterFormatError(
            f"{directory}: a DoRA adapter (use_dora=true); its update depends on the base "
            "weights through the magnitude vectors, so the spectrum of s·B A is not the update's"
        )
    rows = []
    for module, f in read_factors(directory).items():
        rows.append(ModuleSpectrum(module, _shape(f), int(f.A.shape[0]), spectrum(f)))
    return tuple(rows)
