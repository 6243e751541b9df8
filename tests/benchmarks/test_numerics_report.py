"""benchmarks/numerics.py: its float64 reference does not come from rankwise."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # NamedTuple classes need their module registered
    sys.path.insert(0, str(BENCH))  # algebra/variants import their sibling lora.py
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_numerics_reference_is_independent_of_rankwise() -> None:
    numerics = load("numerics")
    row = numerics.measure(64, 4, 1e-1, torch.float32, seed=0)
    assert row["merge_error"] < 1e-5  # float32: the reference (s = alpha / r = 2) agrees
    assert numerics.alpha_for(4) / 4 == 2.0
