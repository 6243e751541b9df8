"""Safe file primitives: atomic writes and validated safetensors reading.

* Atomic writes: the bytes go to a temporary file in the destination's directory, are
  flushed and fsync'ed, then ``os.replace`` puts them in place, so a crash never leaves a
  half-written adapter.
* Reading: the safetensors header (JSON with every tensor's dtype, shape and byte range) is
  parsed and validated by ``safetensors.safe_open`` before any tensor is read; any failure
  becomes :class:`AdapterFormatError` naming the file. Nothing is ever unpickled.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from rankwise.errors import AdapterFormatError


class TensorInfo(NamedTuple):
    """A tensor's entry in a safetensors header."""

    dtype: str
    shape: tuple[int, ...]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + os.replace)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], *, metadata: dict[str, str]
) -> None:
    """Save ``tensors`` (contiguous CPU copies) to ``path`` atomically with ``metadata``."""
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(plain, metadata=metadata))


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Key -> (dtype, shape) from ``path``'s header, validated without reading tensor data."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            out = {}
            for key in fh.keys():
                sl = fh.get_slice(key)
                out[key] = TensorInfo(str(sl.get_dtype()), tuple(int(s) for s in sl.get_shape()))
            return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFormatError(f"{path}: not a valid safetensors file ({err})") from None


def read_tensors(path: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read the named tensors from ``path`` (CPU); failures become AdapterFormatError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFormatError(f"{path}: cannot read tensors ({err})") from None
