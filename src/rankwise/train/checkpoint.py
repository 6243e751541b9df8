"""Atomic training checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

Layout of ``<output>/checkpoints/step-000050/``:

* ``trainable.safetensors`` — every trainable tensor under its in-memory name;
* ``state.pt`` — optimizer and scheduler ``state_dict``s, the method hooks' state (e.g.
  AdaLoRA's importance averages and rank pattern) and the torch RNG state, written with
  ``torch.save`` and read only with ``torch.load(..., weights_only=True)`` (no pickle code);
* ``checkpoint.json`` — step, data position (epoch, micro-batch) and a SHA-256 of each file.

A checkpoint is built in a temporary directory beside the others and renamed into place
(``os.replace``), so a kill at any moment leaves either the complete checkpoint or none. On
load, a checkpoint whose files are missing or do not match their hashes is skipped with a
warning and the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from safetensors import SafetensorError

from rankwise.io.files import readable_files

CHECKPOINTS_DIR = "checkpoints"
WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "state.pt"
INDEX_FILE = "checkpoint.json"
PREFIX = "step-"


class Position(NamedTuple):
    """Where training stands: optimizer steps done, and the next micro-batch of which epoch."""

    step: int
    epoch: int
    batch: int


class Checkpoint(NamedTuple):
    path: Path
    position: Position
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: torch.Tensor  # torch's CPU generator state (of rank 0)
    cuda_rng: list[torch.Tensor]  # one state per CUDA device (empty on CPU)
    meta: dict[str, Any]
    skipped: tuple[str, ...]  # later checkpoints that were unreadable (one message each)
    hooks: dict[str, Any]  # the method hooks' state (tensors and plain containers)
    rank_rngs: list[torch.Tensor]  # every process's CPU generator state, in rank order

    def rng_for(self, rank: int, world_size: int) -> torch.Tensor:
        """Process ``rank``'s generator state (rank 0's for a checkpoint without them)."""
        if len(self.rank_rngs) == world_size:
            return self.rank_rngs[rank]
        return self.rng


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    output: str | os.PathLike[str],
    position: Position,
    *,
    weights: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, Any],
    scheduler: Mapping[str, Any],
    keep: int = 2,
    meta: Mapping[str, Any] | None = None,
    hooks: Mapping[str, Any] | None = None,
    rank_rngs: list[torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint atomically and keep only the ``keep`` most recent ones.

    ``meta``: JSON-able facts the resumed run must match (e.g. the global batch size);
    ``hooks``: the method hooks' state (tensors, lists, dicts, numbers, strings, bools);
    ``rank_rngs``: every process's generator state under torchrun (default: this one's).
    """
    root = Path(output) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{position.step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    for leftover in root.iterdir():  # half-built or half-deleted ones of killed earlier runs
        if leftover.is_dir() and leftover.name.startswith((".tmp-", ".stale-")):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        _fill(tmp, weights, optimizer, scheduler, hooks, rank_rngs, position, meta)
    except BaseException as err:  # a full disk, say: no half-built checkpoint left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, SafetensorError):  # safetensors' own error names no file
            raise OSError(f"checkpoint {final}: could not be written ({err})") from None
        raise
    if final.exists():  # re-saving a step (after a resume): move the old one aside first
        _discard(final)
    os.replace(tmp, final)
    _fsync(root)
    # newer ones belong to a timeline this run left (it resumed from an older checkpoint past
    # unusable ones): dropped, so pruning below never removes the one just written
    found = list_checkpoints(output)
    kept = [p for p in found if cast(int, _step_of(p)) <= position.step]
    for old in [p for p in found if p not in kept] + kept[:-keep]:
        _discard(old)
    return final


def _fill(
    tmp: Path,
    weights: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, Any],
    scheduler: Mapping[str, Any],
    hooks: Mapping[str, Any] | None,
    rank_rngs: Sequence[torch.Tensor] | None,
    position: Position,
    meta: Mapping[str, Any] | None,
) -> None:
    """Write a checkpoint's three files into the empty directory ``tmp``, fsync'ed."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in weights.items()}
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    readable_files(tmp)  # save_file makes it 0o600, unlike the run's other files
    state = {
        "optimizer": dict(optimizer),
        "scheduler": dict(scheduler),
        "hooks": dict(hooks or {}),
        "rng": torch.get_rng_state(),
        "rank_rngs": list(rank_rngs) if rank_rngs is not None else [torch.get_rng_state()],
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, tmp / STATE_FILE)
    index = {
        "format": "rankwise-checkpoint/1",
        "position": position._asdict(),
        "meta": dict(meta or {}),
        "sha256": {name: _sha256(tmp / name) for name in (WEIGHTS_FILE, STATE_FILE)},
    }
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
    for name in (WEIGHTS_FILE, STATE_FILE, INDEX_FILE):
        _fsync(tmp / name)


def _discard(path: Path) -> None:
    """Delete a checkpoint so a kill midway never leaves a half-deleted ``step-*`` directory:
    rename it out of the ``step-*`` namespace first (atomic), then remove it."""
    stale = path.with_name(f".stale-{path.name}-{os.getpid()}")
    os.replace(path, stale)
    shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(output: str | os.PathLike[str]) -> list[Path]:
    """Complete-looking checkpoint directories, oldest first (temporary ones are ignored)."""
    root = Path(output) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    # by step number, not name: "step-1000000" sorts before "step-999999" as text
    return sorted(found, key=lambda p: cast(int, _step_of(p)))


def _step_of(path: Path) -> int | None:
    """The step of a ``step-<digits>`` directory name, None for any other name."""
    digits = path.name[len(PREFIX) :]
    if not path.name.startswith(PREFIX) or not digits.isascii() or not digits.isdigit():
        return None
    return int(digits)


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint; ``ValueError`` naming the file if anything is off."""
    from safetensors.torch import load_file

    try:
        index = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
        hashes, fields = index["sha256"], index["position"]
        meta = index.get("meta", {})
        if not all(isinstance(part, dict) for part in (hashes, fields, meta)):
            raise TypeError("sha256, position and meta must be JSON objects")
        position = Position(**{k: int(v) for k, v in fields.items()})
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise ValueError(f"{path / INDEX_FILE}: unreadable ({type(err).__name__})") from None
    for name in (WEIGHTS_FILE, STATE_FILE):
        file = path / name
        if not file.is_file() or _sha256(file) != hashes.get(name):
            raise ValueError(f"{file}: missing or does not match its SHA-256 (partial or corrupt)")
    file = path / WEIGHTS_FILE
    try:
        weights = load_file(str(file))
        file = path / STATE_FILE
        # weights_only=True: a state file holding anything but tensors and plain containers
        # (e.g. a planted pickle payload) is refused by torch's restricted unpickler, never run.
        state = torch.load(file, map_location="cpu", weights_only=True)
        parts = (state["optimizer"], state["scheduler"], state["rng"])
    except Exception as err:  # any unreadable content means "this checkpoint is unusable"
        raise ValueError(f"{file}: unreadable ({type(err).__name__}: {str(err)[:200]})") from None
    return Checkpoint(
        path,
        position,
        weights,
        *parts,
        list(state.get("cuda_rng", [])),
        dict(meta),
        (),
        dict(state.get("hooks", {})),
        list(state.get("rank_rngs", [])),
    )


def load_latest(output: str | os.PathLike[str]) -> Checkpoint | None:
    """The newest readable checkpoint (falling back past corrupt ones, with a warning each)."""
    skipped: list[str] = []
    for path in reversed(list_checkpoints(output)):
        try:
            found = read_checkpoint(path)
        except ValueError as err:
            message = (
                f"checkpoint {path.name} is unusable ({err}); falling back to the previous one"
            )
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            skipped.append(message)
            continue
        return found._replace(skipped=tuple(skipped))
    return None
