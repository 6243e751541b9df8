"""Matrices with known spectra for the LoRA-variant tests (a uniquely named helper module)."""

from __future__ import annotations

import torch


def known_spectrum(
    m: int, n: int, *, decay: float = 0.8, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``U diag(decay**i) Vᵀ`` with random orthonormal U (m, k), V (n, k), k = min(m, n)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    S = decay ** torch.arange(k, dtype=torch.float64)
    return ((U * S) @ V.T).to(dtype)
