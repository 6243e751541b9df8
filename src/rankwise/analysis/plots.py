"""PNG figures of the analysis reports (matplotlib, imported lazily; drawn on
``matplotlib.figure.Figure`` objects, never through pyplot, so the caller's backend and open
figures are left alone).

* :func:`plot_similarity` — a φ(i, j) heatmap per module, as the LoRA paper's Figures 3–4
  (``i`` down the rows, ``j`` across; colour scale fixed to [0, 1]); with ``zoom`` a second
  panel shows the leading ``zoom × zoom`` corner, as the paper's right-hand panels do.
* :func:`plot_spectra` — normalized singular values (log scale) and cumulative energy.
* :func:`plot_amplification` — the amplification factor per module.
* :func:`plot_budget` — held-out accuracy per set of adapted weight types (equal budget).
* :func:`plot_compression`, :func:`plot_image_spectrum` — ``rankwise compress-image``'s
  reconstructions per rank and the image's spectrum (:mod:`rankwise.analysis.image`).

Each returns the paths it wrote; files are written atomically (temp file, then os.replace).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rankwise.analysis.adapters import ModuleSimilarity, ModuleSpectrum
from rankwise.analysis.budget import BudgetPlan
from rankwise.analysis.image import CompressionRow
from rankwise.analysis.model import ModuleAmplification
from rankwise.io.files import default_file_mode

PathLike = str | os.PathLike[str]


def _figure(**kwargs: Any) -> Any:
    """A figure outside pyplot (no backend switch, no global figure list), PNG via Agg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():  # os.replace said "[Errno 21] Is a directory" naming the temporary file
        fig.clf()
        raise IsADirectoryError(f"figure {str(path)!r}: a directory is in the way of the file")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        fig.clf()
    return path


def _slug(module: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", module)


def plot_similarity(
    rows: Sequence[ModuleSimilarity],
    directory: PathLike,
    *,
    labels: tuple[str, str] = ("adapter 1", "adapter 2"),
    zoom: int | None = 8,
) -> list[Path]:
    """One heatmap PNG per module: ``similarity_<module>.png`` in ``directory``."""
    paths = []
    for row in rows:
        phi = row.phi.detach().cpu().double().numpy()
        panels = [(phi, "")]
        if zoom is not None and max(phi.shape) > zoom:
            panels.append((phi[:zoom, :zoom], f" (top {zoom})"))
        fig = _figure(figsize=(4.2 * len(panels), 3.6))
        axes = fig.subplots(1, len(panels), squeeze=False)
        for ax, (data, suffix) in zip(axes[0], panels):
            image = ax.imshow(
                data,
                vmin=0.0,
                vmax=1.0,
                cmap="viridis",
                aspect="auto",
                extent=(0.5, data.shape[1] + 0.5, data.shape[0] + 0.5, 0.5),
            )
            ax.set_xlabel(f"j ({labels[1]}, r={row.rank2})")
            ax.set_ylabel(f"i ({labels[0]}, r={row.rank1})")
            ax.set_title(f"phi(i, j){suffix}", fontsize=9)
        fig.colorbar(image, ax=list(axes[0]), shrink=0.85)
        fig.suptitle(row.module, fontsize=9)
        paths.append(_save(fig, Path(directory) / f"similarity_{_slug(row.module)}.png"))
    return paths


def plot_spectra(rows: Sequence[ModuleSpectrum], directory: PathLike) -> list[Path]:
    """``spectrum.png``: σᵢ/σ₁ (log) and the energy curve of every module's update."""
    fig = _figure(figsize=(10, 3.8))
    left, right = fig.subplots(1, 2)
    for row in rows:
        s = row.spectrum.singular_values.detach().double().cpu()
        if float(s.max()) == 0.0:
            continue
        ranks = range(1, s.numel() + 1)
        left.semilogy(ranks, (s / s[0]).clamp_min(1e-16).numpy(), lw=1, label=row.module)
        right.plot(ranks, row.spectrum.energy.detach().cpu().numpy(), lw=1)
    left.set(xlabel="i", ylabel="sigma_i / sigma_1", title="singular values")
    right.set(xlabel="rank k", ylabel="fraction of |dW|_F^2", title="energy", ylim=(0, 1.02))
    if len(rows) <= 12:
        left.legend(fontsize=6)
    path = _save(fig, Path(directory) / "spectrum.png")
    return [path]


def plot_amplification(rows: Sequence[ModuleAmplification], directory: PathLike) -> list[Path]:
    """``amplification.png``: ``‖ΔW‖_F / ‖UᵀWV‖_F`` per module (LoRA paper Table 7)."""
    fig = _figure(figsize=(max(5.0, 0.45 * len(rows) + 2), 3.8))
    ax = fig.subplots()
    names = [row.module for row in rows]
    ax.bar(range(len(rows)), [row.amplification.factor for row in rows])
    ax.set_xticks(range(len(rows)), names, rotation=75, ha="right", fontsize=6)
    ax.set_ylabel("|dW|_F / |U'WV|_F")
    ax.set_title("amplification factor")
    path = _save(fig, Path(directory) / "amplification.png")
    return [path]


def plot_budget(
    plans: Sequence[BudgetPlan], results: Sequence[Any], directory: PathLike
) -> list[Path]:
    """``budget.png``: held-out accuracy of each set of weight types (LoRA paper Table 5)."""
    fig = _figure(figsize=(max(5.0, 0.8 * len(plans) + 2), 3.6))
    ax = fig.subplots()
    names = ["{" + ",".join(p.types) + "}" + f"\nr={p.rank}" for p in plans]
    values = [100 * (getattr(r, "accuracy", None) or 0.0) for r in results]
    ax.bar(range(len(plans)), values)
    ax.set_xticks(range(len(plans)), names, fontsize=7)
    low = min(values) if values else 0.0
    ax.set_ylim(max(0.0, low - 5), min(100.0, max(values, default=100.0) + 2))
    ax.set_ylabel("held-out accuracy (%)")
    counts = sorted({p.params for p in plans}) or [0]
    if len(counts) == 1:
        ax.set_title(f"equal budget: {counts[0]} LoRA parameters per run")
    else:  # rounding down to whole ranks spends a little less on some sets
        ax.set_title(f"budget: {counts[0]}–{counts[-1]} LoRA parameters per run")
    path = _save(fig, Path(directory) / "budget.png")
    return [path]


def plot_compression(
    image: np.ndarray,
    rows: Sequence[CompressionRow],
    pictures: Mapping[tuple[str, int], np.ndarray],
    directory: PathLike,
) -> list[Path]:
    """``compress_grid.png``: the original and each method's reconstruction per rank
    (:func:`rankwise.analysis.image.approximations`' rows and pictures)."""
    ranks = sorted({r.rank for r in rows})
    methods = ["SVD", "ID", "Monarch"]
    aspect = image.shape[0] / image.shape[1]
    figure = _figure(figsize=(4 * 3.2, len(ranks) * (3.2 * aspect + 0.7) + 0.6))
    axes = figure.subplots(len(ranks), 4, squeeze=False)
    by_key = {(r.method.split(" ")[0], r.rank): r for r in rows}
    for i, k in enumerate(ranks):
        axes[i, 0].set_axis_off()
        if i == 0:
            axes[i, 0].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[i, 0].set_title(f"original {image.shape[0]}x{image.shape[1]}", fontsize=9)
        for j, method in enumerate(methods, start=1):
            row = by_key[(method, k)]
            ax = axes[i, j]
            ax.imshow(np.clip(pictures[(method, k)], 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_title(
                f"{row.method} k={k}\nerr {100 * row.error:.1f}%, {row.ratio:.1f}x smaller",
                fontsize=9,
            )
            ax.set_axis_off()
    figure.suptitle("rank-k reconstructions at (near) equal parameter counts")
    figure.tight_layout()
    path = _save(figure, Path(directory) / "compress_grid.png")
    return [path]


def plot_image_spectrum(S: np.ndarray, ranks: Sequence[int], directory: PathLike) -> list[Path]:
    """``spectrum.png``: an image's singular values (linear, log) and cumulative energy, with
    the ``ranks`` marked."""
    from rankwise.linalg import energy

    index = np.arange(1, S.size + 1)
    figure = _figure(figsize=(13, 3.8))
    linear, log, cumulative = figure.subplots(1, 3)
    linear.plot(index, S)
    linear.set(title="singular values", xlabel="i", ylabel=r"$\sigma_i$")
    log.semilogy(index, np.maximum(S, np.finfo(float).tiny))
    log.set(title="singular values (log scale)", xlabel="i", ylabel=r"$\sigma_i$")
    cumulative.plot(index, energy(S))
    cumulative.set(
        title="cumulative energy",
        xlabel="rank k",
        ylabel=r"$\sum_{i \leq k} \sigma_i^2 \,/\, \sum_i \sigma_i^2$",
    )
    for ax in (linear, log, cumulative):
        for k in ranks:
            ax.axvline(k, color="gray", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    path = _save(figure, Path(directory) / "spectrum.png")
    return [path]
