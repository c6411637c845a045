"""Ridge regression: the solve every closed form uses (`ridge_solve`), and ridge strengths chosen on
held-out calibration statistics instead of a hand-tuned `coe` (erq+).

A strength is written lambda = alpha * mean(diag(H)), which does not change when the calibration
set grows or the activations are rescaled. For each alpha of a grid, Aqer is fitted on one half of
the calibration images and its output error measured on the other half, and the other way round;
the alpha with the least held-out error wins. One eigendecomposition per half serves every alpha
(in float32: it only has to rank the candidates; the final solve is float64).

With few calibration images per input dimension the held-out error asks for strong shrinkage (the
fit would follow those images' noise); with more images it allows more correction.
"""
from __future__ import annotations

import torch
from torch import Tensor

from erq_core.stats import FoldedStats

ALPHAS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def mean_diagonal(H: Tensor) -> float:
    return float(torch.diagonal(H).mean())


def ridge_solve(gram: Tensor, rhs: Tensor, lam: float) -> Tensor:
    """(gram + lam I)^-1 rhs through one Cholesky factorisation, for all right-hand sides."""
    regularized = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(regularized)
    if int(info) != 0:  # not numerically positive definite: fall back to a least-squares solve
        return torch.linalg.lstsq(regularized, rhs).solution
    return torch.cholesky_solve(rhs, factor)


def held_out_gains(weight: Tensor, train, test, with_bias: bool, alphas: tuple[float, ...]) -> Tensor:
    """For each alpha, how much the Aqer update fitted on `train` changes `test`'s output error.

    With H = V diag(e) V^T (train), R = V^T (C - H A^T) and the update A^T + V Z, Z = R / (e + lambda),
    the test error changes by tr(Z^T P Z) - 2 tr(Z^T c) (P = V^T H_t V, c = V^T (C_t - H_t A^T)), which
    is sum(P * M / (e+l)(e+l)^T) - 2 sum(s / (e+l)) with M = R R^T and s the row sums of R * c: after
    one pass of matrix products, each alpha costs O(d^2)."""
    w = weight.float()
    H = train.gram(with_bias).float()
    eigenvalues, vectors = torch.linalg.eigh(H)
    eigenvalues = eigenvalues.clamp(min=0)
    R = vectors.T @ (train.output_cross(weight, with_bias).float() - H @ w.T)
    test_H = test.gram(with_bias).float()
    P = vectors.T @ test_H @ vectors
    c = vectors.T @ (test.output_cross(weight, with_bias).float() - test_H @ w.T)
    M, s = R @ R.T, (R * c).sum(dim=1)
    scale = mean_diagonal(H)
    gains = []
    for alpha in alphas:
        inverse = 1.0 / (eigenvalues + alpha * scale)
        gains.append((P * M * inverse[:, None] * inverse[None, :]).sum() - 2 * (s * inverse).sum())
    return torch.stack(gains).double()


def choose_aqer_alpha(weight: Tensor, folds: FoldedStats, with_bias: bool) -> float:
    """The alpha whose Aqer solve on one half predicts the other half's FP output best."""
    first, second = folds.folds
    errors = held_out_gains(weight, first, second, with_bias, ALPHAS) + \
        held_out_gains(weight, second, first, with_bias, ALPHAS)
    return ALPHAS[int(errors.argmin())]
