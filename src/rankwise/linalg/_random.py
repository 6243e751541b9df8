"""Random number generation for the randomized routines: one reproducible entry point."""

from __future__ import annotations

import numpy as np
import torch

from rankwise.errors import GeneratorError

GeneratorLike = torch.Generator | int | None


# The seeds taken: torch.Generator.manual_seed's non-negative range (it also takes negative
# ones, wrapped modulo 2**64, so -1 and 2**64 - 1 gave the same draws; numpy refuses them)
SEED_MIN, SEED_MAX = 0, 2**64 - 1
# A run's --seed (torch.manual_seed for the whole process): torch's whole range, negative ones
# included, as runs recorded them before the generators' range was narrowed (they resume)
RUN_SEED_MIN = -(2**63)


def make_generator(generator: GeneratorLike) -> torch.Generator | None:
    """Turn ``generator`` into a CPU ``torch.Generator``.

    * a ``torch.Generator`` is used as is (its state advances, like any torch sampler);
    * an ``int`` seeds a fresh generator, so equal seeds give equal results;
    * ``None`` returns ``None``: torch's global generator (reproducible under
      ``torch.manual_seed``).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (bool, np.bool_)) or not isinstance(generator, (int, np.integer)):
        raise GeneratorError(
            "generator: expected a torch.Generator, an int seed or None, "
            f"found {type(generator).__name__}"
        )
    if not SEED_MIN <= int(generator) <= SEED_MAX:
        raise GeneratorError(
            f"generator: expected a seed in [{SEED_MIN}, {SEED_MAX}], found {int(generator)}"
        )
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(generator))
    return gen


def gaussian(
    rows: int, cols: int, *, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """A (rows, cols) standard Gaussian matrix with ``like``'s dtype and device.

    Drawn on the CPU (where the generator lives) so results do not depend on the device.
    """
    sample = torch.randn(rows, cols, generator=generator, dtype=like.dtype)
    return sample.to(like.device)


def choice(
    probabilities: torch.Tensor, count: int, *, generator: torch.Generator | None
) -> torch.Tensor:
    """``count`` indices drawn with replacement from ``probabilities`` (on the CPU)."""
    weights = probabilities.detach().to("cpu", torch.float64)
    return torch.multinomial(weights, count, replacement=True, generator=generator)
