"""Initializers of the LoRA factors: a registry of pure functions (one variant axis).

Every initializer sees the layer's base weight as the matrix of a linear map,
``W: (out, in)`` (``nn.Linear`` as is; GPT-2 ``Conv1D`` transposed; a convolution flattened to
``(out, in · k…)``; an embedding transposed to ``(dim, num_embeddings)``, the map from a
one-hot token), and returns ``LoraInit(A: (r, in), B: (out, r), base)``. ``base`` is ``None``
when the base weight stays as it is, or the residual weight an initializer such as PiSSA
leaves behind (``W_res = W - s · B A``), in the same ``(out, in)`` form.

Registered now (PEFT 0.21.2 ``LoraLayer.reset_lora_parameters``):

* ``"kaiming"`` (PEFT's ``init_lora_weights=True``): ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` —
  ``kaiming_uniform_(a=sqrt(5))``, the ``nn.Linear`` default — and ``B = 0`` (Hu et al. 2021,
  §4.1 "we use a random Gaussian initialization for A and zero for B"; loralib uses kaiming).
  For embeddings ``A = 0`` and ``B ~ N(0, 1)`` (loralib ``Embedding.reset_parameters``).
* ``"gaussian"``: ``A ~ N(0, (1/r)^2)``, ``B = 0``; embeddings as above.
* ``"random"`` (PEFT's ``init_lora_weights=False``): A and B both random (the ``nn.Linear``
  default for each; ``N(0, 1)`` for embeddings), so ``B A != 0`` — for tests of merging.

Adding an initializer (PiSSA, OLoRA, LoRA-GA) is one function plus one entry in
:data:`INITIALIZERS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from rankwise.linalg._random import make_generator


class LoraInit(NamedTuple):
    """Initial factors ``A: (r, in)``, ``B: (out, r)`` and the residual base weight (or None)."""

    A: Tensor
    B: Tensor
    base: Tensor | None


class Initializer(Protocol):
    def __call__(
        self,
        weight: Tensor,
        *,
        r: int,
        scaling: float,
        embedding: bool,
        generator: torch.Generator | None,
    ) -> LoraInit: ...


def as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """``torch.Generator`` from a seed (CPU), passed through, or None (torch's global RNG):
    :func:`rankwise.linalg._random.make_generator` (numpy integer seeds too)."""
    return make_generator(generator)


def _uniform(shape: tuple[int, int], bound: float, g: torch.Generator | None) -> Tensor:
    # U(-bound, bound) in float32 on the CPU, so a seeded generator is device-independent
    return (torch.rand(shape, generator=g) * 2.0 - 1.0) * bound


def _normal(shape: tuple[int, int], std: float, g: torch.Generator | None) -> Tensor:
    return torch.randn(shape, generator=g) * std


def _finish(A: Tensor, B: Tensor, weight: Tensor) -> LoraInit:
    return LoraInit(A.to(weight.device, weight.dtype), B.to(weight.device, weight.dtype), None)


def kaiming_init(
    weight: Tensor, *, r: int, scaling: float, embedding: bool, generator: torch.Generator | None
) -> LoraInit:
    """PEFT's default (``True``): kaiming-uniform A, zero B; embeddings zero A, normal B."""
    out_f, in_f = weight.shape
    if embedding:
        return _finish(torch.zeros(r, in_f), _normal((out_f, r), 1.0, generator), weight)
    # kaiming_uniform_(a=sqrt(5)): gain sqrt(2/(1+5)), bound = gain*sqrt(3/fan_in) = 1/sqrt(in)
    A = _uniform((r, in_f), 1.0 / math.sqrt(in_f), generator)
    return _finish(A, torch.zeros(out_f, r), weight)


def gaussian_init(
    weight: Tensor, *, r: int, scaling: float, embedding: bool, generator: torch.Generator | None
) -> LoraInit:
    """PEFT's ``"gaussian"``: ``A ~ N(0, 1/r^2)`` (std ``1/r``), zero B; embeddings as kaiming."""
    if embedding:
        return kaiming_init(weight, r=r, scaling=scaling, embedding=True, generator=generator)
    out_f, in_f = weight.shape
    return _finish(_normal((r, in_f), 1.0 / r, generator), torch.zeros(out_f, r), weight)


def random_init(
    weight: Tensor, *, r: int, scaling: float, embedding: bool, generator: torch.Generator | None
) -> LoraInit:
    """PEFT's ``False``: both factors random, so the adapter changes the output at once."""
    out_f, in_f = weight.shape
    if embedding:
        return _finish(
            _normal((r, in_f), 1.0, generator), _normal((out_f, r), 1.0, generator), weight
        )
    A = _uniform((r, in_f), 1.0 / math.sqrt(in_f), generator)
    B = _uniform((out_f, r), 1.0 / math.sqrt(r), generator)
    return _finish(A, B, weight)


# name -> initializer. ``init_lora_weights`` True/False map to "kaiming"/"random".
INITIALIZERS: dict[str, Callable[..., LoraInit]] = {
    "kaiming": kaiming_init,
    "gaussian": gaussian_init,
    "random": random_init,
}


def placeholder_init(
    weight: Tensor, *, r: int, scaling: float, embedding: bool, generator: torch.Generator | None
) -> LoraInit:
    """Zero factors of the right shapes, for :func:`~rankwise.io.load_adapter`, whose file
    replaces them right after: the random draws of the config's initializer were 0.5 s of a
    1.1 s load (BERT-base, r = 64, ``init_lora_weights=False``)."""
    out_f, in_f = weight.shape
    return LoraInit(weight.new_zeros(r, in_f), weight.new_zeros(out_f, r), None)


# initializers whose factors a loaded file replaces whole (the base weight is not moved):
# load_adapter builds the layers with placeholder_init instead
FILE_REPLACED = frozenset({"kaiming", "gaussian", "random"})


# initializers that factor the base weight (PiSSA's SVD, OLoRA's QR): a NaN/inf in it is refused
# by name before they run (OLoRA gave NaN factors silently, PiSSA an error naming only "M")
WEIGHT_READING: set[str] = set()


def initializer_name(init_lora_weights: bool | str) -> str:
    """Registry name for a ``LoraConfig.init_lora_weights`` value."""
    if init_lora_weights is True:
        return "kaiming"
    if init_lora_weights is False:
        return "random"
    return init_lora_weights
