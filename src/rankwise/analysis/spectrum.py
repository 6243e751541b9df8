"""The spectrum of an update ``ΔW``: is it really low-rank, and what rank suffices?

Hu et al. 2021 (LoRA, Sec. 7) argue the optimal ``ΔW`` is rank-deficient. The singular values
answer it directly; two scalar summaries make matrices comparable:

* stable rank ``‖ΔW‖_F² / ‖ΔW‖_2² = Σσᵢ² / σ₁²`` (Rudelson & Vershynin 2007),
* effective rank ``exp(H(p))`` with ``pᵢ = σᵢ / Σσⱼ`` (Roy & Vetterli 2007),

and the energy curve ``e_k = Σ_{i≤k} σᵢ² / Σσᵢ²`` (the rank needed for a given fraction).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rankwise.analysis._common import check_matrix, work_dtype
from rankwise.analysis.algebra import Factors, factored_svd
from rankwise.linalg import effective_rank, energy, stable_rank, truncated_svd


class Spectrum(NamedTuple):
    """Singular values (descending), stable rank, effective rank and cumulative energy."""

    singular_values: Tensor  # (k,)
    stable_rank: float
    effective_rank: float
    energy: Tensor  # (k,): energy[k-1] = fraction of ‖ΔW‖_F² in the top k directions


def spectrum(delta: Tensor | Factors) -> Spectrum:
    """The :class:`Spectrum` of a dense matrix, or of ``B @ A`` given as :class:`Factors`.

    A factored update is never formed: its singular values come from
    :func:`~rankwise.analysis.algebra.factored_svd`, and the rank summaries from
    ``diag(S)``, which has the same singular values.
    """
    if isinstance(delta, Factors):
        S = factored_svd(delta.B, delta.A).S  # (r,)
    else:
        check_matrix(delta, name="delta")
        S = truncated_svd(delta.to(work_dtype(delta))).S  # (min(out, in),)
    core = torch.diag(S)  # (k, k): same singular values as delta
    if float(S.max()) == 0.0:
        return Spectrum(S, 0.0, 0.0, energy(S))  # 1 at every rank, as linalg.energy says
    return Spectrum(S, float(stable_rank(core)), float(effective_rank(core)), energy(S))
