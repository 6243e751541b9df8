"""The LoRA linear map as tensor maths: ``y = x Wt + b + s·(x_a Aᵀ) Bᵀ``, its hand-written
backward, and the autograd node that joins them (Hu et al. 2021, eq. 3).

Pure functions of tensors, no module: :class:`~rankwise.lora.layers.LoraLinear` calls them
with its live weights, and DoRA's node (:mod:`rankwise.lora.dora`) calls them with its scaled
ones. Layouts are chosen for CPU BLAS: every rank-``r`` product is formed with ``r`` as its row
dimension.

Two routes to the same map. *Factored* (:func:`lora_linear`): ``y = x Wt + (x_a Aᵀ)(s·B)ᵀ``,
the rank-r term written first and the base GEMM accumulated onto it, never forming ``B A``.
*Merged* (:func:`merged_right`): ``y = x (Wt + s·Aᵀ Bᵀ)`` and ``∂L/∂x = g (Wt + s·Aᵀ Bᵀ)ᵀ``,
the frozen layer's own GEMMs on a weight-sized ``(in, out)`` temporary (formed in forward and
again in backward, never kept). The merged route moves ``~4·in·out`` numbers where the
factored one moves ``~2·N·(in + out)`` more than the frozen layer; :func:`merge_pays` picks
it when that is fewer (MiniLM, 2048 tokens on 384-wide layers: ~5× fewer), and the training
nodes of LoRA and DoRA take it then. Measured (paired A/B on the MiniLM train step): DoRA,
which forms a weight-sized ``Wt ⊙ c`` anyway, 4% faster; LoRA ~1% (0.987–1.002 over five
runs), the rank-r GEMMs being most of what LoRA adds to the frozen step. Dropout (a separate
adapter input) and the no-grad path stay factored, and so does half precision: in bfloat16 or
float16 ``W + s·BA`` would round a small update away. The rank-r gradients are the same
products on both routes; the output and ``∂L/∂x`` agree to the rounding of regrouped sums.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


def merge_pays(n: int, in_features: int, out_features: int, dtype: torch.dtype) -> bool:
    """Whether the merged route moves less memory than the factored one (module docstring):
    ``2·in·out ≤ N·(in + out)``, for float32/float64 only."""
    if dtype not in (torch.float32, torch.float64):
        return False
    return 2 * in_features * out_features <= n * (in_features + out_features)


# Largest "big" operand (bytes) for which a rank-r product is formed with r as its row
# dimension (``small @ bigᵀ``); above it, and for r > 8, as ``big @ small_t`` with r columns.
# Measured with MKL on 2 AVX-512 cores (2 MiB L2 each), float32, r = 8: (8, 384) @ (384, 2048)ᵀ
# 64 µs against 92 µs for (2048, 384) @ (384, 8); at K = 1536, 666 µs against 421 µs; at
# r = 16 the r-column layout wins at every size tried.
ROWS_MAX_BYTES = 4 << 20
ROWS_MAX_RANK = 8


def rank_product_t(big: Tensor, small_t: Tensor) -> Tensor:
    """``(big @ small_t)ᵀ: (r, N)`` for ``big: (N, K)`` and ``small_t: (K, r)``, in the faster
    memory layout: contiguous ``small_tᵀ @ bigᵀ`` while ``big`` stays cache-sized and ``r`` is
    small (:data:`ROWS_MAX_BYTES`), else the transpose of a contiguous ``(N, r)`` product.
    Every consumer takes either layout (a GEMM reads a transposed operand at no cost)."""
    r = small_t.shape[1]
    if r <= ROWS_MAX_RANK and big.numel() * big.element_size() <= ROWS_MAX_BYTES:
        return torch.mm(small_t.t().contiguous(), big.t())  # (r, N), r rows
    return torch.mm(big, small_t).t()  # (N, r) computed, viewed as (r, N)


def merged_right(Wt: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``Wt + s·Aᵀ Bᵀ: (in, out)`` in ``Wt``'s memory layout (the transpose of an
    ``nn.Linear`` weight stays one, so the GEMMs run as the base layer's own)."""
    if Wt.dim() == 2 and Wt.t().is_contiguous() and not Wt.is_contiguous():
        return torch.addmm(Wt.t(), B, A, alpha=scaling).t()  # (out, in) = W + s·B A
    return torch.addmm(Wt, A.t(), B.t(), alpha=scaling)


class LoraLinearOutput(NamedTuple):
    """``y = x Wt + b + h_s Bᵀ: (N, out)`` and the scaled down-projection, transposed:
    ``h_s_t = s·A x_aᵀ: (r, N)``."""

    y: Tensor
    h_s_t: Tensor


def lora_linear(
    x: Tensor,
    Wt: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    scaling: float,
    xa: Tensor | None = None,
) -> LoraLinearOutput:
    """``y = x Wt + b + s·(x_a Aᵀ) Bᵀ`` in three GEMMs, no elementwise pass (Hu et al. 2021, eq. 3).

    ``x: (N, in)``; ``Wt: (in, out)``, the base weight as a right factor (``Wᵀ`` of an
    ``nn.Linear``, ``Conv1D``'s own weight); ``A: (r, in)``, ``B: (out, r)``; ``xa: (N, in)``
    the adapter's input (``x`` after dropout; None: ``x`` itself). All of one dtype.

    Order and layout, for CPU BLAS: ``s`` scales the small ``A``; the down-projection is
    formed as ``(s·A) x_aᵀ: (r, N)`` (a GEMM with ``r`` *rows* runs at the speed of reading
    ``x``; ``x Aᵀ`` with ``r`` columns can be several times slower); the rank-r term and the
    bias write the output buffer first and the base GEMM accumulates onto it (``beta = 1``),
    so no pass over the ``(N, out)`` output is spent on the adapter.
    """
    h_s_t = rank_product_t(x if xa is None else xa, (A * scaling).t())  # (r, N): never B A
    # (N, out) = b + (N, r) @ (r, out): the adapter's term and the bias
    y = torch.addmm(bias, h_s_t.t(), B.t()) if bias is not None else torch.mm(h_s_t.t(), B.t())
    y.addmm_(x, Wt)  # += (N, in) @ (in, out): the base GEMM accumulates in place
    return LoraLinearOutput(y, h_s_t)


class LoraLinearGrads(NamedTuple):
    """Gradients of :func:`lora_linear` with respect to ``x``, ``x_a``, ``A`` and ``B``
    (None where not asked for)."""

    x: Tensor | None
    xa: Tensor | None
    A: Tensor | None
    B: Tensor | None


def lora_linear_backward(
    g: Tensor,
    x: Tensor,
    Wt: Tensor,
    A: Tensor,
    B: Tensor,
    h_s_t: Tensor,
    scaling: float,
    xa: Tensor | None,
    *,
    need: tuple[bool, bool, bool, bool],
    merged: Tensor | Callable[[], Tensor] | None = None,
) -> LoraLinearGrads:
    """The backward of :func:`lora_linear` (see :class:`LoraLinearFunction` for the maths and
    the layout), for ``need = (x, x_a, A, B)``. DoRA's node calls it with its scaled weights.

    ``merged``: ``Wt + s·Aᵀ Bᵀ``, or a function that forms it (the merged route, ``x_a``
    None): ``∂L/∂x = g mergedᵀ``, one GEMM, instead of the factored ``ĝ A + g Wtᵀ``.

    Order, for the cache: the two rank-r products that read ``g`` come first, while ``g`` (just
    written by the layer above) is still warm; then ``∂L/∂x`` (a function ``merged`` is called
    only then, so its weight-sized temporary does not push ``g`` out first); ``∂L/∂A``, which
    reads ``x`` saved in forward and long since evicted, comes last."""
    need_x, need_xa, need_a, need_b = need
    if merged is not None and xa is not None:
        raise ValueError("lora_linear_backward: the merged route has no separate adapter input")
    s = scaling
    gx = gxa = ga = gb = gh_t = None
    if need_b:
        gb = torch.mm(h_s_t, g).t().contiguous()  # (out, r) from (r, out) = s·hᵀ g
    if need_a or (merged is None and (need_x or need_xa)):
        gh_t = rank_product_t(g, B * s)  # (r, N): ĝᵀ = (g · s·B)ᵀ
    if merged is not None:
        if need_x:
            M = merged() if callable(merged) else merged
            gx = torch.mm(g, M.t())  # (N, in): the frozen layer's own GEMM
    elif xa is None:
        if need_x:  # one (N, in) buffer: ĝ A first, the base's g Wtᵀ accumulated onto it
            gx = torch.mm(gh_t.t(), A).addmm_(g, Wt.t())
    else:  # dropout: x_a's gradient goes back through it (autograd)
        gx = torch.mm(g, Wt.t()) if need_x else None  # (N, in)
        gxa = torch.mm(gh_t.t(), A) if need_xa else None  # (N, in)
    if need_a:
        ga = torch.mm(gh_t, x if xa is None else xa)  # (r, in)
    return LoraLinearGrads(gx, gxa, ga, gb)


class LoraLinearFunction(torch.autograd.Function):
    """:func:`lora_linear` as one autograd node with a hand-written backward.

    With ``g = ∂L/∂y: (N, out)``, ``h = x_a Aᵀ: (N, r)`` and ``ĝ = s·g B: (N, r)``::

        ∂L/∂B = s·gᵀ h: (out, r)      ∂L/∂A = ĝᵀ x_a: (r, in)
        ∂L/∂x = g Wtᵀ (+ ĝ A when x_a is x: written first, the base GEMM accumulates): (N, in)
        ∂L/∂x_a = ĝ A: (N, in)        ∂L/∂Wt = xᵀ g: (in, out)      ∂L/∂b = Σ_rows g: (out,)

    The rank-r products are formed transposed, with ``r`` rows (``hᵀ g``, ``Bᵀ gᵀ``, ``ĝᵀ x_a``),
    the fast layout for CPU BLAS (autograd on ``x Aᵀ`` and ``h Bᵀ`` picks ``gᵀ h`` and ``g B``,
    up to ~8× slower at r = 8). Each term is computed only when its input requires a gradient
    (the frozen base weight's ``xᵀ g``, the largest, is skipped in LoRA training), and the two
    input gradients share one buffer. Saved: ``x``, ``x_a``, ``s·hᵀ``; the weights by reference.

    ``merge``: the route (module docstring); None picks it by :func:`merge_pays` (always
    factored with dropout). Merged: ``y = x M + b`` and ``∂L/∂x = g Mᵀ`` with
    ``M = Wt + s·Aᵀ Bᵀ`` formed again in backward rather than kept; ``B = 0`` gives ``M = Wt``
    exactly, so the output at initialization is the base layer's bit for bit.
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
        xa: Tensor | None,
        merge: bool | None = None,
    ) -> Tensor:
        if merge is None:
            merge = xa is None and merge_pays(x.shape[0], x.shape[1], Wt.shape[1], Wt.dtype)
        elif merge and xa is not None:
            raise ValueError("LoraLinearFunction: merge=True needs x_a None (no dropout)")
        if merge:
            h_s_t = rank_product_t(x, (A * scaling).t())  # (r, N), for ∂L/∂B; x still warm
            M = merged_right(Wt, A, B, scaling)  # (in, out), freed after the GEMM
            y = torch.addmm(bias, x, M) if bias is not None else torch.mm(x, M)
        else:
            y, h_s_t = lora_linear(x, Wt, bias, A, B, scaling, xa)
        ctx.save_for_backward(x, Wt, A, B, h_s_t, xa)
        ctx.scaling = scaling  # type: ignore[attr-defined]
        ctx.merge = merge  # type: ignore[attr-defined]
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, g: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, Wt, A, B, h_s_t, xa = ctx.saved_tensors  # type: ignore[attr-defined]
        s: float = ctx.scaling  # type: ignore[attr-defined]
        need_x, need_w, need_bias, need_a, need_b, _, need_xa = ctx.needs_input_grad[:7]  # type: ignore[attr-defined]
        # merged route: M formed again (a weight-sized temporary) rather than kept from forward
        M = (lambda: merged_right(Wt, A, B, s)) if ctx.merge else None  # type: ignore[attr-defined]
        gx, gxa, ga, gb = lora_linear_backward(
            g, x, Wt, A, B, h_s_t, s, xa, need=(need_x, need_xa, need_a, need_b), merged=M
        )
        gw = gbias = None
        if need_w:
            gw = torch.mm(x.t(), g)  # (in, out), Wt's layout
        if need_bias:
            gbias = g.sum(dim=0)  # (out,)
        return gx, gw, gbias, ga, gb, None, gxa, None
