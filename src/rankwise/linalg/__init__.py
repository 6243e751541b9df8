"""``rankwise.linalg``: the low-rank approximation toolkit everything else builds on.

Pure tensor maths, no ``nn.Module``. Torch tensors in and out (numpy arrays accepted and
returned as numpy), float32 and float64, results as NamedTuples with fixed fields, and every
randomized routine takes ``generator: torch.Generator | int | None``.

* :func:`truncated_svd`, :func:`randomized_svd` -> :class:`SVD` (Eckart–Young; Halko et al. 2011)
* helpers: :func:`energy`, :func:`rank_for_energy`, :func:`stable_rank`,
  :func:`effective_rank`, :func:`relative_error`
"""

from __future__ import annotations

from rankwise.linalg.rank import (
    effective_rank,
    energy,
    rank_for_energy,
    relative_error,
    stable_rank,
)
from rankwise.linalg.svd import SVD, randomized_svd, truncated_svd

__all__ = [
    "SVD",
    "effective_rank",
    "energy",
    "randomized_svd",
    "rank_for_energy",
    "relative_error",
    "stable_rank",
    "truncated_svd",
]
