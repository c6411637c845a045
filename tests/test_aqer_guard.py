"""erq+ skips Aqer on a layer when no ridge strength lowers the held-out output error: checked
against output errors computed directly from the activations, with and without the update."""
import pytest
import torch

from erq_core.erq_plus import choose_aqer
from erq_core.quantizers import fake_quantize
from erq_core.ridge import ALPHAS
from erq_core.stats import FoldedStats
from tests.test_ridge import IMAGES, TOKENS, direct_held_out_error

D_IN, D_OUT = 24, 6


def layer_data(a_bits: int, target_noise: float, seed: int):
    """Inputs quantized per tensor at a_bits; FP targets that the quantized input explains up to
    per-image noise (what upstream quantization error looks like to a layer of erq+)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(IMAGES * TOKENS, D_IN, generator=g) * torch.linspace(0.3, 2.0, D_IN)
    lo, hi = float(x.min()), float(x.max())
    scale = torch.tensor((hi - lo) / (2**a_bits - 1))
    xq = fake_quantize(x, scale, torch.round(-lo / scale), a_bits)
    w, b = torch.randn(D_OUT, D_IN, generator=g), torch.randn(D_OUT, generator=g)
    image_noise = torch.randn(IMAGES, 1, D_OUT, generator=g).expand(IMAGES, TOKENS, D_OUT).reshape(-1, D_OUT)
    y = x @ w.T + b + target_noise * image_noise * torch.randn(IMAGES * TOKENS, D_OUT, generator=g)
    stats = FoldedStats(D_IN, D_OUT)
    shape = (IMAGES, TOKENS, -1)
    stats.add_batch(x.reshape(shape), xq.reshape(shape), y.reshape(shape))
    return x, xq, y, torch.cat([w, b[:, None]], dim=1).double(), stats


@pytest.mark.parametrize("a_bits, target_noise, helps", [(4, 0.0, True), (3, 0.5, True), (8, 3.0, False)])
def test_aqer_is_kept_exactly_when_some_alpha_lowers_the_directly_computed_held_out_error(a_bits, target_noise,
                                                                                         helps):
    x, xq, y, weight, stats = layer_data(a_bits, target_noise, seed=a_bits)
    even, odd = torch.arange(0, IMAGES, 2), torch.arange(1, IMAGES, 2)
    scales = [float(torch.diagonal(fold.gram(True)).mean()) for fold in stats.folds]
    unchanged = (direct_held_out_error(weight, x, xq, y, even, odd, 1e30)
                 + direct_held_out_error(weight, x, xq, y, odd, even, 1e30))
    totals = [direct_held_out_error(weight, x, xq, y, even, odd, alpha * scales[0])
              + direct_held_out_error(weight, x, xq, y, odd, even, alpha * scales[1]) for alpha in ALPHAS]
    best = min(range(len(ALPHAS)), key=totals.__getitem__)
    alpha, kept = choose_aqer(weight, stats, True)
    assert alpha == ALPHAS[best]
    assert kept == (totals[best] < unchanged) == helps
