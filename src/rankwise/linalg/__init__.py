"""``rankwise.linalg``: the low-rank approximation toolkit everything else builds on.

Pure tensor maths, no ``nn.Module``. Torch tensors in and out (numpy arrays accepted and
returned as numpy), float32 and float64, results as NamedTuples with fixed fields, and every
randomized routine takes ``generator: torch.Generator | int | None``.

* :func:`truncated_svd`, :func:`randomized_svd` -> :class:`SVD` (Eckart–Young; Halko et al. 2011)
* :func:`pinv`, :func:`lstsq_factor` (through the SVD, never the normal equations)
* :func:`cr_approx` -> :class:`CR`, :func:`cr_expected_error` (Drineas, Kannan, Mahoney 2006)
* :func:`interpolative` -> :class:`ID`, :func:`id_reconstruct`, :func:`id_to_svd`,
  :func:`cur` -> :class:`CUR` (Cheng et al. 2005; Voronin & Martinsson 2017)
* :func:`monarch_project` -> :class:`Monarch`, :func:`monarch_slices` (Dao et al. 2022)
* helpers: :func:`energy`, :func:`rank_for_energy`, :func:`stable_rank`,
  :func:`effective_rank`, :func:`relative_error`
"""

from __future__ import annotations

from rankwise.linalg.cr import CR, cr_approx, cr_expected_error
from rankwise.linalg.interpolative import CUR, ID, cur, id_reconstruct, id_to_svd, interpolative
from rankwise.linalg.monarch import Monarch, monarch_project, monarch_slices
from rankwise.linalg.pinv import lstsq_factor, pinv
from rankwise.linalg.rank import (
    effective_rank,
    energy,
    rank_for_energy,
    relative_error,
    stable_rank,
)
from rankwise.linalg.svd import SVD, randomized_svd, truncated_svd

__all__ = [
    "CR",
    "CUR",
    "ID",
    "SVD",
    "Monarch",
    "cr_approx",
    "cr_expected_error",
    "cur",
    "effective_rank",
    "energy",
    "id_reconstruct",
    "id_to_svd",
    "interpolative",
    "lstsq_factor",
    "monarch_project",
    "monarch_slices",
    "pinv",
    "randomized_svd",
    "rank_for_energy",
    "relative_error",
    "stable_rank",
    "truncated_svd",
]
