"""Ridge strengths chosen on held-out calibration statistics instead of a hand-tuned `coe`.

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


def output_error(weight: Tensor, H: Tensor, output_cross: Tensor, output_sq: float) -> float:
    """||Xqa A^T - Y||^2 from the statistics (A = weight)."""
    return float(((weight @ H) * weight).sum() - 2 * (weight * output_cross.T).sum() + output_sq)


def choose_aqer_alpha(weight: Tensor, folds: FoldedStats, with_bias: bool) -> float:
    """The alpha whose Aqer solve on one half predicts the other half's FP output best."""
    errors = torch.zeros(len(ALPHAS), dtype=torch.float64)
    halves = folds.folds
    for train, test in ((halves[0], halves[1]), (halves[1], halves[0])):
        H = train.gram(with_bias)
        eigenvalues, vectors = torch.linalg.eigh(H.float())
        eigenvalues, vectors = eigenvalues.double(), vectors.double()
        rhs = vectors.T @ (train.output_cross(weight, with_bias) - H @ weight.T)
        scale = mean_diagonal(H)
        test_H, test_cross = test.gram(with_bias), test.output_cross(weight, with_bias)
        for index, alpha in enumerate(ALPHAS):
            delta_t = vectors @ (rhs / (eigenvalues.clamp(min=0) + alpha * scale)[:, None])
            errors[index] += output_error(weight + delta_t.T, test_H, test_cross, test.output_sq)
    return ALPHAS[int(errors.argmin())]
