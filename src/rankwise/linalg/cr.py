"""CR approximation of a matrix product by column/row selection.

``X Y = Σ_i x_i y_iᵀ`` (x_i the columns of X, y_iᵀ the rows of Y) is a sum of ``n`` outer
products; keeping ``c`` of them gives ``C R ≈ X Y`` with ``C`` (m, c) and ``R`` (c, p).
Drineas, Kannan & Mahoney, "Fast Monte Carlo algorithms for matrices I" (SIAM J. Comput. 2006),
Alg. 1 and Lemma 4: sampling ``c`` indices i.i.d. with ``p_i ∝ ‖x_i‖·‖y_i‖`` and scaling each
by ``1/sqrt(c·p_i)`` is unbiased, ``E[C R] = X Y``, and minimises the expected error

    E‖X Y − C R‖_F² = (1/c) [ (Σ_i ‖x_i‖·‖y_i‖)² − ‖X Y‖_F² ].
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from rankwise.errors import ShapeMismatchError
from rankwise.linalg._random import GeneratorLike, choice, make_generator
from rankwise.linalg._validate import ArrayLike, as_matrix, check_rank, to_output


class CR(NamedTuple):
    """``C @ R ≈ X @ Y``: ``C`` (m, c) scaled columns of X, ``R`` (c, p) rows of Y, ``idx`` (c,)."""

    C: torch.Tensor
    R: torch.Tensor
    idx: torch.Tensor


def _pair(X: ArrayLike, Y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, bool]:
    x, was_numpy = as_matrix(X, "X")
    y = as_matrix(Y, "Y").tensor
    if x.shape[1] != y.shape[0]:
        raise ShapeMismatchError(
            f"Y: expected {x.shape[1]} rows to match X's {x.shape[1]} columns "
            f"(X is {tuple(x.shape)}), found shape {tuple(y.shape)}"
        )
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(device=x.device, dtype=dtype), was_numpy


def _unit_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(x / max|x|, y / max|y|, max|x|·max|y|)``: factors whose norms and products neither
    overflow nor underflow when ``X`` and ``Y`` have extreme or very different scales (1e20 and
    1e-20: their product is ordinary, the squared norms are not). A zero factor gives scale 0."""
    sx = float(x.detach().abs().max()) if x.numel() else 0.0
    sy = float(y.detach().abs().max()) if y.numel() else 0.0
    if sx == 0 or sy == 0:
        return x, y, 0.0
    return x / sx, y / sy, sx * sy


def _weights(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(w, f)`` with ``f·w_i = ‖x_i‖·‖y_i‖`` (n,), the norm of the i-th outer product
    ``x_i y_iᵀ``, formed from :func:`_unit_pair`'s factors."""
    ux, uy, factor = _unit_pair(x, y)
    if factor == 0:
        return torch.zeros(x.shape[1], dtype=x.dtype, device=x.device), 0.0
    return torch.linalg.vector_norm(ux, dim=0) * torch.linalg.vector_norm(uy, dim=1), factor


def cr_approx(
    X: ArrayLike,
    Y: ArrayLike,
    rank: int,
    *,
    method: Literal["sample", "top"] = "sample",
    generator: GeneratorLike = None,
) -> CR:
    """Approximate ``X @ Y`` by ``rank`` outer products: ``C @ R``.

    * ``"sample"``: ``rank`` indices drawn with replacement from the optimal
      ``p_i ∝ ‖X[:, i]‖·‖Y[i, :]‖``, each column/row scaled by ``1/sqrt(rank·p_i)`` — unbiased,
      with expected squared error :func:`cr_expected_error` (DKM 2006, Alg. 1);
    * ``"top"``: the ``rank`` largest products ``‖X[:, i]‖·‖Y[i, :]‖``, unscaled (biased, but
      exact when ``rank`` equals the inner dimension).

    ``1 <= rank <= n`` (the inner dimension). ``generator`` only matters for ``"sample"``.
    """
    x, y, was_numpy = _pair(X, Y)
    c = check_rank(rank, (x.shape[1],), "rank")
    gen = make_generator(generator)  # checked whatever the method (as randomized_svd does)
    weights, _ = _weights(x, y)  # up to a constant factor: only ratios matter below
    if method == "top":
        idx = torch.topk(weights, c).indices.sort().values  # (c,)
        result = CR(x[:, idx], y[idx, :], idx)
        return to_output(result, was_numpy)
    if method != "sample":
        raise ValueError(f"method: expected 'sample' or 'top', found {method!r}")
    total = weights.sum()
    # XY = 0 when every product vanishes; any distribution is then exact, take the uniform one.
    p = weights / total if total > 0 else torch.full_like(weights, 1.0 / weights.numel())
    idx = choice(p, c, generator=gen).to(x.device)  # (c,)
    scale = (c * p[idx]).rsqrt()  # (c,): 1/sqrt(c·p_i); p_i > 0 for every drawn i
    result = CR(x[:, idx] * scale, y[idx, :] * scale[:, None], idx)
    return to_output(result, was_numpy)


def cr_expected_error(X: ArrayLike, Y: ArrayLike, rank: int) -> float:
    """Expected squared error ``E‖XY − CR‖_F²`` of optimal sampling with ``rank`` draws.

    ``(1/rank)[(Σ_i ‖x_i‖·‖y_i‖)² − ‖X Y‖_F²]`` (DKM 2006, Lemma 4), in float64.
    """
    x, y, _ = _pair(X, Y)
    c = check_rank(rank, (x.shape[1],), "rank")
    ux, uy, factor = _unit_pair(
        x.detach().to(torch.float64), y.detach().to(torch.float64)
    )  # a float out
    if factor == 0:
        return 0.0
    # In units of ``factor`` = max|X|·max|Y|, scaled back by products of floats at the end:
    # inf beyond float64's range, never an OverflowError.
    w = torch.linalg.vector_norm(ux, dim=0) * torch.linalg.vector_norm(uy, dim=1)
    product = ux @ uy
    spread = float(w.sum()) ** 2
    # >= 0 exactly (Cauchy–Schwarz); rounding may cancel to -1e-14 when the answer is 0
    unit = max(spread - float(torch.linalg.matrix_norm(product).square()), 0.0) / c
    return unit * factor * factor
