"""Input checks and numpy/torch conversion shared by every ``rankwise.linalg`` routine.

Every public function funnels its matrices through :func:`as_matrix` (2-D, floating, finite;
numpy arrays are viewed as tensors without a copy) and hands its result back through
:func:`to_output`, which turns tensors into numpy arrays again when the caller passed numpy.
Nothing here, nor in the routines, writes into a caller's array.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray
T = TypeVar("T")

_FLOATS = (torch.float32, torch.float64)


class Matrix(NamedTuple):
    """A validated 2-D floating tensor and whether the caller gave a numpy array."""

    tensor: torch.Tensor
    was_numpy: bool


def as_matrix(value: Any, name: str, *, check_finite: bool = True) -> Matrix:
    """Validate ``value`` as a 2-D finite float32/float64 matrix named ``name``.

    Integer and boolean inputs are promoted to float64 (numpy's default float); float16 and
    bfloat16 are promoted to float32, since LAPACK has no half-precision factorizations.
    """
    was_numpy = isinstance(value, np.ndarray)
    if was_numpy:
        # float128/longdouble: torch has no such dtype (from_numpy would raise a TypeError)
        if value.dtype.kind not in "biuf" or value.dtype.itemsize > 8:
            raise ValueError(f"{name}: expected a real numeric array, found dtype {value.dtype}")
        tensor = from_numpy(value)
    elif isinstance(value, torch.Tensor):
        tensor = value
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, found {type(value)}")
    if tensor.is_meta:
        raise ValueError(f"{name}: expected a tensor with data, found one on the meta device")
    if tensor.ndim != 2:
        raise ValueError(
            f"{name}: expected a 2-D matrix, found {tensor.ndim}-D with shape {tuple(tensor.shape)}"
        )
    if tensor.is_complex():
        raise ValueError(f"{name}: expected a real matrix, found dtype {tensor.dtype}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    elif tensor.dtype not in _FLOATS:
        tensor = tensor.to(torch.float32)
    if min(tensor.shape) == 0:
        raise ValueError(f"{name}: expected a non-empty matrix, found shape {tuple(tensor.shape)}")
    if check_finite and (bad := non_finite_count(tensor)):
        raise ValueError(f"{name}: expected finite entries, found {bad} NaN/Inf entries")
    return Matrix(tensor, was_numpy)


def from_numpy(value: np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor, whatever its strides (negative ones: ``x[::-1]``) and byte
    order: copied to a C-contiguous native-order array where needed (torch reads neither)."""
    with warnings.catch_warnings():  # read-only arrays: fine, nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        native = value.dtype.newbyteorder("=")
        # np.require keeps a 0-D array 0-D (ascontiguousarray made it 1-D: the error then
        # named the wrong shape)
        return torch.from_numpy(np.require(value, dtype=native, requirements="C"))


def non_finite_count(tensor: torch.Tensor) -> int:
    """How many entries of ``tensor`` are NaN/inf, in one streaming pass when there are none:
    a NaN/inf entry makes the sum non-finite (a finite overflow only sends it to the exact
    count, which then finds nothing)."""
    with torch.no_grad():
        if bool(torch.isfinite(tensor.sum())):
            return 0
        return int((~torch.isfinite(tensor)).sum())


def check_rank(rank: Any, shape: tuple[int, ...], name: str = "rank") -> int:
    """``rank`` must be an int with ``1 <= rank <= min(shape)``."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise ValueError(f"{name}: expected an int, found {rank!r} ({type(rank).__name__})")
    limit = min(shape)
    if not 1 <= int(rank) <= limit:
        raise ValueError(
            f"{name}: expected 1 <= {name} <= min{tuple(shape)} = {limit}, found {rank}"
        )
    return int(rank)


def check_fraction(value: Any, name: str, *, closed_right: bool) -> float:
    """``value`` must be a real number in (0, 1] (``closed_right``) or (0, 1)."""
    if isinstance(value, (str, bytes, bool, np.bool_)):  # float() would take "0.5" and True
        raise ValueError(f"{name}: expected a number, found {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, found {value!r}") from None
    upper_ok = number <= 1.0 if closed_right else number < 1.0
    if not (math.isfinite(number) and number > 0.0 and upper_ok):
        interval = "(0, 1]" if closed_right else "(0, 1)"
        raise ValueError(f"{name}: expected a value in {interval}, found {value!r}")
    return number


def check_flag(value: Any, name: str) -> bool:
    """``value`` as a bool, else a TypeError naming ``name`` (``"no"`` is truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, found {value!r}")
    return bool(value)


def check_one_of(**options: Any) -> str:
    """Exactly one of the keyword ``options`` may be given (not None); return its name."""
    given = [key for key, value in options.items() if value is not None]
    if len(given) != 1:
        names = ", ".join(options)
        raise ValueError(f"expected exactly one of {names}; found {given or 'none'}")
    return given[0]


def times_power_of_two(tensor: torch.Tensor, exponent: int) -> torch.Tensor:
    """``tensor · 2^exponent``, exact unless an entry over- or underflows.

    Taken in steps whose factors are normal numbers of ``tensor``'s dtype: bringing subnormal
    entries up to 1 needs up to 2^1074 (float64) or 2^149 (float32), beyond either range.
    """
    limit = math.frexp(torch.finfo(tensor.dtype).max)[1] - 2  # float32: 126, float64: 1022
    while exponent:
        step = max(-limit, min(limit, exponent))
        tensor = tensor * 2.0**step
        exponent -= step
    return tensor


def peak_exponent(tensor: torch.Tensor) -> int:
    """``e`` with ``max |tensor| = f · 2^e``, ``0.5 <= f < 1`` (0 for a zero or non-finite peak)."""
    peak = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
    return math.frexp(peak)[1] if peak > 0 and math.isfinite(peak) else 0


def unit_scaled(A: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(A · 2^-e, e)`` bringing ``A``'s largest entry near 1 when its squares could overflow
    (``m · peak²`` near the dtype's max: float32 at a peak of ~2^58 for 1000 rows) or the largest
    one vanish (``peak²`` below the smallest normal number, subnormal entries included); ``(A,
    0)`` itself (no copy) at ordinary scales. Exact: pivots, subspaces and singular values
    scaled back do not depend on scale, and products of a rescaled matrix stay in range."""
    peak = float(A.detach().abs().max()) if A.numel() else 0.0  # no grad warning
    if peak == 0 or not math.isfinite(peak):
        return A, 0
    info = torch.finfo(A.dtype)
    high = math.sqrt(info.max / (4 * max(A.shape[0], 1)))
    low = math.sqrt(info.tiny) * 2.0**12  # the squared peak keeps 24 bits above underflow
    if low <= peak <= high:
        return A, 0
    e = math.frexp(peak)[1]
    return times_power_of_two(A, -e), e


def to_output(result: T, was_numpy: bool) -> T:
    """Return ``result`` (a tensor or a NamedTuple of tensors) as numpy if the input was numpy."""
    if not was_numpy:
        return result
    if isinstance(result, torch.Tensor):
        return result.detach().cpu().numpy()  # type: ignore[return-value]
    fields = [
        f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else f
        for f in result  # type: ignore[attr-defined]
    ]
    return type(result)(*fields)  # type: ignore[call-arg]
