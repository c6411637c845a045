"""The automatic ridge strength of erq+ against errors computed on the activations themselves.

For each alpha, the reference fits Aqer on one half of the rows by least squares on the stacked
ridge system and measures the other half's output error || Xq_test A^T - Y_test ||^2 directly.
"""
import torch

from erq_core.ridge import ALPHAS, choose_aqer_alpha, held_out_gains
from erq_core.stats import FoldedStats
from tests.test_closed_forms import activations, layer, ones_column, ridge_lstsq

IMAGES, TOKENS = 40, 30


def folded(x, xq, y) -> FoldedStats:
    """Statistics of rows grouped as (images, tokens, features), alternate images in each half."""
    stats = FoldedStats(x.shape[1], y.shape[1])
    shape = (IMAGES, TOKENS, -1)
    stats.add_batch(x.reshape(shape), xq.reshape(shape), y.reshape(shape))
    return stats


def direct_held_out_error(weight, x, xq, y, train_images, test_images, lam) -> float:
    def rows(images):
        return (images[:, None] * TOKENS + torch.arange(TOKENS)).reshape(-1)

    train, test = rows(train_images), rows(test_images)
    xqa = ones_column(xq.double())
    delta = ridge_lstsq(xqa[train], y[train].double() - xqa[train] @ weight.T, lam)
    return float((xqa[test] @ (weight + delta.T).T - y[test].double()).pow(2).sum())


def test_held_out_gains_equal_the_errors_of_explicit_solves_on_the_activations():
    x, xq = activations()
    w, b = layer(8)
    y = x @ w.T + b
    weight = torch.cat([w, b[:, None]], dim=1).double()
    stats = folded(x, xq, y)
    even, odd = torch.arange(0, IMAGES, 2), torch.arange(1, IMAGES, 2)
    alphas = (1e-3, 0.1, 10.0)
    gains = held_out_gains(weight, stats.folds[0], stats.folds[1], True, alphas)
    scale = float(torch.diagonal(stats.folds[0].gram(True)).mean())
    unchanged = direct_held_out_error(weight, x, xq, y, even, odd, 1e30)  # lambda -> inf: no update
    for alpha, gain in zip(alphas, gains):
        expected = direct_held_out_error(weight, x, xq, y, even, odd, alpha * scale) - unchanged
        assert abs(float(gain) - expected) <= 1e-3 * abs(expected) + 1e-6 * unchanged, alpha


def test_the_chosen_alpha_has_the_least_held_out_error_over_both_halves():
    x, xq = activations(seed=3)
    w, b = layer(8, seed=4)
    y = x @ w.T + b
    weight = torch.cat([w, b[:, None]], dim=1).double()
    stats = folded(x, xq, y)
    even, odd = torch.arange(0, IMAGES, 2), torch.arange(1, IMAGES, 2)
    scales = [float(torch.diagonal(fold.gram(True)).mean()) for fold in stats.folds]
    totals = [direct_held_out_error(weight, x, xq, y, even, odd, alpha * scales[0])
              + direct_held_out_error(weight, x, xq, y, odd, even, alpha * scales[1]) for alpha in ALPHAS]
    assert choose_aqer_alpha(weight, stats, True) == ALPHAS[min(range(len(ALPHAS)), key=totals.__getitem__)]
