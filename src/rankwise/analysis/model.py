"""Model-level analysis: extract a LoRA from two models, measure amplification on a model.

``extract_adapter`` turns a fully fine-tuned model into a PEFT-format LoRA adapter for its base
model: for each adapted linear layer, the truncated (or randomized) SVD of
``ΔW = W_finetuned − W_base`` gives ``B A`` (Eckart–Young optimal at that rank). Weights are
``(out, in)`` as in ``nn.Linear``; transformers' ``Conv1D`` stores ``(in, out)`` and is
transposed on read.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from rankwise.analysis._common import as_generator
from rankwise.analysis.adapter_files import read_config, read_extras, read_factors, write_factors
from rankwise.analysis.adapters import LayerReport
from rankwise.analysis.algebra import Factors, extract
from rankwise.analysis.amplification import Amplification, amplification, numerical_rank
from rankwise.errors import AdapterFormatError, ShapeMismatchError
from rankwise.io.adapter import PREFIX
from rankwise.linalg import relative_error
from rankwise.lora.config import LoraConfig
from rankwise.lora.dora import MAGNITUDE

PathLike = str | os.PathLike[str]


class ExtractReport(NamedTuple):
    """What :func:`extract_adapter` wrote: one row per layer, and what it could not capture."""

    layers: tuple[LayerReport, ...]
    uncaptured: tuple[str, ...]  # parameters that changed outside the extracted weights


class ModuleAmplification(NamedTuple):
    """One adapted module's :class:`Amplification` (``module``: its name in the model)."""

    module: str
    amplification: Amplification


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or transformers ``Conv1D`` (a view)."""
    if type(module).__name__ == "Conv1D":
        return module.weight.detach().mT  # Conv1D stores (in, out)
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    raise TypeError(f"expected nn.Linear or Conv1D, found {type(module).__name__}")


def matches_name(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _at_precision_of(W0: Tensor, W1: Tensor) -> Tensor:
    """The base weight ``W0`` as the fine-tuned model stores its weights: rounded to ``W1``'s
    dtype when that is coarser (a float32 base fine-tuned and saved in float16/bfloat16), so
    an unchanged layer compares equal and a changed one's update carries no rounding noise (the
    float32-vs-float16 difference made every layer "changed": rank-3 adapters of pure noise
    on 9 untouched layers of 13)."""
    if (
        W0.dtype != W1.dtype
        and W0.is_floating_point()
        and W1.is_floating_point()
        and torch.finfo(W1.dtype).eps > torch.finfo(W0.dtype).eps
    ):
        return W0.to(W1.dtype)
    return W0


def _targets(
    base: dict[str, nn.Module], tuned: dict[str, nn.Module], targets: Sequence[str] | None
) -> list[str]:
    linear = [
        n
        for n, m in base.items()
        if is_linear(m)
        and n in tuned
        and is_linear(tuned[n])
        and linear_weight(m).shape == linear_weight(tuned[n]).shape
    ]
    if targets is None:  # every linear layer whose weight changed
        return [
            n
            for n in linear
            if not torch.equal(
                _at_precision_of(linear_weight(base[n]), linear_weight(tuned[n])),
                linear_weight(tuned[n]),
            )
        ]
    chosen = []
    for target in targets:
        hits = [n for n in linear if matches_name(n, target)]
        if not hits:
            raise KeyError(f"target {target!r} matches no linear layer present in both models")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def _inside(name: str, modules: Sequence[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def _uncaptured(
    base_model: nn.Module, tuned_model: nn.Module, layers: list[str], saved: Sequence[str]
) -> tuple[str, ...]:
    captured = {f"{n}.weight" for n in layers}
    base = dict(base_model.named_parameters())
    out = []
    for name, p in tuned_model.named_parameters():
        if name in captured or _inside(name, saved):
            continue
        q = base.get(name)
        if (
            q is None
            or q.shape != p.shape
            or not torch.equal(_at_precision_of(q.detach(), p.detach()), p.detach())
        ):
            out.append(name)
    return tuple(out)


def extract_adapter(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    directory: PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    targets: Sequence[str] | None = None,
    randomized: bool = False,
    generator: torch.Generator | int | None = None,
    task_type: str | None = None,
    modules_to_save: Sequence[str] = (),
    base_model_name_or_path: str | None = None,
) -> ExtractReport:
    """Write a LoRA adapter with ``B A ≈ W_finetuned − W_base`` for each target layer.

    ``targets`` are module names (a name matches itself and any ``*.name``); by default every
    ``nn.Linear``/``Conv1D`` whose weight differs. ``rank`` (capped at ``min(out, in)``) or
    ``energy`` (the fraction of ``‖ΔW‖_F²`` to keep, per layer) sets each layer's rank; layers
    whose rank differs from the most common one go to ``rank_pattern``. The adapter is PEFT's
    format with ``lora_alpha = r`` (scaling 1): ``peft.PeftModel.from_pretrained(base, dir)``
    loads it. ``modules_to_save`` (e.g. a classification head the base does not have) are
    stored whole, with the fine-tuned values, as PEFT's ``modules_to_save``; they are never
    approximated. Parameters that changed but are not extracted or saved (biases, norms) are
    listed in ``uncaptured``; neither model is modified.
    """
    base = dict(base_model.named_modules())
    tuned = dict(finetuned_model.named_modules())
    for module in modules_to_save:
        if module not in tuned:
            raise KeyError(f"modules_to_save: {module!r} is not a module of finetuned_model")
    layers = [n for n in _targets(base, tuned, targets) if not _inside(n, modules_to_save)]
    if not layers:
        saved = f" outside modules_to_save {list(modules_to_save)}" if modules_to_save else ""
        raise ValueError(
            f"no linear layer differs between base_model and finetuned_model{saved}: there is "
            "no update to extract"
            + (" (the saved modules are stored whole, not extracted)" if saved else "")
        )
    gen = as_generator(generator)
    factors: dict[str, Factors] = {}
    report = []
    unchanged: list[str] = []
    for name in layers:
        W1 = linear_weight(tuned[name])
        W0 = _at_precision_of(linear_weight(base[name]), W1)
        if W0.shape != W1.shape:
            raise ShapeMismatchError(f"layer {name!r}: {tuple(W0.shape)} vs {tuple(W1.shape)}")
        k = None if rank is None else min(rank, min(W0.shape))
        f = extract(W0, W1, k, energy=energy, randomized=randomized, generator=gen)
        delta = W1.double() - W0.double()  # (out, in)
        error = relative_error(delta, f.B.double() @ f.A.double())
        factors[name] = f
        report.append(LayerReport(name, tuple(W0.shape), min(W0.shape), f.A.shape[0], error))
        if targets is not None and torch.equal(W0, W1):  # named, yet the same in both
            unchanged.append(name)
    if unchanged:
        shown = ", ".join(repr(n) for n in unchanged[:3]) + (" ..." if len(unchanged) > 3 else "")
        warnings.warn(
            f"targets: {len(unchanged)} of {len(layers)} layers are equal in both models "
            f"({shown}); their adapters are zero",
            stacklevel=2,
        )
    conv1d = any(type(base[n]).__name__ == "Conv1D" for n in layers)  # PEFT's fan_in_fan_out
    saved = sorted(modules_to_save)
    carried = LoraConfig(
        task_type=task_type,
        fan_in_fan_out=conv1d,
        modules_to_save=saved or None,
        base_model_name_or_path=base_model_name_or_path,
    )
    extras = {
        f"{PREFIX}{name}": p.detach()
        for name, p in finetuned_model.named_parameters()
        if _inside(name, saved)
    }
    write_factors(directory, factors, carried=carried, extras=extras)
    uncaptured = _uncaptured(base_model, finetuned_model, layers, saved)
    return ExtractReport(tuple(report), uncaptured)


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The module of ``model`` that an adapter's module path ``name`` refers to.

    Exact name first; otherwise the unique module whose name is a dotted suffix of ``name``
    or has ``name`` as a dotted suffix (an adapter saved on ``BertForSequenceClassification``
    names ``bert.encoder...``, a ``BertModel`` calls it ``encoder...``).
    """
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    hits = [n for n in modules if n and (matches_name(name, n) or matches_name(n, name))]
    if len(hits) != 1:
        found = "none" if not hits else ", ".join(hits[:5])
        raise KeyError(
            f"adapter module {name!r}: expected one matching module in the model, found {found}"
        )
    return modules[hits[0]]


def _dora_magnitudes(directory: PathLike) -> dict[str, Tensor]:
    """``{module: m (out,)}``: a DoRA adapter's magnitude vectors under their module paths."""
    suffix = "." + MAGNITUDE
    return {
        k[len(PREFIX) : -len(suffix)]: v
        for k, v in read_extras(directory).items()
        if k.startswith(PREFIX) and k.endswith(suffix)
    }


def dora_noise(W: Tensor, eps: float) -> float:
    """The spectral norm below which a DoRA update ``m ⊙ V/‖V‖_row − W`` is rounding noise.

    Untrained, ``m`` is ``‖W‖_row`` rounded to the adapter's dtype, so the update scales each
    row of ``W`` by ``δ_i`` with ``|δ_i|`` about the unit roundoff ``eps/2``: its norm is at most
    ``~eps/2 · ‖W‖₂``. float32/float64: NumPy's ``max(shape)·eps·‖W‖₂`` (room for the norm's
    own summation error). float16/bfloat16: ``0.55·eps·‖W‖₂``, that bound with 10% to spare
    (``m`` is the float32 norm rounded once, ``|δ_i| < eps/2``; NumPy's rule exceeds ‖W‖₂ for
    bfloat16 from 128 columns on and would call every update zero, and ``2·eps`` called a
    trained bfloat16 update of 1.5% of ‖W‖₂ zero), and at least float32's."""
    norm = float(torch.linalg.matrix_norm(W, ord=2))
    if eps <= torch.finfo(torch.float32).eps:
        return max(W.shape) * eps * norm
    return max(0.55 * eps, max(W.shape) * torch.finfo(torch.float32).eps) * norm


def adapter_amplification(
    model: nn.Module,
    directory: PathLike,
    *,
    rank: int | None = None,
    generator: torch.Generator | int | None = None,
) -> tuple[ModuleAmplification, ...]:
    """:func:`amplification` of each module's update ``ΔW`` against the model's ``W``.

    ``ΔW = s·B A`` for LoRA; for DoRA it is the whole change ``m ⊙ (W + s·B A)/‖W + s·B A‖ − W``
    (norms per output row), which is not of rank ``r``. ``rank`` defaults to each module's
    adapter rank (the paper's Table 7 uses ``r``); it is capped at that rank, at ``min(out,
    in)`` and at the numerical rank of the update (directions beyond it are arbitrary). A
    module whose update is zero (an untrained adapter, ``B = 0``) is refused by name.
    ``model`` is the base model the adapter was trained on.
    """
    gen = as_generator(generator)
    magnitudes = _dora_magnitudes(directory) if read_config(directory).use_dora else None
    rows = []
    for module, f in read_factors(directory).items():
        W = linear_weight(find_module(model, module)).double()  # (out, in)
        if not bool(torch.isfinite(W).all()):
            raise ValueError(f"module {module!r}: the model's weight holds NaN or inf")
        product = f.B.double() @ f.A.double()  # (out, in): dense, as W is
        delta = product
        if W.shape != delta.shape:
            base = read_config(directory).base_model_name_or_path
            raise ShapeMismatchError(
                f"{directory}: module {module!r}: model weight {tuple(W.shape)}, adapter update "
                f"{tuple(delta.shape)}: the model is not the adapter's base"
                + (f" (recorded base: {base})" if base else "")
            )
        eps = torch.finfo(f.A.dtype).eps  # the adapter's rounding level
        if magnitudes is not None:
            if module not in magnitudes or magnitudes[module].shape != (W.shape[0],):
                found = tuple(magnitudes[module].shape) if module in magnitudes else "none"
                raise AdapterFormatError(
                    f"{directory}: module {module!r}: expected a DoRA magnitude vector of shape "
                    f"({W.shape[0]},); found {found}"
                )
            if not bool(torch.isfinite(magnitudes[module]).all()):
                raise AdapterFormatError(
                    f"{directory}: module {module!r}: the DoRA magnitude vector holds NaN or inf"
                )
            adapted = W + product
            norm = torch.linalg.vector_norm(adapted, dim=1, keepdim=True)  # (out, 1)
            delta = magnitudes[module].double()[:, None] / norm * adapted - W
            eps = max(eps, torch.finfo(magnitudes[module].dtype).eps)
        S = torch.linalg.svdvals(delta)
        if magnitudes is not None:  # DoRA's update is rounding noise of ‖W‖ when untrained
            noise = dora_noise(W, eps)
            available = int((S > noise).sum())
            # B A ≠ 0: trained, however small (a magnitude-only change below the rounding
            # cannot be told from none)
            if available == 0 and bool(product.any()):
                norm = float(torch.linalg.matrix_norm(W, ord=2))
                raise ValueError(
                    f"module {module!r}: the DoRA update (σ₁ {float(S[0]) / norm:.2%} of ‖W‖₂) "
                    f"is within the rounding of its {magnitudes[module].dtype} magnitude "
                    f"vector ({noise / norm:.2%} of ‖W‖₂): too small to measure in that dtype"
                )
        else:  # B A formed in float64 from the stored factors: no rounding of the adapter's
            available = numerical_rank(S, tuple(W.shape))  # dtype in it, only float64's
        if available == 0:
            raise ValueError(
                f"module {module!r}: the adapter's update is zero (untrained, B = 0?); "
                "amplification is defined for a non-zero update"
            )
        r = min(f.A.shape[0] if rank is None else rank, f.A.shape[0], available)
        rows.append(ModuleAmplification(module, amplification(W, delta, rank=r, generator=gen)))
    return tuple(rows)
