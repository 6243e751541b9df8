"""Spectrum summaries and the LoRA paper's amplification measure against dense computations."""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.analysis import Factors, amplification, spectrum
from rankwise.errors import ShapeMismatchError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_spectrum(S: torch.Tensor, m: int, n: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    U, _ = torch.linalg.qr(torch.randn(m, S.numel(), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, S.numel(), generator=g, dtype=torch.float64))
    return U @ torch.diag(S) @ V.mT


def test_spectrum_of_a_known_spectrum() -> None:
    S = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    result = spectrum(_with_spectrum(S, 20, 30, seed=0))
    torch.testing.assert_close(result.singular_values[:4], S)
    assert result.singular_values[4:].abs().max() < 1e-12
    assert result.stable_rank == pytest.approx((16 + 4 + 1 + 1) / 16)
    p = S / S.sum()
    assert result.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-9)
    torch.testing.assert_close(
        result.energy[:4], torch.tensor([16, 20, 21, 22], dtype=torch.float64) / 22.0
    )


def test_spectrum_of_factors_equals_the_dense_one() -> None:
    g = _gen(1)
    B = torch.randn(40, 6, generator=g, dtype=torch.float64)
    A = torch.randn(6, 30, generator=g, dtype=torch.float64)
    factored, dense = spectrum(Factors(B, A)), spectrum(B @ A)
    torch.testing.assert_close(factored.singular_values, dense.singular_values[:6])
    assert factored.stable_rank == pytest.approx(dense.stable_rank, rel=1e-10)
    assert factored.effective_rank == pytest.approx(dense.effective_rank, rel=1e-9)


def _dense_amplification(W: torch.Tensor, delta: torch.Tensor, r: int) -> tuple[float, float]:
    U, S, Vh = torch.linalg.svd(delta)
    projected = torch.linalg.norm(U[:, :r].mT @ W @ Vh[:r].mT)
    Uw, Sw, Vhw = torch.linalg.svd(W)
    own = torch.linalg.norm(Uw[:, :r].mT @ W @ Vhw[:r].mT)
    return float(projected), float(own)


def test_amplification_matches_a_dense_computation() -> None:
    g = _gen(2)
    W = torch.randn(48, 32, generator=g, dtype=torch.float64)
    delta = torch.randn(48, 4, generator=g, dtype=torch.float64) @ torch.randn(
        4, 32, generator=g, dtype=torch.float64
    )
    result = amplification(W, delta, generator=0)
    projected, own = _dense_amplification(W, delta, 4)
    assert result.rank == 4  # the numerical rank of delta
    assert result.delta_norm == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-12)
    assert result.weight_norm == pytest.approx(float(torch.linalg.norm(W)), rel=1e-12)
    assert result.delta_directions == pytest.approx(projected, rel=1e-10)
    assert result.weight_directions == pytest.approx(own, rel=1e-10)
    assert result.factor == pytest.approx(result.delta_norm / projected, rel=1e-10)
    assert amplification(W, delta, generator=0) == result  # reproducible random baseline


def test_amplification_of_an_update_along_w_top_directions() -> None:
    # delta spans W's own top-2 directions: its projection equals W's top-2 energy.
    W = _with_spectrum(torch.tensor([9.0, 5.0, 1.0, 0.5], dtype=torch.float64), 30, 20, seed=3)
    U, S, Vh = torch.linalg.svd(W)
    delta = 0.1 * U[:, :2] @ Vh[:2]
    result = amplification(W, delta, rank=2, generator=1)
    assert result.delta_directions == pytest.approx(math.hypot(9.0, 5.0), rel=1e-10)
    assert result.weight_directions == pytest.approx(math.hypot(9.0, 5.0), rel=1e-10)


def test_random_directions_have_the_expected_energy() -> None:
    # For Haar-random r-subspaces, E ||Q1^T W Q2||_F^2 = r^2 ||W||_F^2 / (m n).
    g = _gen(4)
    W = torch.randn(24, 16, generator=g, dtype=torch.float64)
    delta = torch.randn(24, 16, generator=g, dtype=torch.float64)
    values = [
        amplification(W, delta, rank=3, generator=s).random_directions ** 2 for s in range(120)
    ]
    expected = 9 * float(torch.linalg.norm(W) ** 2) / (24 * 16)
    assert sum(values) / len(values) == pytest.approx(expected, rel=0.2)


def test_amplification_errors() -> None:
    with pytest.raises(ShapeMismatchError, match="same shape"):
        amplification(torch.randn(4, 5), torch.randn(5, 4))
    with pytest.raises(ValueError, match="rank"):
        amplification(torch.randn(4, 5), torch.randn(4, 5), rank=9)
    with pytest.raises(ValueError, match="rank"):
        amplification(torch.randn(4, 5), torch.zeros(4, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_default_rank_of_a_half_precision_update_is_its_rank(dtype: torch.dtype) -> None:
    """NumPy's rule (max(shape)·eps·σ₁) with bfloat16's eps exceeds σ₁ from 128 columns on:
    a rank-4 update counted as rank 1, a rank-8 384×384 one as zero (refused)."""
    g = _gen(3)
    for (m, n), r in (((120, 90), 4), ((384, 384), 8)):
        delta = (torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)) * 0.05
        W = torch.randn(m, n, generator=g)
        assert amplification(W.to(dtype), delta.to(dtype)).rank == r
    # a decaying rank-8 spectrum, 256 wide: float16's NumPy tolerance (0.25·σ₁) kept 4
    S = torch.tensor([1.0, 0.6, 0.4, 0.3, 0.2, 0.15, 0.1, 0.08], dtype=torch.float64)
    delta = _with_spectrum(S, 256, 256, seed=5).float()
    W = torch.randn(256, 256, generator=g)
    assert amplification(W.to(dtype), delta.to(dtype)).rank == 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapter_amplification_of_a_half_precision_adapter(dtype: torch.dtype, tmp_path) -> None:
    """A bfloat16 adapter on a 160-wide layer was refused as zero, a float16 one cut to a
    lower rank: B A is formed in float64 from the stored factors, with no rounding to count."""
    import copy

    from torch import nn

    import rankwise as rw
    from rankwise.analysis import adapter_amplification

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(160, 160))
    model = rw.inject(copy.deepcopy(base), rw.LoraConfig(r=4, target_modules=["0"]))
    with torch.no_grad():
        model[0].lora_B.weight.normal_(std=0.1)
    model[0].lora_A.to(dtype)
    model[0].lora_B.to(dtype)
    rw.save_adapter(model, tmp_path / "a")
    (row,) = adapter_amplification(base, tmp_path / "a", generator=0)
    A, B = model[0].lora_A.weight.double(), model[0].lora_B.weight.double()
    direct = amplification(base[0].weight.detach().double(), model[0].scaling * B @ A, rank=4)
    assert row.amplification.rank == 4
    assert row.amplification.factor == pytest.approx(direct.factor, rel=1e-6)


def test_adapter_amplification_of_a_bfloat16_dora_adapter(tmp_path) -> None:
    """The DoRA noise floor max(shape)·eps·‖W‖₂ is 2.5·‖W‖₂ for bfloat16 at 160 columns: a
    trained bfloat16 DoRA adapter was refused as untrained. An untrained one still is."""
    import copy

    from safetensors.torch import load_file, save_file
    from torch import nn

    import rankwise as rw
    from rankwise.analysis import adapter_amplification

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(160, 160))
    config = rw.LoraConfig(r=4, target_modules=["0"], use_dora=True)
    for trained in (False, True):
        model = rw.inject(copy.deepcopy(base), config)
        if trained:
            with torch.no_grad():
                model[0].lora_B.weight.normal_(std=0.05)
                model[0].lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(160))
        directory = tmp_path / f"dora_{trained}"
        rw.save_adapter(model, directory)
        file = directory / "adapter_model.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, file)
        if not trained:
            with pytest.raises(ValueError, match="update is zero"):
                adapter_amplification(base, directory, generator=0)
            continue
        stored = {
            name: v.double()
            for k, v in load_file(file).items()
            for name in ("lora_A", "lora_B", "lora_magnitude_vector")
            if f".{name}" in k
        }
        W = base[0].weight.detach().double()
        V = W + model[0].scaling * stored["lora_B"] @ stored["lora_A"]
        m = stored["lora_magnitude_vector"]
        delta = m[:, None] * V / V.norm(dim=1, keepdim=True) - W
        (row,) = adapter_amplification(base, directory, generator=0)
        assert row.amplification.rank == 4
        assert row.amplification.delta_norm == pytest.approx(float(delta.norm()), rel=1e-6)


def test_spectrum_of_a_zero_update_has_full_energy_as_linalg_says() -> None:
    """A zero update loses nothing at any rank: energy 1 everywhere, as ``linalg.energy``
    (it read 0, the opposite, for the dense and the factored form alike)."""
    from rankwise.linalg import energy

    for delta in (torch.zeros(6, 4), Factors(torch.zeros(6, 2), torch.zeros(2, 4))):
        s = spectrum(delta)
        assert s.stable_rank == 0.0 and s.effective_rank == 0.0
        assert torch.equal(s.energy, energy(s.singular_values))
        assert bool((s.energy == 1).all())


def test_figures_leave_the_callers_matplotlib_backend_alone(tmp_path) -> None:
    # the plots switched the process to Agg (matplotlib.use(..., force=True)): a notebook
    # lost inline plotting after any rankwise figure
    import subprocess
    import sys
    import textwrap

    pytest.importorskip("matplotlib")
    script = textwrap.dedent(f"""
        import numpy as np, matplotlib
        matplotlib.use("svg")
        from rankwise.analysis import plots
        from rankwise.analysis.image import CompressionRow
        from rankwise.train.metrics import plot_training_curve
        out = {str(tmp_path)!r}
        plots.plot_image_spectrum(np.array([3.0, 2.0, 1.0]), [1], out)
        image = np.eye(4)
        rows = [CompressionRow(m, 1, 8, 2.0, 0.1) for m in ("SVD", "ID", "Monarch (b=1)")]
        plots.plot_compression(image, rows, {{(m, 1): image for m in ("SVD", "ID", "Monarch")}}, out)
        open(out + "/metrics.jsonl", "w").write('{{"step": 1, "loss": 0.5}}\\n')
        plot_training_curve(out + "/metrics.jsonl", out + "/curve.png")
        print(matplotlib.get_backend())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg"
    assert all(
        (tmp_path / n).stat().st_size > 0
        for n in ("spectrum.png", "compress_grid.png", "curve.png")
    )
