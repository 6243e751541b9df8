"""DoRA: weight-decomposed low-rank adaptation, as a parametrization of the LoRA wrappers.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. (5)::

    W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖        h = W' x + b

with the norm taken per output row of ``W: (out, in)`` (PEFT 0.21.2's ``get_weight_norm``;
for an embedding ``E: (n, d)`` per embedding dimension, i.e. per row of the map ``(d, n)``),
the magnitude ``m: (out,)`` a trainable vector initialized to ``‖W0 + s·B A‖`` (so the output
is unchanged at step 0; ``‖W0‖`` when ``B = 0``) and saved as PEFT's
``<module>.lora_magnitude_vector``. Following the paper's §4.3 the norm is treated as a
constant in backward (detached), which is what makes DoRA cheap to train.

Cost: with ``c = m / ‖·‖`` (out,), ``h = c ⊙ (W0 x + s·B (A x)) + b`` is computed with ``c``
folded into the weights (:class:`DoraLinearFunction`), so no pass over the activations is
spent on ``c`` except the one its gradient needs: ``x ((W0ᵀ + s·AᵀBᵀ) ⊙ c) + b``, one GEMM on a
weight-sized temporary, when the batch is large against the layer (LoRA's merged route,
:mod:`rankwise.lora.linear_ops`), else LoRA's three GEMMs ``x (W0ᵀ ⊙ c) + s·(x Aᵀ)(c ⊙ B)ᵀ + b``.
On a linear layer the row norms are read off ``W0 + s·BA`` formed as a weight-sized
temporary (the merged route's own matrix, so ``m`` set from it gives ``c = 1`` exactly at
step 0); an embedding's ``(d, n)`` map is vocabulary-sized, so there they come from the identity

    ‖W0 + s·BA‖²_row = ‖W0‖²_row + 2s·rowsum((W0 Aᵀ) ⊙ B) + s²·rowsum((B (A Aᵀ)) ⊙ B)

(``W0 Aᵀ``: (out, r); ``A Aᵀ``: (r, r)), with ``‖W0‖²_row`` cached. The norm is cached too,
keyed on the identity and version counter of ``W0``, ``A`` and ``B`` (every in-place change —
an optimizer step, ``load_adapter``, a merge — bumps a version), so in eval mode it is computed
once and reused until a weight changes, and in training it is recomputed after each step.
In eval mode without autograd (inference) the layer goes further and caches the DoRA weight
``c ⊙ (W0 + s·BA)`` itself — one extra ``(out, in)`` matrix per layer, dropped by ``train()``
and rebuilt when a weight changes — so inference costs one GEMM, as the base layer.

With dropout active in training the result is PEFT's
``base(x) + (c - 1) ⊙ W0 x̃ + c ⊙ s·B A x̃`` (``x̃`` the dropped-out input). Merging writes
``c ⊙ (W0 + s·BA)`` (``c`` from the unmerged weight, remembered for the exact unmerge).
Supported on ``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding`` and ``nn.Conv1d`` /
``nn.Conv2d`` (the norm per output channel, over each filter).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankwise.errors import MergeError
from rankwise.lora.cache_key import weights_key
from rankwise.lora.conv import LoraConv
from rankwise.lora.embedding import LoraEmbedding
from rankwise.lora.layers import LoraLayer, LoraLinear
from rankwise.lora.linear_ops import (
    LoraLinearOutput,
    autograd_transforms_active,
    differentiable_grads,
    lora_linear,
    lora_linear_autograd,
    lora_linear_backward,
    merge_pays,
    merged_right,
    rank_contract,
    rank_product_t,
)
from rankwise.lora.module_kinds import plain_adapter

MAGNITUDE = "lora_magnitude_vector"


def _norm_dtype(W: Tensor) -> torch.dtype:
    # norms in float32 at least; float64 weights keep float64
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def dora_row_norm(
    W: Tensor, A: Tensor, B: Tensor, scaling: float, w_sq: Tensor | None = None
) -> Tensor:
    """``‖W + s·B A‖`` per row, ``(out,)``, without forming the (out, in) matrix.

    ``W: (out, in)``, ``A: (r, in)``, ``B: (out, r)``; ``w_sq`` optionally the precomputed
    ``‖W‖²`` per row. Computed in float32 (float64 stays float64) under ``no_grad``.
    """
    dt = _norm_dtype(W)
    with torch.no_grad():
        W, A, B = W.to(dt), A.detach().to(dt), B.detach().to(dt)
        if w_sq is None:
            w_sq = W.square().sum(dim=1)  # (out,)
        cross = ((W @ A.T) * B).sum(dim=1)  # (out,): <W_i, (BA)_i>, W Aᵀ is (out, r)
        lora_sq = ((B @ (A @ A.T)) * B).sum(dim=1)  # (out,): ‖(BA)_i‖² via the (r, r) Gram
        sq = w_sq.to(dt) + (2.0 * scaling) * cross + (scaling * scaling) * lora_sq
        return sq.clamp_min(0.0).sqrt()


def dora_linear(
    x: Tensor, Wt: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float, c: Tensor
) -> LoraLinearOutput:
    """``y = c ⊙ (x Wt + s·(x Aᵀ) Bᵀ) + b`` with ``c`` folded into the weights, not the output.

    ``x: (N, in)``, ``Wt: (in, out)`` (the base weight as a right factor), ``A: (r, in)``,
    ``B: (out, r)``, ``c: (out,)``. Scaling the columns of ``Wt`` and the rows of ``B``
    (``(in, out)`` and ``(out, r)`` temporaries) costs a pass over the weights instead of one
    over the ``(N, out)`` output, and LoRA's three GEMMs then write the DoRA output directly.
    """
    return lora_linear(x, Wt * c, bias, A, B * c[:, None], scaling)


def column_dots(g: Tensor, y: Tensor, *, rows: int = 256) -> Tensor:
    """``Σ_n g[n, j] · y[n, j]``: ``(out,)`` for ``g, y: (N, out)``, in blocks of ``rows`` rows.

    One small product buffer is reused across the blocks: a full ``(N, out)`` temporary (as
    ``(g * y).sum(0)`` or ``vecdot`` make) is fresh memory every step, and its page faults cost
    several times the arithmetic on CPU.
    """
    n, out_f = g.shape
    acc = torch.zeros(out_f, dtype=g.dtype, device=g.device)
    buf = torch.empty(min(rows, n), out_f, dtype=g.dtype, device=g.device)
    for start in range(0, n, rows):
        k = min(rows, n - start)
        block = torch.mul(g[start : start + k], y[start : start + k], out=buf[:k])
        acc += block.sum(dim=0)
    return acc


class DoraLinearFunction(torch.autograd.Function):
    """:func:`dora_linear` as one autograd node (Liu et al. 2024, §4.3: the norm in
    ``c = m / ‖W0 + s·BA‖`` is detached before ``c`` gets here, so ``∂L/∂c`` flows to ``m``).

    With ``g = ∂L/∂y: (N, out)`` and ``y₀ = (y − b) / c`` the unscaled output::

        ∂L/∂c = Σ_n g ⊙ y₀ = (Σ_n g ⊙ y − b ⊙ Σ_n g) / c        (out,)
        ∂L/∂x, ∂L/∂A: LoRA's (:class:`LoraLinearFunction`) with ``Wt ⊙ c`` and ``c ⊙ B``
        ∂L/∂B = c ⊙ s·gᵀ h (rows)      ∂L/∂Wt = (xᵀ g) ⊙ c (columns)      ∂L/∂b = Σ_n g

    so no ``(N, out)`` pass is spent on ``c`` but the one ``∂L/∂c`` reads (autograd through a
    separate ``c ⊙ y + b`` spends four, with three ``(N, out)`` temporaries). Where some
    ``c_j = 0`` the unscaled output is recomputed instead of divided out. Saved: ``x``,
    ``s·hᵀ``, the output ``y``, ``Wt ⊙ c``; the weights and ``c`` by reference.

    ``Wc``: None for the factored route (the node forms ``Wt ⊙ c`` and runs LoRA's three
    GEMMs), or the merged route's right factor ``(Wt + s·Aᵀ Bᵀ) ⊙ c`` formed by the caller
    (:meth:`DoraLinear.adapted_forward` takes the column norms from the same matrix): then
    ``y = x Wc + b`` and ``∂L/∂x = g Wcᵀ``, the base layer's own GEMMs. On the merged route
    with a bias, ``s·hᵀ`` carries an extra row of ones, so the GEMM that forms ``∂L/∂B`` also
    yields ``Σ_n g`` (no separate pass over ``g`` for the bias term of ``∂L/∂c``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        Wt: Tensor,
        bias: Tensor | None,
        A: Tensor,
        B: Tensor,
        scaling: float,
        c: Tensor,
        Wc: Tensor | None = None,
    ) -> Tensor:
        merged = Wc is not None
        if Wc is not None:  # merged route
            y = torch.addmm(bias, x, Wc) if bias is not None else torch.mm(x, Wc)
            # (r, N) for ∂L/∂B, with a bias a last row of ones: its row of ∂L/∂B's GEMM is Σ_n g
            h_s_t = rank_product_t(x, (A * scaling).t(), ones_row=bias is not None)
        else:
            Wc = Wt * c  # (in, out)
            y, h_s_t = lora_linear(x, Wc, bias, A, B * c[:, None], scaling)
        # Wc is kept for ∂L/∂x either way (a weight-sized tensor, not an activation)
        ctx.save_for_backward(x, Wt, Wc, bias, A, B, c, h_s_t, y)
        ctx.scaling = scaling  # type: ignore[attr-defined]
        ctx.merged = merged  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, g: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, Wt, Wc, bias, A, B, c, h_s_t, y = ctx.saved_tensors  # type: ignore[attr-defined]
        s: float = ctx.scaling  # type: ignore[attr-defined]
        need_x, need_w, need_bias, need_a, need_b, _, need_c = ctx.needs_input_grad[:7]  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            # y = x (Wt ⊙ c) + b + s·(x Aᵀ)(c ⊙ B)ᵀ on either route (Wc's gradient is None)
            gx, gw, gbias, ga, gb, gc = differentiable_grads(
                lambda x, Wt, bias, A, B, c: lora_linear_autograd(
                    x, Wt * c, bias, A, B * c[:, None], s
                ),
                (x, Wt, bias, A, B, c),
                (need_x, need_w, need_bias, need_a, need_b, need_c),
                g,
            )
            return gx, gw, gbias, ga, gb, None, gc, None
        r = A.shape[0]
        ones_row = h_s_t.shape[0] > r  # a bias (either route): the last row is ones
        need_g_sum = need_bias or (need_c and bias is not None)
        # (r[+1], out): s·hᵀ g and, with the ones row, Σ_n g as its last row
        prod = rank_contract(h_s_t, g) if need_b or (ones_row and need_g_sum) else None
        gb = None
        if need_b:
            gb = prod[:r].t().contiguous().mul_(c[:, None])  # (out, r): c ⊙ s·gᵀ h
        g_sum = None
        if need_g_sum:
            g_sum = prod[r] if ones_row else g.sum(dim=0)  # (out,)
        # LoRA's backward on the scaled weights (Wt ⊙ c, c ⊙ B); the merged route's ∂L/∂x is
        # g Wcᵀ with Wc = (Wt + s·Aᵀ Bᵀ) ⊙ c
        gx, _, ga, _ = lora_linear_backward(
            g,
            x,
            Wc,
            A,
            B * c[:, None],
            h_s_t[:r],
            s,
            None,
            need=(need_x, False, need_a, False),
            merged=Wc if ctx.merged else None,  # type: ignore[attr-defined]
        )
        gw = gbias = gc = None
        if need_w:
            gw = torch.mm(x.t(), g).mul_(c)  # (in, out), Wt's layout
        if need_bias:
            gbias = g_sum
        if need_c:
            if bool((c == 0).any()):  # y₀ cannot be divided out: recompute it
                y0 = lora_linear(x, Wt, None, A, B, s).y
                gc = column_dots(g, y0)
            else:
                gy = column_dots(g, y)  # (out,) = Σ_n g ⊙ y
                gc = (gy if bias is None else gy - bias * g_sum) / c
        return gx, gw, gbias, ga, gb, None, gc, None


class DoraMixin:
    """The DoRA parametrization over a LoRA wrapper (see the module docstring).

    Adds ``lora_magnitude_vector: (out,)`` and overrides the parametrization hooks
    ``adapted_forward`` / ``merged_weight`` / ``unmerged_weight``.
    """

    parametrization: ClassVar[str] = "dora"

    def _magnitude_shape(self, out_f: int) -> tuple[int, ...]:
        """Shape of the magnitude parameter as PEFT stores it (a convolution's is 4-D)."""
        return (out_f,)

    def _magnitude(self) -> Tensor:
        """The magnitude ``m`` as a vector ``(out,)`` (a view of the parameter)."""
        return self.lora_magnitude_vector.view(-1)

    def _dora_setup(self) -> None:
        out_f = self.base_matrix().shape[0]
        w = self.base_weight
        self.lora_magnitude_vector = nn.Parameter(
            torch.ones(self._magnitude_shape(out_f), device=w.device, dtype=self._dtype)
        )
        self._w_sq: tuple[tuple[Any, ...], Tensor] | None = None
        self._norm: tuple[tuple[Any, ...], Tensor] | None = None
        self._merged_norm: Tensor | None = None
        self.reset_magnitude()

    # -- the magnitude follows the initialization ---------------------------------------------
    def reset_magnitude(self) -> None:
        """``m ← ‖W0 + s·B A‖`` per row: the adapted output equals the current one."""
        with torch.no_grad():
            self._magnitude().copy_(self.weight_norm())

    def set_factors(self, A: Tensor, B: Tensor) -> None:
        super().set_factors(A, B)  # type: ignore[misc]
        self.reset_magnitude()

    def set_base_matrix(self, W: Tensor) -> None:
        super().set_base_matrix(W)  # type: ignore[misc]
        self.reset_magnitude()

    def drop_inference_cache(self) -> None:
        """Also drop the cached norms: ``train()``/``eval()`` rebuild them, the remedy for a
        write through ``.data`` (which no version counter sees)."""
        super().drop_inference_cache()  # type: ignore[misc]
        self._norm = None
        self._w_sq = None

    # -- norms (cached, version-keyed) --------------------------------------------------------
    def weight_norm(self) -> Tensor:
        """``‖W0 + s·B A‖`` per output row (out,), detached; cached until a weight changes."""
        W = self.base_matrix()
        A, B = self.factors()
        if autograd_transforms_active():  # functorch's tensors have no storage to key on
            dt = _norm_dtype(W)
            M = W.detach().to(dt) + self.scaling * (B.detach().to(dt) @ A.detach().to(dt))
            return torch.linalg.vector_norm(M, dim=1)
        key = self._norm_key()
        if self._norm is not None and self._norm[0] == key:
            return self._norm[1]
        norm = self._row_norm(W, A, B)
        self._norm = (key, norm)
        return norm

    def _norm_key(self) -> tuple[Any, ...]:
        """What the cached norm depends on: ``W0``, ``A``, ``B`` (identity, version) and ``s``."""
        return (*weights_key(self.base_matrix(), *self.factors()), self.scaling)

    def _row_norm(self, W: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """By the identity of :func:`dora_row_norm`, ``‖W0‖²`` per row cached (embeddings)."""
        wkey = weights_key(W)
        if self._w_sq is None or self._w_sq[0] != wkey:
            with torch.no_grad():
                self._w_sq = (wkey, W.detach().to(_norm_dtype(W)).square().sum(dim=1))
        return dora_row_norm(W, A, B, self.scaling, self._w_sq[1])

    def _dora_scale(self, dtype: torch.dtype) -> Tensor:
        # c = m / ‖W0 + sBA‖ (out,): gradient flows to m only (norm detached, §4.3)
        return (self._magnitude() / self.weight_norm().to(self._dtype)).to(dtype)

    # -- merge: W' = c ⊙ (W0 + s BA), in the base weight's layout ----------------------------
    def _rows(self, t: Tensor, c: Tensor) -> Tensor:
        """Multiply the rows of the (out, in) matrix seen through ``t``'s layout by ``c``."""
        M = self._from_matrix(t)  # the layouts here are transposes: their own inverse
        return self._from_matrix(M * c[:, None])

    def merged_weight(self, weight: Tensor) -> Tensor:
        norm = self.weight_norm().to(weight.dtype)  # weight: in merge_dtype()
        self._merged_norm = norm.clone()
        c = self._magnitude().detach().to(weight.dtype) / norm
        return self._rows(weight + self.delta_weight(), c)

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        if self._merged_norm is None:
            raise MergeError(f"{type(self).__name__}: no weight norm recorded at merge time")
        c = self._magnitude().detach().to(weight.dtype) / self._merged_norm.to(weight.dtype)
        return self._rows(weight, 1.0 / c) - self.delta_weight()

    def write_weight(self, new: Tensor | None, what: str) -> None:
        """:meth:`LoraLayer.write_weight`; the norm recorded at merge time is dropped only once
        the unmerge is written (planning it, e.g. to save the unmerged weights of a merged
        model, left the layer merged with no way back)."""
        super().write_weight(new, what)  # type: ignore[misc]
        if what == "unmerge":
            self._merged_norm = None


class DoraLinear(DoraMixin, LoraLinear):
    """DoRA on ``nn.Linear`` / transformers ``Conv1D``: ``h = c ⊙ (W0 x + s·B A x) + b``."""

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
        self._dora_setup()

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        shapes = LoraLinear.factor_shapes(base, r)
        return {**shapes, MAGNITUDE: (shapes["lora_B.weight"][0],)}

    def inference_weight(self) -> Tensor:
        """``c ⊙ (W0 + s·BA)``, ``(out, in)``, cached until a weight changes (eval, no grad)."""
        W = self.base_matrix()
        A, B = self.factors()
        m = self.lora_magnitude_vector

        def build() -> Tensor:
            M = self._merged_t(_norm_dtype(W))  # (in, out), formed once
            c = m.detach().to(M.dtype) / torch.linalg.vector_norm(M, dim=0)
            return (M * c).t().to(W.dtype)  # (out, in)

        return self.cached_weight((*weights_key(W, A, B, m), self.scaling), build)

    def _merged_t(self, dtype: torch.dtype) -> Tensor:
        """``Wt + s·Aᵀ Bᵀ: (in, out)`` in ``dtype``, detached, in the base weight's layout."""
        A, B = self.factors()
        with torch.no_grad():
            return merged_right(
                self.weight_right().detach().to(dtype),
                A.detach().to(dtype),
                B.detach().to(dtype),
                self.scaling,
            )

    def _row_norm(self, W: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """Read off the columns of the merged ``(in, out)`` matrix (a weight-sized temporary:
        one pass, where the identity costs a GEMM with ``W0``), as the merged route does."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self._merged_t(_norm_dtype(W)), dim=0)

    def _merged_factor(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The merged route's ``(Wc, c)``: ``M = Wt + s·Aᵀ Bᵀ: (in, out)`` formed once (the
        same computation as :meth:`_row_norm`'s, so ``c = 1`` exactly where ``m`` was set from
        it), the norms read off its columns, ``c = m / norm`` (the gradient flows to ``m``
        only) and ``Wc = M ⊙ c`` in place. The norm is cached as :meth:`weight_norm`'s."""
        M = self._merged_t(dtype)  # (in, out), a temporary
        with torch.no_grad():
            norm = torch.linalg.vector_norm(M, dim=0)  # (out,)
        self._norm = (self._norm_key(), norm)
        c = self.lora_magnitude_vector / norm
        with torch.no_grad():
            M.mul_(c)
        return M, c

    def adapted_forward(self, x: Tensor) -> Tensor:
        W = self.base_matrix()  # (out, in), a view
        bias = self.base_layer.bias
        plain = plain_adapter(self.base_layer, self.lora_A, self.lora_B)
        A, B = self.lora_A.weight, self.lora_B.weight
        one_dtype = x.dtype == A.dtype == W.dtype and not torch.is_autocast_enabled(x.device.type)
        if plain and one_dtype and self.use_inference_cache():
            # inference: one GEMM with the cached DoRA weight, the base layer's cost (not for a
            # float32 adapter on a half-precision base: the merged weight would round c ⊙ ...)
            return F.linear(x, self.inference_weight(), bias)
        dropout = self.dropout is not None and self.training
        wrong_shape = x.dim() == 0 or x.shape[-1] != A.shape[1]  # the base layer's own error
        if dropout or not plain or not one_dtype or wrong_shape or autograd_transforms_active():
            # PEFT: base(x) + (c - 1) ⊙ W0 x̃ + c ⊙ s·B A x̃, x̃ = dropout(x); without dropout
            # W0 x̃ is base(x) less its bias (hooks, subclasses: the modules are called). Mixed
            # precision or autocast: in the adapter's dtype, rounded to the base's once
            c = self._dora_scale(self._dtype)  # (out,)
            result = self.base_layer(x)
            if dropout:  # in the adapter's dtype, then dropout (as PEFT)
                xd = self.dropout(x if x.dtype == self._dtype else x.to(self._dtype))
                base_part = F.linear(xd, W if W.dtype == xd.dtype else W.to(xd.dtype))
            else:
                xd, base_part = x, (result - bias if bias is not None else result)
            lora = self.lora_B(self.lora_A(xd.to(self._dtype)))
            dora = (c - 1) * base_part + c * lora * self.scaling
            return (result + dora).to(result.dtype)
        shape = (*x.shape[:-1], W.shape[0])
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        # one dtype, no autocast: (N, out) = c ⊙ (W0 x + s·B A x) + b, one node, c folded in
        Wt = self.weight_right()
        Wc: Tensor | None = None
        if merge_pays(x2.shape[0], x2.shape[1], W.shape[0], W.dtype):
            Wc, c = self._merged_factor(W.dtype)  # merged route
        else:
            c = self._dora_scale(x.dtype)  # (out,)
        if torch.is_grad_enabled():
            y = DoraLinearFunction.apply(x2, Wt, bias, A, B, self.scaling, c, Wc)
        elif Wc is not None:
            y = torch.addmm(bias, x2, Wc) if bias is not None else torch.mm(x2, Wc)
        else:
            y = dora_linear(x2, Wt, bias, A, B, self.scaling, c).y
        return y.view(shape)


class DoraEmbedding(DoraMixin, LoraEmbedding):
    """DoRA on ``nn.Embedding(n, d)``: ``h = c ⊙ (E[x] + s·(Aᵀ[x]) Bᵀ)``, ``c: (d,)``."""

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
        self._dora_setup()

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        shapes = LoraEmbedding.factor_shapes(base, r)
        return {**shapes, MAGNITUDE: (shapes["lora_embedding_B"][0],)}

    def adapted_forward(self, x: Tensor) -> Tensor:
        # PEFT's order and precision: the base lookup first (max_norm renormalizes W's rows),
        # then c from ‖W0 + s·BA‖, then A's lookup (which renormalizes A's rows); c ⊙ E[x] +
        # c ⊙ s·Aᵀ[x] Bᵀ formed in the adapter's dtype and rounded to the base's once
        result = self.base_layer(x)  # (..., d)
        c = self._dora_scale(self._dtype)  # (d,)
        dora = c * (self.lookup_a(x) @ self.lora_embedding_B.t()) * self.scaling  # (..., d)
        embed_scale = getattr(self.base_layer, "embed_scale", None)  # Gemma: after the norm
        if isinstance(embed_scale, Tensor):  # Gemma's buffer; BART and others hold a float
            dora = dora * embed_scale.to(dora.dtype)
        elif embed_scale is not None:
            dora = dora * embed_scale
        return (c * result + dora).to(result.dtype)


class DoraConv(DoraMixin, LoraConv):
    """DoRA on ``nn.Conv1d`` / ``nn.Conv2d``: ``h = c ⊙ (conv(x; W0) + s·conv_B(conv_A(x))) + b``
    with ``c = m / ‖W0 + s·BA‖`` per output channel (the norm over each filter, as PEFT's
    ``_DoraConvNdLayer``); ``m`` is stored as PEFT stores it, ``(1, out, 1[, 1])``."""

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
        self._dora_setup()

    def _magnitude_shape(self, out_f: int) -> tuple[int, ...]:
        return (1, out_f, *(1,) * len(self.base_layer.kernel_size))

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        shapes = LoraConv.factor_shapes(base, r)
        ones = (1,) * len(base.kernel_size)
        return {**shapes, MAGNITUDE: (1, int(base.out_channels), *ones)}

    def _rows(self, t: Tensor, c: Tensor) -> Tensor:
        """Scale the output channels (dim 0) of a weight-shaped ``t`` by ``c``."""
        return t * c.view(-1, *(1,) * (t.dim() - 1))

    def adapted_forward(self, x: Tensor) -> Tensor:
        # PEFT: base(x) + (c - 1) ⊙ conv(x̃; W0) + c ⊙ s·conv_B(conv_A(x̃)), x̃ = dropout(x);
        # without dropout conv(x̃; W0) is base(x) less its bias
        # in the adapter's dtype, rounded to the base's once (as PEFT)
        base = self.base_layer
        result = base(x)  # (N, out, *spatial)
        # (out, 1, ...): broadcasts over (N, out, *spatial) and an unbatched (out, *spatial)
        channels = (-1, *(1,) * len(base.kernel_size))
        c = self._dora_scale(self._dtype).view(channels)
        if self.dropout is not None and self.training:  # adapter's dtype, then dropout (PEFT)
            xd = self.dropout(x if x.dtype == self._dtype else x.to(self._dtype))
            weight = base.weight if base.weight.dtype == xd.dtype else base.weight.to(xd.dtype)
            base_part = base._conv_forward(xd, weight, None)
        else:
            xd = x
            base_part = result if base.bias is None else result - base.bias.view(channels)
        h = xd if xd.dtype == self._dtype else xd.to(self._dtype)
        lora = self.lora_B(self.lora_A(h))
        return (result + ((c - 1) * base_part + c * lora * self.scaling)).to(result.dtype)


# layer kind -> DoRA wrapper (the "dora" row of rankwise.lora.registry.WRAPPERS)
DORA_WRAPPERS: dict[str, type[LoraLayer]] = {
    "linear": DoraLinear,
    "embedding": DoraEmbedding,
    "conv": DoraConv,
}
