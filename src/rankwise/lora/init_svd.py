"""Initializers from a factorization of the base weight: PiSSA (SVD) and OLoRA (QR).

Both see the layer's base weight as ``W: (out, in)`` and return
``LoraInit(A: (r, in), B: (out, r), base=W_res)`` with ``W_res = W - s · B A``, so the adapted
layer computes ``W_res + s · B A = W`` at step 0 (the output is unchanged) while the adapter
starts in the subspace the factorization picked.

* **PiSSA** (Meng, Wang & Zhang 2024, "PiSSA: Principal Singular Values and Singular Vectors
  Adaptation", §3 eq. 2–4): ``W = U S Vᵀ``; ``A = sqrt(S_r / s) V_rᵀ``, ``B = U_r sqrt(S_r / s)``
  (the ``√S`` split between the factors, divided by the scale ``s`` so that ``s · B A`` is the
  best rank-``r`` approximation ``U_r S_r V_rᵀ``, as PEFT 0.21.2 ``pissa_init``), and
  ``W_res = W - U_r S_r V_rᵀ``, whose Frobenius norm is the optimal truncation error
  ``sqrt(Σ_{i>r} σ_i²)`` (Eckart–Young). The default computes the top-``r`` triplets with
  :func:`rankwise.linalg.randomized_svd` (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1,
  oversampled, adaptive power iterations), which is within 1% of that optimal error on trained
  weights and several times faster than a full SVD; ``method="exact"`` runs the full thin SVD.
* **OLoRA** (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation", §3): thin QR
  ``W = Q R``; ``B = Q[:, :r]`` (orthonormal columns), ``A = R[:r]``, ``W_res = W - s · B A``
  (exactly PEFT 0.21.2 ``olora_init``: no division by ``s``).

Embeddings fall back to the default initializer (zero A, normal B), as PEFT does for these
names. PEFT's config strings (``"pissa"`` = full SVD, ``"pissa_niter_N"`` = randomized with
``N`` subspace iterations) are translated only at the file-format edge:
:func:`from_peft_init` / :func:`to_peft_init`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from rankwise.linalg._validate import non_finite_count
from rankwise.lora.config import PEFT_PISSA_NITER, LoraConfig
from rankwise.lora.initializers import LoraInit, as_generator, kaiming_init
from rankwise.lora.layers import INIT_A, INIT_B, LoraLayer

# power iterations written for our randomized "pissa" (its adaptive rule stops at <= 8)
PEFT_NITER_FOR_FAST = 4

PissaMethod = Literal["randomized", "exact"]


def _check(weight: Tensor, r: int, scaling: float, name: str) -> None:
    if weight.ndim != 2:
        raise ValueError(
            f"{name}: weight must be a (out, in) matrix, found shape {tuple(weight.shape)}"
        )
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(weight.shape):
        raise ValueError(
            f"{name}: r must be an int in [1, min(out, in) = {min(weight.shape)}] for a weight of "
            f"shape {tuple(weight.shape)}, found {r!r}"
        )
    if not scaling > 0:
        raise ValueError(f"{name}: scaling must be > 0, found {scaling!r}")
    if not weight.is_floating_point():
        raise ValueError(f"{name}: weight must be floating point, found {weight.dtype}")
    if bad := non_finite_count(weight):  # here, by name: the SVD's own check says "M"
        raise ValueError(f"{name}: weight must be finite, found {bad} NaN/Inf entries")


def _work(weight: Tensor) -> Tensor:
    # float32 at least (as PEFT); float64 stays float64 (the exactness tests run there)
    return weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)


def top_singular_triplets(
    weight: Tensor,
    r: int,
    *,
    method: PissaMethod = "randomized",
    oversample: int = 10,
    power_iters: int | Literal["auto"] = "auto",
    generator: torch.Generator | int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(U_r: (out, r), S_r: (r,), Vh_r: (r, in))``, the top-``r`` singular triplets of ``weight``.

    ``method="exact"``: full thin SVD, truncated. ``"randomized"``: Halko et al. 2011 with
    ``oversample`` extra columns and ``power_iters`` subspace iterations (``"auto"``: adaptive).
    """
    _check(weight, r, 1.0, "top_singular_triplets")  # by its own names (r, not linalg's rank)
    return _top_triplets(_work(weight), r, method, oversample, power_iters, generator)


def _top_triplets(
    W: Tensor,
    r: int,
    method: PissaMethod,
    oversample: int,
    power_iters: int | Literal["auto"],
    generator: torch.Generator | int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`top_singular_triplets` of a checked working-precision ``W``."""
    from rankwise.linalg import randomized_svd, truncated_svd

    if method == "exact":
        svd = truncated_svd(W, r)
    elif method == "randomized":
        svd = randomized_svd(
            W, r, oversample=oversample, power_iters=power_iters, generator=generator
        )
    else:
        raise ValueError(f"method: expected 'randomized' or 'exact', found {method!r}")
    return svd.U, svd.S, svd.Vh


PISSA_SEED = 0  # the randomized PiSSA SVD's seed (see pissa_init)


def pissa_init(
    weight: Tensor,
    *,
    r: int,
    scaling: float,
    embedding: bool = False,
    generator: torch.Generator | int | None = None,
    method: PissaMethod = "randomized",
    oversample: int = 10,
    power_iters: int | Literal["auto"] = "auto",
) -> LoraInit:
    """PiSSA: ``A = sqrt(S_r/s) V_rᵀ`` (r, in), ``B = U_r sqrt(S_r/s)`` (out, r),
    ``base = W - s B A`` (out, in) — see the module docstring (Meng et al. 2024, eq. 2–4)."""
    if embedding:  # PEFT: embeddings get the default init under "pissa"
        g = as_generator(generator)
        return kaiming_init(weight, r=r, scaling=scaling, embedding=True, generator=g)
    _check(weight, r, scaling, "pissa_init")
    W = _work(weight)
    # the randomized SVD draws from its own fixed seed, per layer, not from ``generator``:
    # the file records only the method, and load_adapter must rebuild the same residual base
    svd_gen = torch.Generator(device=W.device).manual_seed(PISSA_SEED)
    U, S, Vh = _top_triplets(W, r, method, oversample, power_iters, svd_gen)  # checked above
    root = torch.sqrt(S / scaling)  # (r,): √(S/s) split between the two factors
    A = root[:, None] * Vh  # (r, in)
    B = U * root[None, :]  # (out, r)
    delta = scaling * (B @ A)  # (out, in) = U_r S_r V_rᵀ
    return _finish(A, B, W, delta, weight)


def pissa_exact_init(
    weight: Tensor,
    *,
    r: int,
    scaling: float,
    embedding: bool = False,
    generator: torch.Generator | int | None = None,
) -> LoraInit:
    """PiSSA with the full thin SVD (PEFT's ``"pissa"``); the optimal residual exactly."""
    return pissa_init(
        weight, r=r, scaling=scaling, embedding=embedding, generator=generator, method="exact"
    )


def olora_init(
    weight: Tensor,
    *,
    r: int,
    scaling: float,
    embedding: bool = False,
    generator: torch.Generator | int | None = None,
) -> LoraInit:
    """OLoRA: thin QR ``W = Q R``, ``B = Q[:, :r]`` (out, r), ``A = R[:r]`` (r, in),
    ``base = W - s B A`` (Büyükakyüz 2024; PEFT 0.21.2 ``olora_init``)."""
    if embedding:
        g = as_generator(generator)
        return kaiming_init(weight, r=r, scaling=scaling, embedding=True, generator=g)
    _check(weight, r, scaling, "olora_init")
    W = _work(weight)
    Q, R = torch.linalg.qr(W)  # (out, k), (k, in), k = min(out, in): reduced QR
    B = Q[:, :r]  # (out, r), orthonormal columns
    A = R[:r]  # (r, in), upper trapezoidal
    return _finish(A, B, W, scaling * (B @ A), weight)


def _finish(A: Tensor, B: Tensor, W: Tensor, delta: Tensor, weight: Tensor) -> LoraInit:
    """Factors on the weight's device; ``base = W - s·B A`` in the weight's dtype, or None
    when a factor is exactly zero (the base weight stays as it is, e.g. ``W = 0``). Tested on
    the small factors: ``delta.any()`` over the (out, in) matrix costs ~0.6 ms per layer."""
    zero = not (bool(A.any()) and bool(B.any()))
    residual = None if zero else (W - delta).to(weight.device, weight.dtype)
    return LoraInit(A.contiguous().to(weight.device), B.contiguous().to(weight.device), residual)


# PEFT initializers with B A = 0 at start that do not change the base weight
_PEFT_BASE_KEEPING = frozenset({"orthogonal", "mica", "eva"})


def from_peft_init(value: bool | str) -> bool | str:
    """PEFT's ``init_lora_weights`` -> the rankwise registry name (file-format edge only).

    ``"pissa"`` (PEFT: full SVD) -> ``"pissa_exact"``; ``"pissa_niter_N"`` -> ``"pissa"`` (our
    randomized SVD); PEFT's initializers that leave the base weight alone (``"orthogonal"``,
    ``"mica"``, ``"eva"``: ``B A = 0`` at start) -> ``True``, since a loaded file sets every
    factor; ``"olora"``, ``"lora_ga"``, booleans and other names unchanged.
    """
    if value == "pissa":
        return "pissa_exact"
    if isinstance(value, str) and value.lower() in _PEFT_BASE_KEEPING:
        return True
    if isinstance(value, str) and PEFT_PISSA_NITER.fullmatch(value):
        return "pissa"
    return value


def to_peft_init(value: bool | str) -> bool | str:
    """Inverse of :func:`from_peft_init` for writing ``adapter_config.json``."""
    if value == "pissa_exact":
        return "pissa"
    if value == "pissa":
        return f"pissa_niter_{PEFT_NITER_FOR_FAST}"
    return value


def original_base_factors(A: Tensor, B: Tensor, A0: Tensor, B0: Tensor) -> tuple[Tensor, Tensor]:
    """A rank-``2r`` plain LoRA relative to the *original* weight (PEFT ``subtract_mutated_init``).

    A residual initializer trains ``W_res + s·B A`` with ``W_res = W - s·B0 A0``, so the update
    relative to ``W`` is ``s (B A - B0 A0) = s [B | -B0] [A ; A0]``: returns
    ``(A': (2r, in), B': (out, 2r))``; the scale stays ``s`` when ``r`` and ``lora_alpha`` are
    doubled (:func:`original_base_config`). Works for any layout the factors share.
    """
    if A.shape != A0.shape or B.shape != B0.shape:
        raise ValueError(
            f"A0/B0: initial factors of shapes {tuple(A0.shape)}/{tuple(B0.shape)} do not match "
            f"the trained ones {tuple(A.shape)}/{tuple(B.shape)}"
        )
    return torch.cat([A, A0.to(A.dtype)], dim=0), torch.cat([B, -B0.to(B.dtype)], dim=1)


def original_base_config(config: LoraConfig) -> LoraConfig:
    """The config of :func:`original_base_factors`' adapter, as PEFT's ``save_pretrained(...,
    path_initial_model_for_weight_conversion=...)``: ``r``, ``lora_alpha`` and the patterns
    doubled (``lora_alpha · √2`` under rsLoRA, keeping ``α/√r``), plain init."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "config: an adapter for the original base cannot combine use_rslora with "
            "rank_pattern/alpha_pattern (the scale cannot be kept; PEFT refuses it too)"
        )
    alpha = config.lora_alpha * (2**0.5 if config.use_rslora else 2)
    return config.replace(
        r=2 * config.r,
        lora_alpha=alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
        init_lora_weights=True,
    )


def record_initial_factors(layer: LoraLayer) -> None:
    """Keep copies of the layer's current ``A0: (r, in)``, ``B0: (out, r)`` as non-persistent
    buffers (never in an adapter file), for :func:`original_base_factors` at export time."""
    A, B = layer.factors()
    layer.register_buffer(INIT_A, A.detach().clone(), persistent=False)
    layer.register_buffer(INIT_B, B.detach().clone(), persistent=False)


def initial_factors(layer: LoraLayer) -> tuple[Tensor, Tensor] | None:
    """``(A0, B0)`` recorded by :func:`record_initial_factors`, or None (the base is unchanged)."""
    buffers = dict(layer.named_buffers(recurse=False))
    if INIT_A not in buffers or INIT_B not in buffers:
        return None
    return buffers[INIT_A], buffers[INIT_B]
