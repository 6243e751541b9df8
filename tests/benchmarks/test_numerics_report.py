"""benchmarks/numerics.py: its float64 reference does not come from rankwise."""

from __future__ import annotations

import torch


def test_numerics_reference_is_independent_of_rankwise(bench) -> None:
    numerics = bench("numerics")
    row = numerics.measure(64, 4, 1e-1, torch.float32, seed=0)
    assert row["merge_error"] < 1e-5  # float32: the reference (s = alpha / r = 2) agrees
    assert numerics.alpha_for(4) / 4 == 2.0
