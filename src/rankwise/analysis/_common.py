"""Small helpers shared by the analysis modules: argument checks, dtypes, generators."""

from __future__ import annotations

import torch
from torch import Tensor

from rankwise.errors import ShapeMismatchError
from rankwise.linalg._random import make_generator
from rankwise.linalg._validate import non_finite_count


def check_matrix(M: Tensor, *, name: str) -> None:
    """Raise unless ``M`` is a 2-D finite floating-point tensor with no empty dimension
    (checked here, by its caller's name: ``rankwise.linalg`` would name its own argument, or
    an internal product of two factors)."""
    if not isinstance(M, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; found {type(M).__name__}")
    if M.ndim != 2 or 0 in M.shape:
        raise ShapeMismatchError(f"{name} must be a non-empty matrix; found shape {tuple(M.shape)}")
    if not M.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; found {M.dtype}")
    if bad := non_finite_count(M):
        raise ValueError(f"{name}: expected finite entries; found {bad} NaN/Inf entries")


def check_factors(B: Tensor, A: Tensor, *, name: str = "factors") -> None:
    """Raise unless ``B: (out, r)`` and ``A: (r, in)`` are matrices with matching ``r``."""
    check_matrix(B, name=f"{name} B")
    check_matrix(A, name=f"{name} A")
    if B.shape[1] != A.shape[0]:
        raise ShapeMismatchError(
            f"{name}: B is {tuple(B.shape)} and A is {tuple(A.shape)}; "
            "expected B (out, r) and A (r, in) with the same r"
        )


def work_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """A CPU generator from a generator or an int seed; ``None`` stays ``None`` (torch's global
    generator, reproducible under ``torch.manual_seed``): ``rankwise.linalg``'s rule itself.
    """
    return make_generator(generator)
