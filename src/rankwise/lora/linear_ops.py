"""The LoRA linear map as tensor maths: ``y = x Wt + b + s·(x_a Aᵀ) Bᵀ``, its hand-written
backward, and the autograd node that joins them (Hu et al. 2021, eq. 3).

Pure functions of tensors, no module: :class:`~rankwise.lora.layers.LoraLinear` calls them
with its live weights, and DoRA's node (:mod:`rankwise.lora.dora`) calls them with its scaled
ones. Each rank-``r`` product is formed in the memory layout that is faster for its size
(:func:`rank_product_t`).

Two routes to each of the frozen layer's GEMMs, chosen per direction. *Factored*
(:func:`lora_linear`): the rank-r term writes the output buffer and the base GEMM accumulates
onto it (``beta = 1``), never forming ``B A``. With a bias, the bias rides in the rank-r GEMM
as one more row (``[h | 1] [s·Bᵀ; bᵀ]``), as the frozen ``addmm(b, x, Wt)`` writes the bias
into its output before the same accumulating GEMM. The backward's factored
``∂L/∂x = ĝ A + g Wtᵀ`` likewise writes its buffer with a rank-r GEMM first. *Merged*
(:func:`merged_right`): ``y = x (Wt + s·Aᵀ Bᵀ) + b`` and ``∂L/∂x = g (Wt + s·Aᵀ Bᵀ)ᵀ``, the
frozen layer's own GEMMs on a weight-sized temporary (read W, write M, update M: ~3
weight-sized passes), formed in forward and again in backward, never kept.
:func:`gemm_merge_pays` takes the merged route for a GEMM with contraction ``k`` over ``N``
rows when ``3·k < N``: forward ``k = in``, backward ``k = out``, with or without a bias.
Measured with cold caches at N = 2048 (µs over the frozen GEMM; forward without bias, then
backward; the AVX-512 machine with 2 MiB L2 per core of :func:`rows_max_bytes`): 384→384
factored 82/75, merged 60/40; 384→1536 274/82 against 136/243; 1536→384 73/281 against
252/199 — the rule's choice in each case. With a bias the
factored forward costs little there, but on AMD EPYC MKL's rank-r GEMM that writes the
``(N, out)`` output runs far below memory speed (2048×1536: 1505 µs against 227 µs for the
bias copy it replaces), so the rule applies with a bias too: paired train step on MiniLM 0.977
and 0.986 of the factored-with-bias forward (``benchmarks/lora.py``'s setup). Dropout (a
separate adapter input) stays factored, and so does half precision: in bfloat16 or float16
``W + s·BA`` would round a small update away. The rank-r gradients are the same products on
both routes; the output and ``∂L/∂x`` agree to the rounding of regrouped sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor


def merge_pays(n: int, in_features: int, out_features: int, dtype: torch.dtype) -> bool:
    """DoRA's route rule (:mod:`rankwise.lora.dora`, which forms a weight-sized ``Wt ⊙ c``
    either way): merged when ``2·in·out ≤ N·(in + out)``, for float32/float64 only."""
    if dtype not in (torch.float32, torch.float64):
        return False
    return 2 * in_features * out_features <= n * (in_features + out_features)


def gemm_merge_pays(n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether one of LoRA's GEMMs (``N`` rows, contraction ``k``) takes the merged route: its
    temporary (~3 weight-sized passes, ``3·k·m``) costs less than the factored route's extra
    pass over the ``(N, m)`` result: ``3·k < N``. Float32/float64 only (module docstring)."""
    return dtype in (torch.float32, torch.float64) and 3 * k < n


def cpuinfo_field(name: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first ``name`` field of ``cpuinfo`` (e.g. ``"model name"``), or ``""`` where the
    file is absent or has no such field (not Linux, not x86)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's ``vendor_id`` (``"GenuineIntel"``, ``"AuthenticAMD"``), or ``""``."""
    return cpuinfo_field("vendor_id", cpuinfo)


def rows_max_bytes(vendor: str) -> float:
    """Largest "big" operand (bytes) for which a rank-r product (r ≤ 8) is formed with r as
    its row dimension (``small @ bigᵀ``); above it, as ``big @ small_t`` with r columns.

    MKL picks its kernels by CPU vendor, and the two layouts rank the other way round on
    the two machines measured (float32, r = 8, N = 2048, 2 threads, caches flushed):
    AVX-512 with 2 MiB L2 per core (vendor not recorded; that L2 is Intel's server cores',
    not AMD's): K = 384, 64 µs (rows) against 92 µs; K = 1536, 666 µs against 421 µs, hence a
    4 MiB limit. AMD EPYC (AVX-512, 1 MiB L2 per core): K = 384, 368 against 459 µs;
    K = 1536, 1332 against 1710 µs, hence no limit (rows at every size; paired train step on
    MiniLM 0.985-0.989 of the 4 MiB rule's). At r = 16 the
    r-column layout wins everywhere (:data:`ROWS_MAX_RANK`). Other vendors keep the 4 MiB rule.
    """
    return math.inf if vendor == "AuthenticAMD" else float(4 << 20)


ROWS_MAX_BYTES = rows_max_bytes(cpu_vendor())
ROWS_MAX_RANK = 8


def onednn_pays(vendor: str) -> bool:
    """Whether the large rank-r products go through oneDNN's linear kernel instead of MKL's
    GEMM (:func:`rank_product_t`, :func:`rank_contract`): on AMD EPYC only, the one vendor
    where it was measured.

    There MKL runs a GEMM with r = 8 on one side at a fraction of its usual rate, and oneDNN
    does the same products about twice as fast (float32, r = 8, 2 threads, warm caches, µs,
    MKL against oneDNN): ``(r, N) = A xᵀ`` at N = 2048 175/149 (K = 384) and 1007/497
    (K = 1536), with the transposed copy to ``(r, N)`` included; ``(r, K) = hᵀ x`` 158/79 and
    828/320. Paired train step on MiniLM (``benchmarks/lora.py``'s setup, 30 interleaved
    rounds): 0.948-0.971 of the MKL route. It is MKL's threading of these GEMMs that is slow:
    at one thread MKL's step is 1.07× the floor and oneDNN's no faster (paired 1.007), so one
    thread keeps MKL. On Intel MKL's skinny GEMMs are already fast (:func:`rows_max_bytes`:
    64 µs for the first product) and oneDNN was not measured, so the MKL route stays."""
    return vendor == "AuthenticAMD"


ONEDNN_RANK = onednn_pays(cpu_vendor())
# Where oneDNN pays. The contraction from 512 rows (0.41-0.83× of MKL's time at 1024-4096
# rows, K 384-3072, r 8-64, 2 threads). The product with its copy to (r, N), in isolation (warm
# caches, 2 threads, paired, oneDNN ÷ MKL): N×K = 1024×384 1.00-1.33, 2048×384 0.95-1.08,
# 1024×768 0.96, 1024×1536 0.86, 2048×1536 0.75, so from 2^19 elements of ``big`` (and 512
# rows); in the train step at 2048×384 it pays (paired 0.971 of MKL's with, 0.991 without it).
ONEDNN_PRODUCT_MIN_ROWS = 512
ONEDNN_PRODUCT_MIN_NUMEL = 1 << 19
ONEDNN_CONTRACT_MIN_ROWS = 512
# oneDNN builds a kernel per row count (~0.65 ms once against ~0.14 ms per call after, for a
# contraction at K = 384), which dynamic padding would pay for every new batch length: only
# row counts that are multiples of this take the route, so there are few shapes to build
# (32 × 64 tokens: 2048 rows) and the route never depends on what ran before (a resumed run
# takes the same kernels as an uninterrupted one)
ONEDNN_ROW_MULTIPLE = 256

_onednn_cache: list[Callable[..., Tensor] | None] = []


def _resolve_onednn() -> Callable[..., Tensor] | None:
    """torch's oneDNN linear (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor
    uses), checked once against ``torch.mm`` in both of the ways it is called; None where
    torch has no oneDNN, the op is missing or its signature differs (it is not public API)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        # float32 on the CPU whatever torch's default dtype and device are (float64 inputs
        # would fail and turn the route off for the whole process)
        kw = {"generator": g, "dtype": torch.float32, "device": "cpu"}
        x = torch.randn(40, 24, **kw)
        w = torch.randn(3, 24, **kw)
        h = torch.randn(3, 40, **kw)
        with torch.no_grad():
            ok = torch.allclose(op(w, x, None, "none", [], ""), w @ x.T, rtol=1e-4, atol=1e-4)
            ok = ok and torch.allclose(
                op(h, x.t(), None, "none", [], ""), h @ x, rtol=1e-4, atol=1e-4
            )
    except (AttributeError, RuntimeError, TypeError):
        return None
    return op if ok else None


def onednn_linear(
    big: Tensor, min_rows: int, *, min_numel: int = 0
) -> Callable[..., Tensor] | None:
    """The oneDNN op for a rank-r product over ``big: (N, K)``, or None for MKL's GEMM: only
    where it pays (:data:`ONEDNN_RANK`, ``N ≥ min_rows`` and a multiple of
    :data:`ONEDNN_ROW_MULTIPLE`, ``N·K ≥ min_numel``, more than one thread), for a contiguous float32 CPU tensor, with oneDNN enabled
    (``torch.backends.mkldnn.flags(enabled=False)`` turns it off), no autograd graph to
    record (the products run inside the custom nodes), and not while ``torch.compile`` traces
    (inductor cannot lower the op from a plain weight)."""
    if not (
        ONEDNN_RANK
        # first: under dynamo the rest would be traced (get_num_threads breaks the graph)
        and not torch.compiler.is_compiling()
        and big.shape[0] >= min_rows
        and big.shape[0] % ONEDNN_ROW_MULTIPLE == 0
        and big.numel() >= min_numel
        and big.dtype == torch.float32
        and big.device.type == "cpu"
        and big.dim() == 2
        and big.is_contiguous()
        and torch.get_num_threads() > 1
        and torch.backends.mkldnn.enabled
        and not (torch.is_grad_enabled() and big.requires_grad)
    ):
        return None
    if not _onednn_cache:
        _onednn_cache.append(_resolve_onednn())
    return _onednn_cache[0]


def rank_contract(small_t: Tensor, big: Tensor) -> Tensor:
    """``small_t @ big: (r, K)`` for ``small_t: (r, N)`` and ``big: (N, K)``, a contraction over
    the ``N`` rows (``∂L/∂A = ĝᵀ x``, ``∂L/∂B = s·gᵀ h``): oneDNN where it pays
    (:func:`onednn_pays`), on a contiguous ``small_t`` (a small copy; its transposed layout
    is slower there), else MKL's GEMM."""
    op = onednn_linear(big, ONEDNN_CONTRACT_MIN_ROWS)
    if op is None:
        return torch.mm(small_t, big)
    return op(small_t.contiguous(), big.t(), None, "none", [], "")


def rank_product_t(big: Tensor, small_t: Tensor, *, ones_row: bool = False) -> Tensor:
    """``(big @ small_t)ᵀ: (r, N)`` for ``big: (N, K)`` and ``small_t: (K, r)``, in the faster
    memory layout: contiguous ``small_tᵀ @ bigᵀ`` while ``r`` is small and ``big`` within
    :data:`ROWS_MAX_BYTES` (set by CPU vendor, :func:`rows_max_bytes`), else the transpose of
    a contiguous ``(N, r)`` product. Where oneDNN pays (:func:`onednn_pays`) it forms the
    ``(N, r)`` product, copied to a contiguous ``(r, N)``.
    Every consumer takes either layout (a GEMM reads a transposed operand at no cost).

    ``ones_row``: ``(r + 1, N)`` with a last row of ones, written into one buffer (for the bias
    carried in a rank-r GEMM, and ``Σ_n g`` read off ``∂L/∂B``'s)."""
    r, n = small_t.shape[1], big.shape[0]
    op = onednn_linear(big, ONEDNN_PRODUCT_MIN_ROWS, min_numel=ONEDNN_PRODUCT_MIN_NUMEL)
    if op is not None:
        # (N, r) copied to (r, N): oneDNN's own (r, N) = op(small, big) reads big as a weight
        # and was slower in the train step (paired 0.997 of MKL's against 0.971 this way)
        h = op(big, small_t.t(), None, "none", [], "")
        out = torch.empty(r + ones_row, n, dtype=big.dtype, device=big.device)
        out[:r].copy_(h.t())
        if ones_row:
            out[r].fill_(1.0)
        return out
    rows = r <= ROWS_MAX_RANK and big.numel() * big.element_size() <= ROWS_MAX_BYTES
    if not ones_row:
        return torch.mm(small_t.t().contiguous(), big.t()) if rows else torch.mm(big, small_t).t()
    if rows:  # (r + 1, N), r rows
        out = torch.empty(r + 1, n, dtype=big.dtype, device=big.device)
        torch.mm(small_t.t().contiguous(), big.t(), out=out[:r])
        out[r].fill_(1.0)
        return out
    out = torch.empty(n, r + 1, dtype=big.dtype, device=big.device)  # (N, r + 1), viewed
    torch.mm(big, small_t, out=out[:, :r])  # a column block: BLAS writes it in place
    out[:, r].fill_(1.0)
    return out.t()


def merged_right(Wt: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``Wt + s·Aᵀ Bᵀ: (in, out)`` in ``Wt``'s memory layout (the transpose of an
    ``nn.Linear`` weight stays one, so the GEMMs run as the base layer's own)."""
    if Wt.dim() == 2 and Wt.t().is_contiguous() and not Wt.is_contiguous():
        return torch.addmm(Wt.t(), B, A, alpha=scaling).t()  # (out, in) = W + s·B A
    return torch.addmm(Wt, A.t(), B.t(), alpha=scaling)


def merged_linear(
    x: Tensor, Wt: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float
) -> Tensor:
    """``y = x (Wt + s·Aᵀ Bᵀ) + b``: the merged route's output, the frozen layer's own GEMM on
    a weight-sized temporary (:func:`merged_right`, freed after the GEMM)."""
    M = merged_right(Wt, A, B, scaling)  # (in, out)
    return torch.addmm(bias, x, M) if bias is not None else torch.mm(x, M)


def route_merges(n: int, k: int, dtype: torch.dtype, xa: Tensor | None) -> bool:
    """The route :class:`LoraLinearFunction` picks for one direction (``merge=None``; forward
    ``k = in``, backward ``k = out``): merged when there is no separate adapter input and
    :func:`gemm_merge_pays`. The layer's no-grad training forward takes the same route, so its
    output is the node's bit for bit (reentrant activation checkpointing runs the first
    forward without autograd, and the backward recomputes it with autograd)."""
    return xa is None and gemm_merge_pays(n, k, dtype)


def autograd_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...) or a forward-mode
    AD level (``torch.autograd.forward_ad.dual_level``) is active. The custom nodes
    (:class:`LoraLinearFunction`, DoRA's) have no ``setup_context``, ``jvp`` or vmap rule, so
    the layers then run plain differentiable ops, as they do at a few rows (and keep no
    inference cache: a cached weight would drop the weights' tangents)."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def differentiable_grads(
    forward: Callable[..., Tensor],
    inputs: tuple[Tensor | None, ...],
    needs: tuple[bool, ...],
    g: Tensor,
) -> list[Tensor | None]:
    """The gradients of ``forward(*inputs)`` for the ``inputs`` that ``needs`` marks, with a
    graph (``create_graph=True``): a custom node's backward when autograd records it (a double
    backward, e.g. a gradient penalty). ``forward`` recomputes the node's output with torch's
    own differentiable ops; None where not needed.

    It runs on fresh aliases of the inputs (views, still joined to the outer graph), each
    differentiated on its own: a saved input computed from another (dropout's ``x_a`` from
    ``x``) would otherwise pass its gradient into the other's, which autograd then adds again
    through the node's own output for it (∂L/∂x was 95% off with dropout)."""
    if not any(need and t is not None for t, need in zip(inputs, needs, strict=True)):
        return [None] * len(inputs)  # only what the caller forms itself (the bias's Σ g)
    with torch.enable_grad():
        aliases = tuple(None if t is None else t.view_as(t) for t in inputs)
        y = forward(*aliases)
    wanted = [t for t, need in zip(aliases, needs) if need and t is not None]
    found = iter(torch.autograd.grad(y, wanted, g, create_graph=True, allow_unused=True))
    return [next(found) if need and t is not None else None for t, need in zip(aliases, needs)]


class LoraLinearOutput(NamedTuple):
    """``y = x Wt + b + h_s Bᵀ: (N, out)`` and the scaled down-projection, transposed:
    ``h_s_t = s·A x_aᵀ: (r, N)``, with a last row of ones (``(r + 1, N)``) when there is a
    bias."""

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
    formed in the faster layout for its size (:func:`rank_product_t`); the rank-r term writes
    the output buffer (with a bias: ``[h_s | 1] [Bᵀ; bᵀ]``, the bias as one more rank) and the
    base GEMM accumulates onto it (``beta = 1``), so the adapter adds no pass over the
    ``(N, out)`` output when there is a bias (module docstring).
    """
    ones = bias is not None
    h_s_t = rank_product_t(x if xa is None else xa, (A * scaling).t(), ones_row=ones)  # never B A
    # (N, out) = (N, r[+1]) @ (r[+1], out): the adapter's term, and the bias as a last rank
    Bt = torch.cat((B.t(), bias[None])) if bias is not None else B.t()
    y = torch.mm(h_s_t.t(), Bt)
    y.addmm_(x, Wt)  # += (N, in) @ (in, out): the base GEMM accumulates in place
    return LoraLinearOutput(y, h_s_t)


SMALL_ROWS_MAX = 128


def lora_linear_autograd(
    x: Tensor,
    Wt: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    scaling: float,
    xa: Tensor | None = None,
) -> Tensor:
    """``y = x Wt + b + s·(x_a Aᵀ) Bᵀ`` as three of torch's own differentiable GEMMs, which
    ``LoraLinear`` runs for ``N ≤`` :data:`SMALL_ROWS_MAX` rows, with or without autograd
    (arguments as :func:`lora_linear`).

    At so few rows every GEMM is tiny and the cost is per-op overhead: the custom node's
    Python ``forward``/``backward`` and its layout choices (~20 small ops) cost more than
    they save. On ``benchmarks/lora.py --batch 2 --seq 8`` (16 rows) the train step went from
    1.06 to 0.94 of PEFT's and the eval forward with the inference cache off from 1.44 to
    1.27 of the base's. Measured fwd + bwd per layer (2 threads, r = 8, with bias, the AVX-512
    Intel VM; µs, this route against :class:`LoraLinearFunction`): N = 8, 384→384 117/185,
    384→1536 249/379; N = 128, 429/491, 1311/1357, 1536→384 1314/1353; N = 256 mixed
    (735/767, 2444/2404, 2487/2467); N = 512 the node wins (1432/1425, 4890/4670). The base
    GEMM is the frozen layer's own ``addmm``, so with ``B = 0`` the output is the base
    layer's bit for bit (``+ 0`` exactly)."""
    y = torch.addmm(bias, x, Wt) if bias is not None else torch.mm(x, Wt)  # (N, out)
    h = torch.mm(x if xa is None else xa, A.t())  # (N, r): never B A
    return torch.addmm(y, h, B.t(), alpha=scaling)


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
    written by the layer above) is still warm; then ``∂L/∂A`` from the small ``ĝ``; ``∂L/∂x``
    is written last (a function ``merged`` is called only then, so its weight-sized temporary
    does not push ``g`` out first), so the op that consumes it next, e.g. GELU's backward,
    reads it warm. Measured paired against ∂L/∂A last: 0.992 of the train step."""
    need_x, need_xa, need_a, need_b = need
    if merged is not None and xa is not None:
        raise ValueError("lora_linear_backward: the merged route has no separate adapter input")
    s = scaling
    gx = gxa = ga = gb = gh_t = None
    if need_b:  # (out, r) from (r, out) = s·hᵀ g (h_s_t's ones row, if any, left out)
        gb = rank_contract(h_s_t[: A.shape[0]], g).t().contiguous()
    if need_a or (merged is None and (need_x or need_xa)):
        gh_t = rank_product_t(g, B * s)  # (r, N): ĝᵀ = (g · s·B)ᵀ
    if need_a:
        ga = rank_contract(gh_t, x if xa is None else xa)  # (r, in)
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
    return LoraLinearGrads(gx, gxa, ga, gb)


class LoraLinearFunction(torch.autograd.Function):
    """:func:`lora_linear` as one autograd node with a hand-written backward.

    With ``g = ∂L/∂y: (N, out)``, ``h = x_a Aᵀ: (N, r)`` and ``ĝ = s·g B: (N, r)``::

        ∂L/∂B = s·gᵀ h: (out, r)      ∂L/∂A = ĝᵀ x_a: (r, in)
        ∂L/∂x = g Wtᵀ (+ ĝ A when x_a is x: written first, the base GEMM accumulates): (N, in)
        ∂L/∂x_a = ĝ A: (N, in)        ∂L/∂Wt = xᵀ g: (in, out)      ∂L/∂b = Σ_rows g: (out,)

    The rank-r products are formed with ``r`` on the outside (``hᵀ g``, ``Bᵀ gᵀ``, ``ĝᵀ x_a``),
    each in the faster memory layout for its size (:func:`rank_product_t`; autograd on
    ``x Aᵀ`` and ``h Bᵀ`` picks ``gᵀ h``, up to ~3× slower at r = 8). Each term is computed only
    when its input requires a gradient (the frozen base weight's ``xᵀ g``, the largest, is
    skipped in LoRA training), and the two input gradients share one buffer. Saved: ``x``,
    ``x_a``, ``s·hᵀ``; the weights by reference.

    ``merge``: the route of both directions (module docstring); None picks each by
    :func:`gemm_merge_pays` (always factored with dropout). Merged: ``y = x M + b`` and
    ``∂L/∂x = g Mᵀ`` with ``M = Wt + s·Aᵀ Bᵀ`` formed again in backward rather than kept.
    ``B = 0`` gives ``M = Wt`` exactly, and on the factored route a rank-r term of exact zeros
    (under the bias, if any), so the output at initialization is the base layer's bit for bit
    either way.
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
        n, dtype = x.shape[0], Wt.dtype
        if merge is None:  # per direction (module docstring)
            merge_fwd = route_merges(n, x.shape[1], dtype, xa)
            merge_bwd = route_merges(n, Wt.shape[1], dtype, xa)
        elif merge and xa is not None:
            raise ValueError("LoraLinearFunction: merge=True needs x_a None (no dropout)")
        else:
            merge_fwd = merge_bwd = merge
        if merge_fwd:
            h_s_t = rank_product_t(x, (A * scaling).t())  # (r, N), for ∂L/∂B; x still warm
            y = merged_linear(x, Wt, bias, A, B, scaling)
        else:
            y, h_s_t = lora_linear(x, Wt, bias, A, B, scaling, xa)
        ctx.save_for_backward(x, Wt, A, B, h_s_t, xa)
        ctx.scaling = scaling  # type: ignore[attr-defined]
        ctx.merge = merge_bwd  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, g: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, Wt, A, B, h_s_t, xa = ctx.saved_tensors  # type: ignore[attr-defined]
        s: float = ctx.scaling  # type: ignore[attr-defined]
        need_x, need_w, need_bias, need_a, need_b, _, need_xa = ctx.needs_input_grad[:7]  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            gx, gw, ga, gb, gxa = differentiable_grads(
                lambda x, Wt, A, B, xa: lora_linear_autograd(x, Wt, None, A, B, s, xa),
                (x, Wt, A, B, xa),
                (need_x, need_w, need_a, need_b, need_xa),
                g,
            )
            gbias = g.sum(dim=0) if need_bias else None
            return gx, gw, gbias, ga, gb, None, gxa, None
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
