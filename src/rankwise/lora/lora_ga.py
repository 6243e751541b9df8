"""LoRA-GA: initialize the adapters from the full-weight gradient (an initializer + a hook).

Wang, Yu & Li 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", §3.2–3.3 and
Algorithm 1, following the authors' reference code (github.com/Outsider565/LoRA-GA,
``peft/tuners/lora/layer.py`` ``lora_ga_init``, direction ``"ArB2r"``, scale ``"stable"``):

* estimate ``G = ∂L/∂W`` (out, in) for every target weight, averaged over ``batches``;
* ``G = U S Vᵀ``; ``A = c · V[:, :r]ᵀ`` (r, in), ``B = c · U[:, r:2r]`` (out, r) with the
  stable scale ``c = out^{1/4} / sqrt(γ)`` (γ = 16) applied to **both** factors (Thm. 3.2);
* ``W_res = W0 - s · B A`` so the model's output is unchanged at step 0.

Why "ArB2r": one SGD step of size ``η`` changes the effective weight by
``-η s² (G AᵀA + B BᵀG) + O(η²) = -η s² c² (G V_r V_rᵀ + U_{r:2r} U_{r:2r}ᵀ G)``
``= -η s² c² G_{2r}``, the best rank-``2r`` approximation of the gradient (Thm. 3.1): the first
LoRA step follows full fine-tuning's as closely as a rank-``2r`` update can.

**How PEFT 0.21.2 differs** (``peft/tuners/lora/layer.py`` ``LoraLayer.lora_ga_init``): it
multiplies ``B`` by the singular values, ``B = U[:, r:2r] diag(S[r:2r])``, and applies the stable
scale to ``B`` only. Then ``G AᵀA + B BᵀG = G V_r V_rᵀ + c² U_{r:2r} S²_{r:2r} U_{r:2r}ᵀ G``: the
two halves are weighted ``1`` and ``c² σ_i²``, so the first step is no longer proportional to
``G_{2r}``, and the initialization scales with the loss (doubling the loss doubles PEFT's ``B``,
while the reference's factors depend only on the gradient's singular *vectors*, which is what
makes its scale "stable" in the paper's sense). We follow the paper and its reference code.

Gradients are estimated with only the target weights requiring grad (activations of the rest
are not differentiated); ``layers_per_pass`` bounds how many weight gradients are held at once
(each pass is one sweep over ``batches``). The model's mode (train/eval) is left as the
caller set it (in train mode its dropout draws from a fork of torch's RNG seeded from
``generator``, when one is given: the same seed, the same factors); its ``requires_grad``
flags and existing ``.grad`` values are restored.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rankwise.errors import ConfigError, InjectionError
from rankwise.lora.config import LoraConfig
from rankwise.lora.init_svd import record_initial_factors
from rankwise.lora.initializers import LoraInit, as_generator
from rankwise.lora.inject import apply_plan, check_residual_untied
from rankwise.lora.module_kinds import is_hf_conv1d
from rankwise.lora.targets import Target, check_ranks, resolve

DEFAULT_GAMMA = 16.0
LossFn = Callable[[nn.Module, Any], Tensor]


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """``model(**batch).loss`` (transformers models given ``labels``)."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batches: the default loss needs dict batches, found {type(batch).__name__}"
        )
    return model(**batch).loss


def lora_ga_factors(
    grad: Tensor,
    weight: Tensor,
    *,
    r: int,
    scaling: float,
    gamma: float = DEFAULT_GAMMA,
    method: Literal["randomized", "exact"] = "randomized",
    generator: torch.Generator | int | None = None,
) -> LoraInit:
    """The LoRA-GA factors for one layer from its gradient ``grad: (out, in)`` (ArB2r, stable).

    ``A = c V_rᵀ`` (r, in), ``B = c U_{r:2r}`` (out, r), ``c = out^{1/4}/√γ``, and
    ``base = weight - s B A`` (out, in). ``method="randomized"`` computes the top ``2r``
    triplets with :func:`rankwise.linalg.randomized_svd` (adaptive power iterations; the
    reference uses ``torch.svd_lowrank(q=4r, niter=4)``), ``"exact"`` with the full SVD.
    """
    from rankwise.linalg import randomized_svd, truncated_svd

    out_f, in_f = grad.shape
    if tuple(weight.shape) != (out_f, in_f):
        raise ValueError(f"weight: expected shape {(out_f, in_f)}, found {tuple(weight.shape)}")
    if 2 * r > min(out_f, in_f):
        raise ValueError(
            f"r: LoRA-GA takes 2r = {2 * r} singular triplets of the gradient, more than "
            f"min(out, in) = {min(out_f, in_f)} for a weight of shape {(out_f, in_f)}"
        )
    check_gamma(gamma)
    dt = torch.float64 if grad.dtype == torch.float64 else torch.float32
    G = grad.detach().to(dt)
    if method == "exact":
        svd = truncated_svd(G, 2 * r)
    elif method == "randomized":
        svd = randomized_svd(G, 2 * r, generator=generator)
    else:
        raise ValueError(f"method: expected 'randomized' or 'exact', found {method!r}")
    c = out_f**0.25 / gamma**0.5  # the stable scale (Thm. 3.2), on both factors
    A = svd.Vh[:r] * c  # (r, in): the first r right singular vectors
    B = svd.U[:, r : 2 * r] * c  # (out, r): the next r left singular vectors
    base = weight.detach().to(dt) - scaling * (B @ A)  # (out, in)
    return LoraInit(A, B, base.to(weight.dtype))


def check_gamma(gamma: object) -> None:
    """ValueError unless ``gamma`` is a finite positive number (γ = inf gives c = 0: A = B = 0
    and both factors' gradients 0 for ever)."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise ValueError(f"gamma: expected a positive number, found {gamma!r}")
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma: expected a finite positive number, found {gamma!r}")


def _matrix_grad(name: str, module: nn.Module) -> Tensor:
    g = module.weight.grad
    if g is None:
        raise ValueError(
            f"{name}: its weight got no gradient from loss_fn (the loss does not depend on "
            "it); leave it out of target_modules or change loss_fn"
        )
    return g.t() if is_hf_conv1d(module) else g  # (out, in)


def _matrix_weight(module: nn.Module) -> Tensor:
    w = module.weight.detach()
    return w.t() if is_hf_conv1d(module) else w


def estimate_gradients(
    model: nn.Module,
    names: list[str],
    batches: list[Any],
    *,
    loss_fn: LossFn,
) -> dict[str, Tensor]:
    """``∂L/∂W`` (out, in) of each named module's weight, averaged over ``batches``.

    Only those weights require grad during the sweep; every flag and existing ``.grad`` is
    restored afterwards.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    modules = [model.get_submodule(n) for n in names]
    saved = [m.weight.grad for m in modules]
    try:
        for p in params:
            p.requires_grad_(False)
        for m in modules:
            m.weight.grad = None
            m.weight.requires_grad_(True)
        with torch.enable_grad():
            for i, batch in enumerate(batches):
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.ndim != 0:
                    raise ValueError(f"loss_fn: expected a scalar tensor, found {loss!r}")
                if not torch.isfinite(loss.detach()):
                    raise ValueError(
                        f"loss_fn: the loss on batch {i} is {float(loss)}; LoRA-GA needs a "
                        "finite gradient"
                    )
                loss.backward()
        grads = {n: (_matrix_grad(n, m) / len(batches)).detach() for n, m in zip(names, modules)}
        for n, g in grads.items():
            if not bool(torch.isfinite(g).all()):
                raise ValueError(
                    f"{n}: the gradient of its weight holds NaN/inf (overflow in the backward "
                    "pass); LoRA-GA needs a finite gradient"
                )
        return grads
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, g in zip(modules, saved):
            m.weight.grad = g


def lora_ga_init(
    model: nn.Module,
    config: LoraConfig,
    batches: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    gamma: float = DEFAULT_GAMMA,
    method: Literal["randomized", "exact"] = "randomized",
    layers_per_pass: int | None = None,
    generator: torch.Generator | int | None = None,
) -> nn.Module:
    """Inject ``config``'s adapters into ``model`` initialized by LoRA-GA; returns ``model``.

    ``loss_fn(model, batch) -> scalar`` (default ``model(**batch).loss``) is differentiated
    on every batch; ``layers_per_pass`` (default: all) limits how many weight gradients are
    held at once. Linear / ``Conv1D`` targets get LoRA-GA factors; other targets
    (embeddings, convolutions) the default initialization, as in PEFT. Everything is resolved
    and checked before the model is changed.
    """
    if config.use_dora:  # nothing could save it: found only when saving, after training
        raise ConfigError(
            "config: LoRA-GA with use_dora=True is not supported: a LoRA-GA adapter is saved "
            "re-expressed for the original base (save_adapter(..., for_original_base=True)), "
            "which DoRA's magnitudes cannot be; set use_dora=False"
        )
    if config.init_lora_weights not in (True, "lora_ga"):  # replaced below: it was silently
        raise ConfigError(
            f"init_lora_weights: LoRA-GA sets its own initialization; expected True or "
            f"'lora_ga', found {config.init_lora_weights!r}"
        )
    # "lora_ga" in the attached config (and the file); the factors are set after apply_plan
    plan = resolve(model, config.replace(init_lora_weights="lora_ga"))
    check_ranks(model, plan)
    batch_list = list(batches)
    if not batch_list:
        raise ValueError("batches: LoRA-GA needs at least one batch to estimate the gradient")
    check_gamma(gamma)
    if method not in ("randomized", "exact"):  # checked before the gradient pass, not after
        raise ValueError(f"method: expected 'randomized' or 'exact', found {method!r}")
    if layers_per_pass is not None and (
        isinstance(layers_per_pass, bool)
        or not isinstance(layers_per_pass, numbers.Integral)
        or layers_per_pass < 1
    ):
        raise ValueError(
            f"layers_per_pass: expected None or an int >= 1, found {layers_per_pass!r}"
        )
    linear = [t for t in plan.targets if t.kind == "linear"]
    if not linear:
        raise InjectionError("config: LoRA-GA found no Linear/Conv1D target to initialize")
    modules = dict(model.named_modules())
    for t in linear:  # the rank check before any gradient is computed
        out_f, in_f = _matrix_weight(modules[t.name]).shape
        if 2 * t.r > min(out_f, in_f):
            raise InjectionError(
                f"{t.name}: r={t.r} needs 2r <= min(out, in) = {min(out_f, in_f)} for LoRA-GA"
            )
    check_residual_untied(model, [t.name for t in linear], plan.config)
    g = as_generator(generator)
    with _sweep_rng(g):  # a train-mode model's dropout: drawn from a fork seeded by g
        inits = _initializations(
            model,
            linear,
            batch_list,
            config,
            loss_fn or default_loss,
            gamma=gamma,
            method=method,
            step=int(layers_per_pass or len(linear)),
            g=g,
        )
    apply_plan(model, plan, generator=g)  # the plan resolved before the gradients
    for name, init in inits.items():
        layer = model.get_submodule(name)
        layer.set_factors(init.A, init.B)
        record_initial_factors(layer)  # A0, B0 for save_adapter(..., for_original_base=True)
        layer.set_base_matrix(init.base)
    return model


@contextlib.contextmanager
def _sweep_rng(g: torch.Generator | None) -> Iterator[None]:
    """The gradient sweep of a model in train mode draws its dropout masks from torch's global
    RNG. Given a generator, it draws them from a fork of that RNG seeded from a copy of the
    generator (the generator itself is not advanced, the caller's RNG is left as it was), so a
    fixed seed gives the same factors; None: the global RNG itself, as everywhere."""
    if g is None:
        yield
        return
    copy = torch.Generator(device=g.device)
    copy.set_state(g.get_state())
    seed = int(torch.randint(0, 2**62, (1,), generator=copy, device=g.device))
    with torch.random.fork_rng(devices=[]):  # the CPU generator's state, restored after
        torch.random.default_generator.manual_seed(seed)  # not CUDA's, which stays untouched
        yield


def _initializations(
    model: nn.Module,
    targets: list[Target],
    batches: list[Any],
    config: LoraConfig,
    loss_fn: LossFn,
    *,
    gamma: float,
    method: Literal["randomized", "exact"],
    step: int,
    g: torch.Generator | None,
) -> dict[str, LoraInit]:
    out: dict[str, LoraInit] = {}
    for start in range(0, len(targets), step):
        chunk = targets[start : start + step]
        grads = estimate_gradients(model, [t.name for t in chunk], batches, loss_fn=loss_fn)
        for t in chunk:
            W = _matrix_weight(model.get_submodule(t.name))
            s = config.scaling(r=t.r, alpha=t.lora_alpha)
            out[t.name] = lora_ga_factors(
                grads.pop(t.name), W, r=t.r, scaling=s, gamma=gamma, method=method, generator=g
            )
    return out
