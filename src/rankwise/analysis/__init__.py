"""Analysis of low-rank updates and adapter algebra in factored form.

The LoRA paper's questions as functions (Hu et al. 2021, Sec. 7): how similar are the
subspaces two adapters learn (:func:`subspace_similarity`), is ``ΔW`` really low-rank
(:func:`spectrum`), and how does ``ΔW`` relate to ``W`` (:func:`amplification`). Adapters are
transformed without forming ``B @ A``: :func:`resize`, :func:`combine` (linear, SVD, TIES,
DARE) and :func:`extract` (a LoRA from the difference of two weights). Tensors in and out;
the model- and directory-level versions live in :mod:`rankwise.analysis.model`.
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
