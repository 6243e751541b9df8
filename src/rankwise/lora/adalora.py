"""AdaLoRA: the SVD-form adapter ``ΔW = P Λ Q`` whose rank budget is reallocated in training.

Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
(ICLR), eq. (3): ``W = W0 + ΔW = W0 + P Λ Q`` with ``P: (out, r)``, ``Λ = diag(λ): (r, r)``,
``Q: (r, in)``; the triplets ``(P_{:,i}, λ_i, Q_{i,:})`` are pruned by importance (see
:mod:`rankwise.lora.adalora_alloc`) by zeroing ``λ_i``, and ``P``, ``Q`` are kept near
orthogonal by the regularizer of eq. (4), ``R(P, Q) = ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F``.

Names, shapes and numbers are PEFT 0.21.2's (``peft/tuners/adalora/layer.py``), so files are
interchangeable: ``lora_A = Q: (r, in)``, ``lora_E = λ: (r, 1)``, ``lora_B = P: (out, r)``
(bare parameters: file keys ``<module>.lora_A`` without ``.weight``), initialized
``λ = 0``, ``P, Q ~ N(0, 0.02²)`` (so the output is unchanged at step 0 while all three
receive gradients), and

    h = W0 x + (α / (r_init + 1e-5)) · P (λ ⊙ (Q x))

where the divisor is PEFT's ``ranknum``, the *initial* rank, kept when ranks shrink.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankwise.errors import ConfigError
from rankwise.lora.config import LoraConfig
from rankwise.lora.conv import ConvMatrix
from rankwise.lora.initializers import LoraInit
from rankwise.lora.layers import LoraFactors, LoraLayer
from rankwise.lora.module_kinds import linear_dims

RANKNUM_EPS = 1e-5  # PEFT: scaling / (ranknum + 1e-5)
INIT_STD = 0.02  # PEFT AdaLoraLayer.reset_lora_parameters


@dataclass
class AdaLoraConfig(LoraConfig):
    """``peft.AdaLoraConfig`` field for field (``peft_type`` ``"ADALORA"``).

    * ``init_r``: the rank every adapted layer starts with; ``target_r``: the average rank left
      at the end (budget ``target_r × #layers``); ``r`` is ignored (as PEFT).
    * schedule: ``tinit`` warm-up steps at the full budget, then the cubic decrease to the
      target until ``total_step - tfinal``, then ``tfinal`` steps at the final ranks; masks are
      recomputed every ``deltaT`` steps.
    * ``beta1`` / ``beta2``: EMA factors of sensitivity and uncertainty (paper eq. 9–10);
      ``orth_reg_weight``: weight of the orthogonality regularizer (eq. 4).
    * ``rank_pattern``: ``"<module>.lora_E" -> [bool] * init_r``, the triplets kept
      (written by the allocator, saved in the file; PEFT's meaning, not LoRA's).
    """

    peft_type: ClassVar[str] = "ADALORA"

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's field name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, Any] = field(default_factory=dict)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.init_lora_weights == "gaussian":  # PEFT's AdaLoRA: any true value is its init
            self.init_lora_weights = True
        pattern = dict(self.rank_pattern or {})
        self.rank_pattern = {}  # LoRA's meaning (regex -> int) is validated by the parent
        super().__post_init__()
        self.rank_pattern = _check_masks(pattern, self.init_r)
        _check_adalora(self)

    @property
    def parametrization(self) -> str:
        """Row ``"adalora"`` of :data:`rankwise.lora.registry.WRAPPERS`."""
        return "adalora"

    @property
    def initializer(self) -> str:
        """PEFT's AdaLoRA inits: ``"adalora"`` (P, Q ~ N(0, 0.02²), λ = 0) for
        ``init_lora_weights=True``, ``"adalora_random"`` (P, Q, λ ~ N(0, 1)) for False."""
        return "adalora" if self.init_lora_weights is True else "adalora_random"

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """``init_r`` — or the number of kept triplets recorded in ``rank_pattern`` — and alpha."""
        mask = self.rank_pattern.get(f"{module_name}.lora_E")
        r = self.init_r if mask is None else int(sum(bool(b) for b in mask))
        return r, self.lora_alpha

    def scaling(self, *, r: int, alpha: float) -> float:
        """``α / (init_r + 1e-5)`` whatever the current rank (PEFT's ``scaling / ranknum``)."""
        return float(alpha) / (self.init_r + RANKNUM_EPS)


def _positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}: expected an int >= {low}, found {value!r}")


def _check_adalora(cfg: AdaLoraConfig) -> None:
    if getattr(cfg, "use_dora", False):
        raise ConfigError("use_dora: AdaLoRA cannot be combined with DoRA (as in PEFT)")
    _positive_int("init_r", cfg.init_r)
    _positive_int("target_r", cfg.target_r)
    _positive_int("deltaT", cfg.deltaT)
    _positive_int("tinit", cfg.tinit, allow_zero=True)
    _positive_int("tfinal", cfg.tfinal, allow_zero=True)
    if cfg.total_step is None:
        raise ConfigError("total_step: AdaLoRA needs the total number of training steps (> 0)")
    _positive_int("total_step", cfg.total_step)
    for name in ("beta1", "beta2"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ConfigError(f"{name}: expected a float in (0, 1), found {value!r}")
    orth = cfg.orth_reg_weight
    if isinstance(orth, bool) or not isinstance(orth, (int, float)) or not 0 <= orth < math.inf:
        raise ConfigError(f"orth_reg_weight: expected a finite number >= 0, found {orth!r}")
    if cfg.use_rslora:  # PEFT's AdaLoRA layer has no such option: the scale stays α / init_r
        raise ConfigError(
            "use_rslora: AdaLoRA scales by lora_alpha / init_r (as PEFT, which ignores "
            "use_rslora for AdaLoRA); found True"
        )
    if cfg.alpha_pattern:  # nor per-module alphas: one lora_alpha for every layer
        raise ConfigError(
            "alpha_pattern: AdaLoRA uses one lora_alpha for every layer (as PEFT, which "
            f"ignores alpha_pattern for AdaLoRA); found {cfg.alpha_pattern!r}"
        )
    if cfg.r != LoraConfig.r:  # PEFT's own warning
        warnings.warn(
            f"r={cfg.r} is not used by AdaLoRA and is ignored: init_r sets the initial rank "
            "and target_r the average rank kept",
            UserWarning,
            stacklevel=4,
        )
    if cfg.init_lora_weights not in (True, False):
        # PEFT's AdaLoRA reads any true value as its own init and never touches the base; the
        # residual initializers (PiSSA, OLoRA) would move the base weight with nothing (λ = 0)
        # to add it back
        raise ConfigError(
            "init_lora_weights: AdaLoRA initializes as PEFT does (True: P, Q ~ N(0, 0.02²), "
            f"λ = 0; False: P, Q, λ ~ N(0, 1)), found {cfg.init_lora_weights!r}"
        )
    if cfg.tinit >= cfg.total_step - cfg.tfinal:
        raise ConfigError(
            f"tinit/tfinal/total_step: no budgeting phase is left (tinit={cfg.tinit} must be < "
            f"total_step - tfinal = {cfg.total_step - cfg.tfinal})"
        )


def _check_masks(pattern: dict[str, Any], init_r: int) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = {}
    for key, mask in pattern.items():
        if not key.endswith(".lora_E"):
            raise ConfigError(f"rank_pattern: AdaLoRA keys end with '.lora_E', found {key!r}")
        if isinstance(mask, Tensor):
            mask = mask.view(-1).tolist()
        if not isinstance(mask, (list, tuple)) or len(mask) != init_r:
            raise ConfigError(
                f"rank_pattern[{key!r}]: expected {init_r} booleans (init_r), found {mask!r}"
            )
        out[key] = [bool(b) for b in mask]
    return out


class AdaLoraLayer(LoraLayer):
    """The AdaLoRA triplets on a base layer: ``lora_A = Q: (r, in)``, ``lora_E = λ: (r, 1)``
    (zero at init), ``lora_B = P: (out, r)``, ``ΔW = s · P diag(λ) Q`` with
    ``s = α / (r_init + 1e-5)``, in the layer's matrix view (:meth:`base_matrix`).

    ``factors()`` are the live ``Q = lora_A`` and ``P = lora_B`` (what ``set_factors``
    writes); :meth:`effective_factors` folds ``λ`` in. Subclasses: :class:`AdaLoraLinear`,
    :class:`AdaLoraConv`.
    """

    parametrization: ClassVar[str] = "adalora"

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        lora_alpha: float,
        scaling: float,
        lora_dropout: float,
    ) -> None:
        super().__init__(
            base_layer, r=r, lora_alpha=lora_alpha, scaling=scaling, lora_dropout=lora_dropout
        )
        self._set_dims(base_layer)
        kw = {"device": self.base_weight.device, "dtype": self._dtype}
        for name, shape in self.factor_shapes(base_layer, r).items():  # zero: λ = 0 at init
            setattr(self, name, nn.Parameter(torch.zeros(shape, **kw)))

    def _set_dims(self, base: nn.Module) -> None:
        """Set ``in_features`` / ``out_features`` (and the like) from the base layer."""
        raise NotImplementedError

    @classmethod
    def _matrix_dims(cls, base: nn.Module) -> tuple[int, int]:
        """``(in, out)`` of the base layer's matrix view (:meth:`base_matrix`)."""
        raise NotImplementedError

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        in_f, out_f = cls._matrix_dims(base)
        # Q: (r, in), λ: (r, 1), P: (out, r)
        return {"lora_A": (r, in_f), "lora_E": (r, 1), "lora_B": (out_f, r)}

    def factors(self) -> LoraFactors:
        return LoraFactors(self.lora_A, self.lora_B)

    def initialize_extras(self, initializer: str, generator: torch.Generator | None) -> None:
        """λ after the factors' initializer: ``N(0, 1)`` for ``"adalora_random"`` (PEFT's
        ``init_lora_weights=False``), else 0 (as built)."""
        if initializer == "adalora_random":
            with torch.no_grad():
                drawn = torch.randn(self.lora_E.shape, generator=generator)
                self.lora_E.copy_(drawn.to(self.lora_E.device, self.lora_E.dtype))

    def effective_factors(self) -> LoraFactors:
        """``(diag(λ) Q: (r, in), P: (out, r))`` with ``ΔW = s · P diag(λ) Q``."""
        return LoraFactors(self.lora_A * self.lora_E, self.lora_B)

    def delta_weight(self) -> Tensor:
        A, B = self.effective_factors()
        dt = self.merge_dtype()
        return self._from_matrix((B.to(dt) * self.scaling) @ A.to(dt))


class AdaLoraLinear(AdaLoraLayer):
    """AdaLoRA on ``nn.Linear`` / transformers ``Conv1D``:
    ``h = base(x) + s · P (λ ⊙ (Q x̃))``, ``s = α / (r_init + 1e-5)``, ``x̃ = dropout(x)``."""

    kind: ClassVar[str] = "linear"

    def _set_dims(self, base: nn.Module) -> None:
        self.fan_in_fan_out, self.in_features, self.out_features = linear_dims(base)

    @classmethod
    def _matrix_dims(cls, base: nn.Module) -> tuple[int, int]:
        _, in_f, out_f = linear_dims(base)
        return in_f, out_f

    def base_matrix(self) -> Tensor:
        return self.base_weight.t() if self.fan_in_fan_out else self.base_weight

    def _from_matrix(self, delta: Tensor) -> Tensor:
        return delta.t() if self.fan_in_fan_out else delta

    def adapted_forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)  # (..., out)
        if self.r == 0:  # every triplet pruned (PEFT allows r = 0): the base layer alone
            return result
        h = x if x.dtype == self._dtype else x.to(self._dtype)  # then dropout, as PEFT
        h = h if self.dropout is None else self.dropout(h)
        h = F.linear(h, self.lora_A) * self.lora_E.view(-1)  # (..., r): Q x̃, times λ
        return self._project_up(result, h, self.lora_B)  # + s · P (...)


class AdaLoraConv(ConvMatrix, AdaLoraLayer):
    """AdaLoRA on ``nn.Conv2d`` (PEFT's ``SVDConv2d``) and ``nn.Conv1d`` (``groups =
    dilation = 1``, zero padding, as for LoRA): ``Q: (r, in·prod(k))`` is a convolution of the
    base layer's kernel, stride and padding onto ``r`` channels (weighted by ``λ``) and ``P``
    a 1×1 convolution back; ``ΔW = s · P diag(λ) Q`` reshaped to ``(out, in, *k)``. PEFT
    forms that ``ΔW`` in every forward; here the two small convolutions never do (the same
    sum in another order). PEFT has no AdaLoRA on ``Conv1d``: such a file is rankwise's own.
    """

    kind: ClassVar[str] = "conv"

    def _set_dims(self, base: nn.Module) -> None:
        self.in_features, self.out_features = base.in_channels, base.out_channels

    @classmethod
    def _matrix_dims(cls, base: nn.Module) -> tuple[int, int]:
        k = math.prod(int(s) for s in base.kernel_size)
        return int(base.in_channels) * k, int(base.out_channels)

    def adapted_forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)  # (N, out, *spatial)
        if self.r == 0:  # every triplet pruned: the base layer alone
            return result
        base = self.base_layer
        conv = F.conv2d if isinstance(base, nn.Conv2d) else F.conv1d
        h = x if x.dtype == self._dtype else x.to(self._dtype)  # then dropout, as PEFT
        h = h if self.dropout is None else self.dropout(h)
        kernel = (self.lora_A * self.lora_E).view(self.r, self.in_features, *base.kernel_size)
        h = conv(h, kernel, None, base.stride, base.padding) * self.scaling  # (N, r, *spatial)
        ones = (1,) * len(base.kernel_size)
        up = conv(h, self.lora_B.view(self.out_features, self.r, *ones))  # (N, out, *spatial)
        if up.dtype != result.dtype:  # add in the adapter's dtype, round once (as PEFT)
            return (result.to(up.dtype) + up).to(result.dtype)
        return result + up


def adalora_init(
    weight: Tensor, *, r: int, scaling: float, embedding: bool, generator: torch.Generator | None
) -> LoraInit:
    """``Q: (r, in)``, ``P: (out, r)`` ~ ``N(0, 0.02²)`` (λ stays 0): PEFT's AdaLoRA init."""
    out_f, in_f = weight.shape
    A = torch.randn(r, in_f, generator=generator) * INIT_STD
    B = torch.randn(out_f, r, generator=generator) * INIT_STD
    return LoraInit(A.to(weight.device, weight.dtype), B.to(weight.device, weight.dtype), None)


def adalora_random_init(
    weight: Tensor, *, r: int, scaling: float, embedding: bool, generator: torch.Generator | None
) -> LoraInit:
    """``Q: (r, in)``, ``P: (out, r)`` ~ ``N(0, 1)``: PEFT's AdaLoRA with
    ``init_lora_weights=False``, which keeps the factors as ``torch.randn`` drew them (λ too:
    :meth:`AdaLoraLayer.initialize_extras`), so the adapter changes the output at once."""
    out_f, in_f = weight.shape
    A = torch.randn(r, in_f, generator=generator)
    B = torch.randn(out_f, r, generator=generator)
    return LoraInit(A.to(weight.device, weight.dtype), B.to(weight.device, weight.dtype), None)


def orthogonal_regularization(model: nn.Module) -> Tensor:
    """Paper eq. (4), PEFT's average: ``mean over P, Q of ‖PᵀP − I‖_F`` and ``‖QQᵀ − I‖_F``.

    Add ``config.orth_reg_weight * orthogonal_regularization(model)`` to the training loss.
    Returns a zero tensor if the model has no AdaLoRA layer.
    """
    terms = []
    for module in model.modules():
        if isinstance(module, AdaLoraLayer):  # a layer pruned to r = 0 adds two zero terms
            for cov in (module.lora_A @ module.lora_A.T, module.lora_B.T @ module.lora_B):
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.matrix_norm(cov - eye))  # Frobenius, (r, r)
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def truncate_to_rank_pattern(
    tensors: dict[str, Tensor], rank_pattern: dict[str, list[bool]]
) -> dict[str, Tensor]:
    """Keep only the triplets ``rank_pattern`` marks, as PEFT writes AdaLoRA files.

    ``tensors``: state names (``<module>.lora_A`` (r, in), ``.lora_E`` (r, 1), ``.lora_B``
    (out, r)); a tensor is indexed only if it still has all ``init_r`` triplets (PEFT's
    ``resize_state_dict_by_rank_pattern``). Returns a new dict; the inputs are not modified.
    """
    out = dict(tensors)
    for key, mask in rank_pattern.items():
        module = key[: -len(".lora_E")]
        keep = torch.tensor(mask, dtype=torch.bool)
        for name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            full = f"{module}.{name}"
            t = out.get(full)
            if t is not None and t.shape[dim] == keep.numel() and int(keep.sum()) != keep.numel():
                out[full] = t.index_select(dim, keep.nonzero().view(-1).to(t.device))
    return out
