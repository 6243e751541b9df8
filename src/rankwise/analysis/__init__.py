"""Analysis of low-rank updates and adapter algebra in factored form.

The LoRA paper's questions as functions (Hu et al. 2021, Sec. 7): how similar are the
subspaces two adapters learn (:func:`subspace_similarity`), is ``ΔW`` really low-rank
(:func:`spectrum`), and how does ``ΔW`` relate to ``W`` (:func:`amplification`). Adapters are
transformed without forming ``B @ A``: :func:`resize`, :func:`combine` (linear, SVD, TIES,
DARE) and :func:`extract` (a LoRA from the difference of two weights). Tensors in and out.
Adapter directories (PEFT format) and models: :func:`adapter_similarity`,
:func:`adapter_spectrum`, :func:`adapter_amplification`, :func:`resize_adapter`,
:func:`combine_adapters`, :func:`extract_adapter` and :func:`budget_plan`, each returning one
report row per module; text tables in :mod:`rankwise.analysis.report`, PNG figures in
:mod:`rankwise.analysis.plots` (matplotlib, imported only there).
"""

from __future__ import annotations

from rankwise.analysis.adapter_files import read_factors, write_factors
from rankwise.analysis.adapters import (
    LayerReport,
    ModuleSimilarity,
    ModuleSpectrum,
    adapter_similarity,
    adapter_spectrum,
    combine_adapters,
    resize_adapter,
)
from rankwise.analysis.algebra import (
    COMBINE_METHODS,
    Factors,
    combine,
    dare_merge,
    extract,
    factored_svd,
    resize,
    split_svd,
    ties_merge,
)
from rankwise.analysis.amplification import Amplification, amplification
from rankwise.analysis.budget import BudgetPlan, budget_plan
from rankwise.analysis.model import (
    ExtractReport,
    ModuleAmplification,
    adapter_amplification,
    extract_adapter,
)
from rankwise.analysis.similarity import factor_basis, subspace_similarity
from rankwise.analysis.spectrum import Spectrum, spectrum

__all__ = [
    "COMBINE_METHODS",
    "Amplification",
    "BudgetPlan",
    "ExtractReport",
    "Factors",
    "LayerReport",
    "ModuleAmplification",
    "ModuleSimilarity",
    "ModuleSpectrum",
    "Spectrum",
    "adapter_amplification",
    "adapter_similarity",
    "adapter_spectrum",
    "amplification",
    "budget_plan",
    "combine",
    "combine_adapters",
    "extract_adapter",
    "read_factors",
    "resize_adapter",
    "write_factors",
    "dare_merge",
    "extract",
    "factor_basis",
    "factored_svd",
    "resize",
    "spectrum",
    "split_svd",
    "subspace_similarity",
    "ties_merge",
]
