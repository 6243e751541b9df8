"""Matrices with known spectra for the ``rankwise.linalg`` tests (Hilbert, geometric, flat tail)."""

from __future__ import annotations

import torch


def with_spectrum(
    m: int, n: int, sigma: torch.Tensor, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """An (m, n) matrix ``U diag(sigma) Vᵀ`` with Haar-like random orthonormal ``U``, ``V``."""
    gen = torch.Generator().manual_seed(seed)
    r = sigma.numel()
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return ((U * sigma.to(torch.float64)) @ V.T).to(dtype)


def geometric(count: int, ratio: float) -> torch.Tensor:
    return ratio ** torch.arange(count, dtype=torch.float64)


def flat_tail(count: int, k: int, tail: float = 0.1) -> torch.Tensor:
    return torch.where(torch.arange(count) < k, 1.0, tail).to(torch.float64)


def hilbert(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    return 1.0 / (i[:, None] + i[None, :] + 1.0)
