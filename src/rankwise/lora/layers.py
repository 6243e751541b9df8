"""LoRA layer wrappers: hold the original ``base_layer`` and add ``lora_A`` / ``lora_B``.

``h = W0 x + s · B (A x)`` with ``A: (r, in)``, ``B: (out, r)``, ``s`` the scaling rule
(Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3). In a forward
with autograd (training) ``x`` is projected down to ``r`` features first and the scale is
applied to that small tensor; each of the frozen layer's GEMMs then either adds the rank-r
term onto the base output (factored) or runs on a weight-sized ``W + s·B A`` formed for that
GEMM alone and never kept, whichever costs less for the batch's row count
(:mod:`rankwise.lora.linear_ops`, ``gemm_merge_pays``). With ``lora_dropout = 0`` no dropout
module exists at all.

Attribute and parameter names equal PEFT's on-disk names (``lora_A.weight``,
``lora_B.weight``; embeddings ``lora_embedding_A`` / ``lora_embedding_B`` as bare
parameters; the base layer's own tensors under ``base_layer.``), so a state dict needs no
rename table. Shapes follow PEFT 0.21.2 (``peft/tuners/lora/layer.py``):

==========================  ============================  ===============================
base layer                  lora_A                        lora_B
==========================  ============================  ===============================
``nn.Linear(in, out)``      ``Linear(in, r)`` (r, in)     ``Linear(r, out)`` (out, r)
``Conv1D(out, in)`` (GPT-2) ``Linear(in, r)`` (r, in)     ``Linear(r, out)`` (out, r)
``nn.ConvNd(in, out, k)``   ``ConvNd(in, r, k, stride,    ``ConvNd(r, out, 1)`` (out, r, 1…)
                            padding)`` (r, in, *k)
``nn.Embedding(n, d)``      ``lora_embedding_A`` (r, n)   ``lora_embedding_B`` (d, r)
==========================  ============================  ===============================

Inference cache: in eval mode with autograd off, a linear wrapper whose base weight and
adapter share a dtype runs ``x (W0 + s·B A)ᵀ + b`` — one GEMM, the base layer's cost — with the
merged weight formed once and kept until a weight changes (keyed on the identity and version
counter of ``W0``, ``A``, ``B`` and on a count of ``torch.optim`` steps, which also catches fused
optimizers that bypass the version counters, so an optimizer step, ``load_adapter`` or a merge
rebuilds it)
and dropped by ``train()`` (so ``model.eval()`` after a write through ``.data``, which no
version counter sees, rebuilds it too). It costs one extra ``(out, in)`` matrix per adapted
layer while in eval mode; :func:`set_inference_cache` turns it off (the three-GEMM path then runs, with no
extra memory). The weights themselves are never modified, so results stay reproducible.

The *parametrization* axis (vanilla here; DoRA in :mod:`rankwise.lora.dora`, AdaLoRA in
:mod:`rankwise.lora.adalora`) is the pair of methods :meth:`LoraLayer.adapted_forward` and
:meth:`LoraLayer.merged_weight` / :meth:`LoraLayer.unmerged_weight`; a variant subclasses a
wrapper (or :class:`LoraLayer` itself, as AdaLoRA's ``P Λ Q`` does) and overrides them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.compiler import is_compiling

from rankwise.errors import ShapeMismatchError
from rankwise.lora.cache_key import weights_key
from rankwise.lora.linear_ops import (
    SMALL_ROWS_MAX,
    LoraLinearFunction,
    autograd_transforms_active,
    lora_linear,
    lora_linear_autograd,
    merged_linear,
    route_merges,
)
from rankwise.lora.merge_writes import MergeWrites
from rankwise.lora.module_kinds import (  # noqa: F401 (re-exported: their home was here)
    _plain,
    is_hf_conv1d,
    linear_dims,
    plain_adapter,
)

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# buffers holding the initial factors A0, B0 of an initializer that moved s·B0 A0 out of the
# base weight (PiSSA, OLoRA, LoRA-GA: rankwise.lora.init_svd.record_initial_factors)
INIT_A = "lora_A_init"
INIT_B = "lora_B_init"


class LoraFactors(NamedTuple):
    """The adapter as matrices: ``ΔW = s · B @ A`` with ``A: (r, in)``, ``B: (out, r)``."""

    A: Tensor
    B: Tensor


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters of float16/bfloat16 models are kept in float32 (as PEFT's autocast default)."""
    return torch.float32 if base_dtype in _LOW_PRECISION else base_dtype


class LoraLayer(MergeWrites, nn.Module):
    """Base of every wrapper: ``h = base_layer(x) + s · B A x`` (see the module docstring).

    Attributes: ``base_layer`` (the original module), ``lora_A`` / ``lora_B``, ``r``,
    ``lora_alpha``, ``scaling`` (``s``), ``lora_dropout`` (the probability), ``merged``
    (``ΔW`` currently added into the base weight) and ``disabled`` (adapter bypassed).
    """

    kind: ClassVar[str] = "abstract"
    parametrization: ClassVar[str] = "vanilla"

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        lora_alpha: float,
        scaling: float,
        lora_dropout: float,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.scaling = float(scaling)
        self.lora_dropout = float(lora_dropout)
        # p = 0: no module, no call, no copy of x
        self.dropout: nn.Module | None = nn.Dropout(lora_dropout) if lora_dropout > 0 else None
        self.merged = False
        self.disabled = False
        # eval + no grad: forward with a cached merged weight (see the module docstring)
        self.inference_cache = True

    @property
    def _dtype(self) -> torch.dtype:
        """The adapter's dtype: its factors' own, so it follows ``model.to(dtype)`` (PEFT casts
        the input to ``lora_A``'s dtype); before the factors exist, the dtype they are made in."""
        try:
            return self.factors()[0].dtype
        except AttributeError:  # during __init__
            return adapter_dtype(self.base_weight.dtype)

    def __getattr__(self, name: str) -> object:
        """Attributes the wrapper lacks come from ``base_layer`` (``weight``, ``bias``,
        ``in_features``, ``padding_idx``, …), so model code that reads them keeps working."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if name == "base_layer" or "base_layer" not in modules:
                raise
            return getattr(modules["base_layer"], name)

    def train(self, mode: bool = True) -> LoraLayer:
        self.drop_inference_cache()  # the inference cache is for eval mode only
        return super().train(mode)

    # The caches' keys hold weak references to the weights (cache_key._Same), and
    # torch.utils.swap_tensors refuses a tensor that has one: ``.to()``/``.half()`` under
    # torch.__future__.set_swap_module_params_on_conversion(True) (always for wrapper-subclass
    # parameters) and ``load_state_dict`` under it failed after one cached forward, leaving the
    # model half converted. Both make the caches stale anyway: dropped first.
    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> LoraLayer:
        self.drop_inference_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.drop_inference_cache()  # runs before the children's tensors are loaded
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles (``copy.deepcopy``, ``torch.save(model)``) leave the inference
        cache behind: one ``(out, in)`` matrix per layer, rebuilt on the next eval forward."""
        state = self.__dict__.copy()
        state.pop("_eval_weight", None)
        return state

    def drop_inference_cache(self) -> None:
        """Free the cached inference weight (it is rebuilt on the next eval forward)."""
        self.__dict__.pop("_eval_weight", None)

    def use_inference_cache(self) -> bool:
        """True when forward may run on the cached inference weight: eval mode, autograd off,
        not being traced by ``torch.compile`` (its key compares data pointers, which a graph
        cannot hold: compiled code forms the product in the graph instead)."""
        return (
            self.inference_cache
            and not self.training
            and not torch.is_grad_enabled()
            and not is_compiling()
            and not autograd_transforms_active()
        )

    def cached_weight(self, key: tuple[object, ...], build: Callable[[], Tensor]) -> Tensor:
        """The inference weight for ``key`` (see :func:`weights_key`), built once per key."""
        cached = self.__dict__.get("_eval_weight")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            weight = build()
        self.__dict__["_eval_weight"] = (key, weight)
        return weight

    def set_dropout(self, p: float) -> None:
        """Change the dropout probability of the adapter path (no module at all for p = 0)."""
        if self.kind == "embedding":
            return  # token ids are never dropped (as PEFT)
        self.lora_dropout = float(p)
        self.dropout = nn.Dropout(p).train(self.training) if p > 0 else None

    # -- the base weight seen as the matrix of a linear map ------------------------------------
    @property
    def base_weight(self) -> Tensor:
        return self.base_layer.weight

    def base_matrix(self) -> Tensor:
        """The base weight as ``W: (out, in)`` (a view; transposed or flattened by layer type)."""
        raise NotImplementedError

    def _from_matrix(self, delta: Tensor) -> Tensor:
        """Inverse of :meth:`base_matrix`'s layout: ``(out, in)`` -> the base weight's shape."""
        raise NotImplementedError

    def factors(self) -> LoraFactors:
        """``A: (r, in)``, ``B: (out, r)`` as (views of) the live parameters."""
        raise NotImplementedError

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape of the adapter this class would add to ``base``."""
        raise NotImplementedError

    def initialize_extras(self, initializer: str, generator: torch.Generator | None) -> None:
        """Initialize what a parametrization adds beyond ``A`` and ``B`` (AdaLoRA's λ), right
        after ``initializer`` set the factors; nothing for vanilla LoRA."""

    def set_factors(self, A: Tensor, B: Tensor) -> None:
        """Copy ``A: (r, in)`` and ``B: (out, r)`` into the parameters (no autograd record)."""
        cur = self.factors()
        for name, new, old in (("A", A, cur.A), ("B", B, cur.B)):
            if tuple(new.shape) != tuple(old.shape):
                raise ShapeMismatchError(
                    f"{type(self).__name__}.{name}: expected shape {tuple(old.shape)}, "
                    f"found {tuple(new.shape)}"
                )
        with torch.no_grad():
            cur.A.copy_(A)
            cur.B.copy_(B)

    def set_base_matrix(self, W: Tensor) -> None:
        """Replace the base weight with ``W: (out, in)`` (residual initializers, e.g. PiSSA)."""
        with torch.no_grad():
            self.base_weight.copy_(self._from_matrix(W.to(self.base_weight.dtype)))

    # -- parametrization hook: vanilla LoRA --------------------------------------------------
    def delta_weight(self) -> Tensor:
        """``s · B A`` in :meth:`merge_dtype` and in the base weight's layout (for merging)."""
        A, B = self.factors()
        dt = self.merge_dtype()
        return self._from_matrix((B.to(dt) * self.scaling) @ A.to(dt))

    def merge_dtype(self) -> torch.dtype:
        """The precision merge and unmerge compute in: float32 for half-precision weights,
        the weight's own for float32/float64 (a float64 model is not rounded through float32)."""
        return torch.promote_types(self.base_weight.dtype, torch.float32)

    def merged_weight(self, weight: Tensor) -> Tensor:
        """Float32 base weight -> merged weight ``W0 + s B A``."""
        return weight + self.delta_weight()

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        """Float32 merged weight -> base weight ``W - s B A`` (inverse of merged_weight)."""
        return weight - self.delta_weight()

    def adapted_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled and not self.merged and INIT_B in self._buffers:
            return self.original_base_forward(x)  # the residual base is not the model's base
        if self.merged or self.disabled:
            return self.base_layer(x)
        return self.adapted_forward(x)

    def original_base_forward(self, x: Tensor) -> Tensor:
        """The base layer with its weight before the initializer moved ``s·B0 A0`` out of it
        (:meth:`original_base_weight`), formed for this call (a linear layer adds the rank-r
        term instead: :meth:`LoraLinear.original_base_forward`)."""
        original = self.original_base_weight()
        return torch.func.functional_call(self.base_layer, {"weight": original}, (x,))

    def original_base_weight(self) -> Tensor | None:
        """The base weight before an initializer moved ``s·B0 A0`` out of it (PiSSA, OLoRA,
        LoRA-GA): ``W_res + s·B0 A0`` in the base weight's layout and dtype (computed in
        float32 at least, rounded once); None when the base weight is the original."""
        return self.shifted_base_weight(+1)

    def shifted_base_weight(self, sign: int, weight: Tensor | None = None) -> Tensor | None:
        """``W ± s·B0 A0`` (the initial factors) for the base weight ``W`` (default: the live
        one; a saved copy of it otherwise), in its layout, summed in :meth:`merge_dtype` and
        rounded once to its dtype; None when there are none (the base weight is the original)."""
        A0, B0 = self._buffers.get(INIT_A), self._buffers.get(INIT_B)
        if A0 is None or B0 is None:
            return None
        W = (self.base_weight if weight is None else weight).detach()
        dtype = self.merge_dtype()
        delta = self._from_matrix(self.scaling * (B0.to(dtype) @ A0.to(dtype)))
        return (W.to(dtype) + sign * delta).to(W.dtype)

    def _project_up(self, result: Tensor, h: Tensor, B: Tensor) -> Tensor:
        """``result + s · h @ B.T`` with ``s`` folded into the fused matmul (one allocation).

        ``h: (..., r)``, ``B: (out, r)``, ``result: (..., out)``.
        """
        if result.dtype != h.dtype:  # add in the adapter's (wider) dtype, round once (as PEFT)
            return (result.to(h.dtype) + F.linear(h, B) * self.scaling).to(result.dtype)
        out_f = result.shape[-1]
        # (N, out) = (N, out) + s * (N, r) @ (r, out): scale applied inside the GEMM
        fused = torch.addmm(
            result.reshape(-1, out_f), h.reshape(-1, h.shape[-1]), B.t(), alpha=self.scaling
        )
        return fused.view(result.shape)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` (``W: (out, in)``) or transformers' ``Conv1D`` (``W: (in, out)``,
    ``fan_in_fan_out``). ``h = base(x) + s · (dropout(x) A^T) B^T``."""

    kind = "linear"

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
        self.fan_in_fan_out, self.in_features, self.out_features = linear_dims(base_layer)
        w = self.base_weight
        kw = {"bias": False, "device": w.device, "dtype": self._dtype}
        self.lora_A = nn.Linear(self.in_features, r, **kw)
        self.lora_B = nn.Linear(r, self.out_features, **kw)

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        _, in_f, out_f = linear_dims(base)
        return {"lora_A.weight": (r, in_f), "lora_B.weight": (out_f, r)}

    def base_matrix(self) -> Tensor:
        return self.base_weight.t() if self.fan_in_fan_out else self.base_weight

    def _from_matrix(self, delta: Tensor) -> Tensor:
        return delta.t() if self.fan_in_fan_out else delta

    def factors(self) -> LoraFactors:
        return LoraFactors(self.lora_A.weight, self.lora_B.weight)

    def _in_place_is_safe(self, what: str) -> bool:
        cls = type(self)
        if (
            cls.merged_weight is not LoraLayer.merged_weight  # DoRA and others: their own rule
            or cls.unmerged_weight is not LoraLayer.unmerged_weight
            or cls.delta_weight is not LoraLayer.delta_weight
            or (what == "merge") == self.merged  # the wrong state: planned_weight says so
        ):
            return False
        W, (A, B) = self.base_weight, self.factors()
        # a half-precision base with float32 factors (inject's adapters on a bf16/fp16 model):
        # in place too, each layer formed in float32 and rounded at its write (_in_place_write)
        half = W.dtype in (torch.bfloat16, torch.float16) and A.dtype == B.dtype == torch.float32
        full = W.dtype in (torch.float32, torch.float64) and A.dtype == B.dtype == W.dtype
        if (
            not (half or full)  # full: delta_weight in W's own dtype
            or W.is_meta
            or not (A.device == B.device == W.device)
            or min(W.numel(), A.numel(), B.numel()) == 0
        ):
            return False
        with torch.no_grad():
            low, high = torch.aminmax(W)  # one read of W, no temporary of its size
            bound = max(abs(float(low)), abs(float(high))) + abs(self.scaling) * A.shape[0] * (
                float(A.abs().max()) * float(B.abs().max())
            )
        return math.isfinite(bound) and bound < torch.finfo(W.dtype).max / 4

    def _in_place_write(self, what: str) -> None:
        """``W ± s·B A`` written into the weight: the same two roundings as the formed route
        (``s·B A`` rounded once, then the sum), with one weight-sized temporary at a time. (An
        ``addmm_`` into the weight adds the r rank-1 terms one by one at W's magnitude: a merge
        and unmerge round trip then drifted to 1.09e-6 relative, above the 1e-6 promised.)"""
        if self.base_weight.dtype in (torch.bfloat16, torch.float16):
            # planned_weight's own formula and rounding, one layer's temporary at a time and
            # no finiteness pass (the bound proved it): merging every layer of a bf16 model
            # kept all the new weights first (+1.65 GB on a 1B model, PEFT +0.25)
            self.base_weight.copy_(self._formed_weight(what))
            return
        delta = self.delta_weight()  # W's dtype and layout (write_weight: no_grad)
        if what == "merge":
            self.base_weight.add_(delta)
        else:
            self.base_weight.sub_(delta)

    def weight_right(self) -> Tensor:
        """The base weight as the right factor of ``x @ W^T``: ``(in, out)``, a view."""
        W = self.base_weight
        return W if self.fan_in_fan_out else W.t()

    def adapted_forward(self, x: Tensor) -> Tensor:
        # submodules read from _modules once: each attribute lookup through nn.Module's
        # __getattr__ (and the wrapper's own) costs ~0.5 µs, which shows at a few tokens
        modules = self._modules
        base = modules["base_layer"]
        lora_A, lora_B = modules["lora_A"], modules["lora_B"]
        W, A = base.weight, lora_A.weight
        # hooks or a replaced forward on any of the three modules: called as modules; mixed
        # dtypes (a float32 adapter on a bf16 base) and autocast (the custom node's backward
        # runs outside it): plain ops, which autocast and type promotion handle
        if (
            not plain_adapter(base, lora_A, lora_B)
            or not x.dtype == A.dtype == W.dtype
            or torch.is_autocast_enabled(x.device.type)
            or x.dim() == 0  # wrong shapes: the base layer's own error, as nn.Linear's
            or x.shape[-1] != A.shape[1]
        ):
            return self._module_forward(x)
        B, b = lora_B.weight, base.bias
        transforms = autograd_transforms_active()
        if (  # use_inference_cache(), inline: this runs per call at a few tokens
            self.inference_cache
            and not self.training
            and not torch.is_grad_enabled()
            and not is_compiling()
            and not transforms
        ):
            # inference: one GEMM with W0 + s·B A, formed once per weight version
            return F.linear(x, self._merged_matrix(W, A, B), b)
        x2d = x.reshape(-1, x.shape[-1])  # (N, in): a view for contiguous x, no copy
        # dropout on the adapter path only (the base GEMM sees x itself); None: same as x
        xa = self.dropout(x2d) if self.dropout is not None and self.training else None
        Wt = W if self.fan_in_fan_out else W.t()  # (in, out), a view
        if x2d.shape[0] <= SMALL_ROWS_MAX or transforms:
            # a few rows: three plain GEMMs (torch's own nodes), less per-op overhead; and
            # under torch.func / forward-mode AD, which the custom node does not support
            y = lora_linear_autograd(x2d, Wt, b, A, B, self.scaling, xa)
        elif torch.is_grad_enabled():
            # one autograd node, hand-written backward; W + s·BA as a temporary when it pays
            y = LoraLinearFunction.apply(x2d, Wt, b, A, B, self.scaling, xa)
        elif self.training and route_merges(x2d.shape[0], x2d.shape[1], W.dtype, xa):
            # no autograd in train mode (reentrant checkpointing's first pass): the node's route
            y = merged_linear(x2d, Wt, b, A, B, self.scaling)
        else:
            y = lora_linear(x2d, Wt, b, A, B, self.scaling, xa).y
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)

    def original_base_forward(self, x: Tensor) -> Tensor:
        """``W_res x + s·B0 (A0 x)``: the original base layer's output without forming its
        weight (the base layer runs as a module: its hooks see the call)."""
        A0, B0 = self._buffers[INIT_A], self._buffers[INIT_B]  # (r, in), (out, r)
        h = F.linear(x if x.dtype == A0.dtype else x.to(A0.dtype), A0)  # (..., r)
        return self._project_up(self.base_layer(x), h, B0)

    def inference_weight(self) -> Tensor:
        """``W0 + s·B A`` as ``(out, in)`` in the base dtype, cached until a weight changes."""
        A, B = self.factors()
        return self._merged_matrix(self.base_weight, A, B)

    def _merged_matrix(self, W: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """:meth:`inference_weight` from the base weight as stored and the factors."""
        # a Conv1D's (in, out) weight and its (out, in) view share data_ptr and version
        key = (*weights_key(W, A, B), self.scaling)
        Wm = W.t() if self.fan_in_fan_out else W  # (out, in), a view
        # same dtype as the adapter here (float32/float64): the merge's own rounding
        return self.cached_weight(key, lambda: torch.addmm(Wm, B, A, alpha=self.scaling))

    def _module_forward(self, x: Tensor) -> Tensor:
        """General path: the base layer run as a module (hooks, subclasses, mixed dtypes), the
        factors too when they are not plain (hooks, accelerate's offloading)."""
        lora_A, lora_B = self.lora_A, self.lora_B
        # in the adapter's dtype, then dropout (as PEFT: x / (1 - p) not rounded to a half
        # precision first)
        h = x if x.dtype == lora_A.weight.dtype else x.to(lora_A.weight.dtype)
        h = h if self.dropout is None else self.dropout(h)
        result = self.base_layer(x)
        if _plain(lora_A) and _plain(lora_B):
            # (..., r): project down first, never form B @ A; s folded into the up-projection
            return self._project_up(result, F.linear(h, lora_A.weight), lora_B.weight)
        up = lora_B(lora_A(h)) * self.scaling
        if up.dtype != result.dtype:  # add in the adapter's dtype, round once (as PEFT)
            return (result.to(up.dtype) + up).to(result.dtype)
        return result + up


def wrapper_kind(module: nn.Module) -> str | None:
    """Key of :data:`rankwise.lora.registry.WRAPPERS` for ``module``, or None if it cannot be adapted."""
    if isinstance(module, LoraLayer):
        return None
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    return None


# moved to their own modules; these names keep working for imports and for models pickled
# before the move (torch.save(model) records rankwise.lora.layers.LoraEmbedding, ...)
_MOVED = {
    "LoraEmbedding": "rankwise.lora.embedding",
    "LoraConv": "rankwise.lora.conv",
    "WRAPPERS": "rankwise.lora.registry",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
