"""Shared pieces of the reliability suite: tiny models, snapshots of models and directories.

Importable as ``rel_kit`` from the tests in this folder (pytest puts the folder on
``sys.path``) and from ``benchmarks/`` (which add the folder themselves). Plain torch modules
keep the fuzzers and the bad-input catalogue fast; transformers models appear only where a
case needs a real architecture.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class Tiny(nn.Module):
    """Every layer kind rankwise wraps: ``emb`` (Embedding 11x6), ``proj`` (Linear 6->5, bias),
    ``conv`` (Conv1d 5->4, k=3, padding 1) and ``head`` (Linear 4->2, a modules_to_save)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 5)
        self.conv = nn.Conv1d(5, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.emb(ids))  # (batch, seq, 5)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)  # (batch, seq, 4)
        return self.head(h.mean(1))  # (batch, 2)


def tiny(seed: int = 0) -> Tiny:
    """A fresh :class:`Tiny` with weights fixed by ``seed`` (two calls give equal models)."""
    torch.manual_seed(seed)
    return Tiny().eval()


def mlp(seed: int = 0, *, dims: tuple[int, ...] = (8, 6, 4)) -> nn.Sequential:
    """``Linear(dims[0], dims[1]) -> ReLU -> Linear(dims[1], dims[2])`` (modules ``0`` and ``2``)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dims[0], dims[1]), nn.ReLU(), nn.Linear(dims[1], dims[2]))


class TiedLM(nn.Module):
    """GPT-2's weight tying in miniature: ``lm_head.weight`` *is* ``wte.weight`` (11 x 6)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(11, 6)
        self.lm_head = nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.wte(ids))  # (batch, seq, 11)


class ModelSnapshot(NamedTuple):
    """A model's tensors (copies), module types, LoRA flags and extra attributes."""

    tensors: dict[str, torch.Tensor]
    types: dict[str, str]
    flags: dict[str, tuple[bool, bool]]
    has_state: bool
    requires_grad: dict[str, bool]


def snapshot(model: nn.Module) -> ModelSnapshot:
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    types = {n: type(m).__name__ for n, m in model.named_modules()}
    flags = {
        n: (bool(getattr(m, "merged", False)), bool(getattr(m, "disabled", False)))
        for n, m in model.named_modules()
        if hasattr(m, "merged")
    }
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return ModelSnapshot(tensors, types, flags, hasattr(model, "_rankwise_lora"), grads)


def model_changes(model: nn.Module, before: ModelSnapshot) -> list[str]:
    """What differs between ``model`` now and ``before`` (empty list: unchanged)."""
    now = snapshot(model)
    changes = []
    for field in ("types", "flags", "has_state", "requires_grad"):
        if getattr(now, field) != getattr(before, field):
            changes.append(field)
    if now.tensors.keys() != before.tensors.keys():
        changes.append("state_dict keys")
    for key in now.tensors.keys() & before.tensors.keys():
        a, b = now.tensors[key], before.tensors[key]
        same = a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        if same and a.device.type != "meta":
            if a.is_floating_point():  # NaN where there was NaN counts as unchanged
                same = torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)
            else:
                same = torch.equal(a, b)
        if not same:
            changes.append(f"tensor {key}")
    return changes


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 (``<dir>`` for directories) of everything under ``root``."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- the bad-input catalogue: one table row per case -------------------------------------------
class Call(NamedTuple):
    """What a case runs, the models that must stay as they are, and its scratch directory
    (every file under it must be byte-identical afterwards)."""

    thunk: Callable[[], object]
    models: tuple[nn.Module, ...] = ()


class Case(NamedTuple):
    """``build(tmp)`` prepares the inputs and returns the :class:`Call`; the call must raise
    ``error`` with a message matching ``match`` (a regex naming the culprit). ``bug``: the
    library does not do this yet (the case is a strict xfail with that reason)."""

    id: str
    build: Callable[[Path], Call]
    error: type[BaseException] | tuple[type[BaseException], ...]
    match: str
    bug: str | None = None


PACKAGE_DIR = Path(__file__).resolve().parents[2] / "src" / "rankwise"


def as_params(cases: list[Case]) -> list[object]:
    import pytest

    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return [
        pytest.param(
            c, id=c.id, marks=pytest.mark.xfail(strict=True, reason=c.bug) if c.bug else ()
        )
        for c in cases
    ]


def check_case(case: Case, tmp_path: Path) -> None:
    """Run one catalogue case: the right error, raised by rankwise, nothing changed."""
    import pytest

    call = case.build(tmp_path)
    before_models = [snapshot(m) for m in call.models]
    before_files = tree_digest(tmp_path)
    with pytest.raises(case.error, match=case.match) as info:
        call.thunk()
    origin = Path(info.traceback[-1].path)
    assert PACKAGE_DIR in origin.parents, f"raised from {origin}, not from rankwise's own checks"
    for model, before in zip(call.models, before_models):
        assert model_changes(model, before) == []
    assert tree_digest(tmp_path) == before_files, "files on disk changed"
