"""Wqer: weight quantization error reduction.

Columns are quantized half of the remaining ones at a time. Each step (1) refines the rounding
of the chosen columns S to lower a proxy of the output error, (2) moves S exactly onto the
quantization grid and (3) lets the still-FP columns R absorb the error by ridge regression:
    Wa[:, R] += -(Xq_R^T Xq_R + lambda I)^-1 Xq_R^T Xq_S D^T      (all slices of H)
The bias column (never quantized) stays last, so it absorbs the final compensation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from erq_core.ridge import ridge_solve
from erq_core.quantizers import WeightQuantizer

REFINE_ROUNDS = 100


@dataclass
class Refinement:
    error: Tensor  # the refined rounding error D
    proxy_before: Tensor  # per row: d C d^T with round-to-nearest
    proxy_after: Tensor
    rounds: int


def rounding_proxy(D: Tensor, C: Tensor) -> Tensor:
    """Per row, d C d^T: the expected squared output error caused by the rounding error d."""
    return ((D @ C) * D).sum(dim=1)


def refine_rounding(D: Tensor, D_floor: Tensor, D_ceil: Tensor, C: Tensor, rounds: int = REFINE_ROUNDS) -> Refinement:
    """Flip single roundings between floor and ceil, all rows at once, while the proxy drops.

    Gradient g = 2 d C. Candidates are entries where d and g share a sign; each row takes the
    candidate with the largest |g| and sets it to whichever of its floor / ceil errors is nearer
    to d - g. A row keeps its change only if its proxy decreased. The gradient and the proxy are
    updated incrementally (one row of C per changed row), never recomputed.
    """
    D = D.clone()
    G = 2 * D @ C
    proxy = 0.5 * (G * D).sum(dim=1)
    start = proxy.clone()
    rows = torch.arange(D.shape[0], device=D.device)
    diag = torch.diagonal(C)
    done = 0
    for done in range(1, rounds + 1):
        candidates = D * G > 0  # same sign, both non-zero
        col = torch.where(candidates, G.abs(), -1.0).argmax(dim=1)
        has_candidate = candidates[rows, col]
        d, g = D[rows, col], G[rows, col]
        target = d - g
        lo, hi = D_floor[rows, col], D_ceil[rows, col]
        new = torch.where((lo - target).abs() <= (hi - target).abs(), lo, hi)
        delta = new - d
        new_proxy = proxy + delta * g + delta * delta * diag[col]
        improve = has_candidate & (delta != 0) & (new_proxy < proxy)
        if not bool(improve.any()):
            break
        r, c, dl = rows[improve], col[improve], delta[improve]
        D[r, c] = new[improve]
        G[r] += 2 * dl[:, None] * C[c]
        proxy = torch.where(improve, new_proxy, proxy)
    return Refinement(D, start, rounding_proxy(D, C), done)


def wqer_update(
    weight: Tensor,
    H: Tensor,
    quantizer: WeightQuantizer,
    lam: float,
    count: int,
    refine: bool = True,
) -> Tensor:
    """The Wqer weight: every weight column on the quantizer's grid (but a bias-less layer's
    last one), the error compensated by the columns quantized later and the bias.

    weight: (d_out, d_in [+1 bias column]) float64; H the matching Gram matrix of the quantized
    input; quantizer the layer's fixed weight quantizer over the d_in weight columns.
    """
    W = weight.clone()
    n = W.shape[1]
    start = 0
    while n - start > 1:
        half = (n - start) // 2
        wqer_step(W, H, quantizer, slice(start, start + half), slice(start + half, n), lam, count, refine)
        start += half
    return W


def wqer_step(W: Tensor, H: Tensor, quantizer: WeightQuantizer, S: slice, R: slice, lam: float, count: int,
              refine: bool = True) -> Tensor:
    """One halving step, in place on W: the columns S onto the grid (rounding refined on
    C = H[S, S] / count), the columns R compensate by ridge regression. Returns the error D."""
    D, D_floor, D_ceil = (t.to(W.dtype) for t in quantizer.rounding_errors(W, S))
    if refine:
        D = refine_rounding(D, D_floor, D_ceil, H[S, S] / count).error
    W[:, S] += D
    W[:, R] -= ridge_solve(H[R, R], H[R, S] @ D.T, lam).T
    return D
