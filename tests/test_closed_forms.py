"""Aqer, Wqer and the per-layer error report against explicit computations on the activations.

Every reference here is built from the (N, d_in) activations themselves with torch.linalg.lstsq on
the stacked ridge system, never from the Gram matrices the engine accumulates:
    argmin_M ||A M - B||^2 + lam ||M||^2  =  lstsq([A; sqrt(lam) I], [B; 0])
The activations are small multiples of powers of two, so that the float32 batch products of
LayerStats are exact and engine and reference see the same numbers (a rounding decision of Wqer
can then not flip on a last-bit difference).
"""
import pytest
import torch

from erq_core.aqer import aqer_update
from erq_core.layer import relative_output_error
from erq_core.quantizers import UniformQuantizer, WeightQuantizer
from erq_core.stats import LayerStats
from erq_core.wqer import rounding_proxy, wqer_step, wqer_update

N, D_IN, BATCH = 1200, 24, 300
A_BITS, W_BITS = 4, 3
WIDE, NARROW = 40, 8  # d_out > d_in + 1 accumulates K, d_out < d_in + 1 accumulates Xq^T Y


def ridge_lstsq(A: torch.Tensor, B: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_M ||A M - B||^2 + lam ||M||^2 by least squares on the stacked system."""
    k = A.shape[1]
    stacked_a = torch.cat([A, lam**0.5 * torch.eye(k, dtype=A.dtype)])
    stacked_b = torch.cat([B, B.new_zeros(k, B.shape[1])])
    return torch.linalg.lstsq(stacked_a, stacked_b, driver="gelsd").solution


def ones_column(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def activations(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """FP inputs X (channels of very different ranges, an offset channel, clipped outliers) and
    Xq, their 4-bit per-tensor quantization with scale 1/4 and zero point 8."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-24, 25, (N, D_IN), generator=g).float() / 8  # multiples of 1/8 in [-3, 3]
    x *= 2.0 ** torch.randint(-2, 2, (D_IN,), generator=g).float()  # channel ranges from 1/4 to 2x
    x[:, 3] += 1.5
    quantizer = UniformQuantizer(A_BITS)
    quantizer.set_per_tensor(torch.tensor(0.25), torch.tensor(8.0))
    return x, quantizer.quantize(x)


def layer(d_out: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, D_IN, generator=g), torch.randn(d_out, generator=g)


def streamed_stats(x, xq, y) -> LayerStats:
    stats = LayerStats(D_IN, y.shape[1])
    for rows in torch.split(torch.arange(N), BATCH):
        stats.add_batch(x[rows], xq[rows], y[rows])
    xqa = ones_column(xq.double())
    assert torch.equal(stats.H, xqa.T @ xqa)  # the premise: exact statistics
    return stats


def augmented(weight: torch.Tensor, bias) -> torch.Tensor:
    w = weight.double()
    return w if bias is None else torch.cat([w, bias.double()[:, None]], dim=1)


def grid_errors(quantizer: WeightQuantizer, W: torch.Tensor, columns: slice):
    """Errors of nearest, floor and ceil rounding onto the quantizer's grid, by the definition
    q = clamp(round(w / s) + z, 0, 2^b - 1), w_hat = (q - z) s, each column with its group's s, z."""
    scale = quantizer.scale[:, quantizer.column_group][:, columns].double()
    zero = quantizer.zero_point[:, quantizer.column_group][:, columns].double()
    w = W[:, columns]
    top = 2**quantizer.bits - 1
    return [(torch.clamp(rounding(w / scale) + zero, 0, top) - zero) * scale - w
            for rounding in (torch.round, torch.floor, torch.ceil)]


def weight_quantizer(weight: torch.Tensor, groups: int) -> WeightQuantizer:
    quantizer = WeightQuantizer(W_BITS, weight.shape[0], D_IN, groups)
    quantizer.calibrate(weight[:, :D_IN])
    return quantizer


@pytest.mark.parametrize("d_out", [WIDE, NARROW], ids=["widening_K", "narrowing_XqY"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_aqer_is_the_ridge_regression_of_the_fp_output_on_the_quantized_input(d_out, with_bias):
    x, xq = activations()
    weight, bias = layer(d_out)
    bias = bias if with_bias else None
    y = x @ weight.T + (0 if bias is None else bias)
    stats = streamed_stats(x, xq, y)
    assert (stats.K is not None) == (d_out == WIDE)
    Wa = augmented(weight, bias)
    xa, xqa = (ones_column(t.double()) if with_bias else t.double() for t in (x, xq))
    lam = 0.2 * float(xqa.pow(2).sum(0).mean())  # large enough to matter, small enough to leave a fit

    delta = ridge_lstsq(xqa, (xa - xqa) @ Wa.T, lam).T
    got = aqer_update(Wa, stats.gram(with_bias), stats.output_cross(Wa, with_bias), lam)

    assert torch.linalg.norm(delta) > 0.05 * torch.linalg.norm(Wa)  # a real update, not a no-op
    assert torch.linalg.norm(ridge_lstsq(xqa, (xa - xqa) @ Wa.T, 0.0).T - delta) > 0.02 * torch.linalg.norm(delta)
    assert torch.allclose(got - Wa, delta, rtol=0, atol=1e-4 * float(delta.abs().max()))


@pytest.mark.parametrize("refine", [False, True], ids=["nearest", "refined"])
@pytest.mark.parametrize("groups", [1, 2])
def test_one_wqer_step_rounds_S_and_lets_R_absorb_the_error_by_ridge_regression(refine, groups):
    x, xq = activations()
    weight, bias = layer(WIDE)
    Wa = augmented(weight, bias)
    xqa = ones_column(xq.double())
    H = xqa.T @ xqa
    quantizer = weight_quantizer(Wa, groups)
    lam = 0.05 * float(H.diagonal().mean())
    S, R = slice(0, (D_IN + 1) // 2), slice((D_IN + 1) // 2, D_IN + 1)  # the first halving step

    W = Wa.clone()
    D = wqer_step(W, H, quantizer, S, R, lam, N, refine=refine)

    nearest, floor, ceil = grid_errors(quantizer, Wa, S)
    assert torch.equal(W[:, S] - Wa[:, S], D)
    if refine:  # each entry rounds to one of its two neighbours, and the proxy on Xq_S does not rise
        assert torch.all(torch.isclose(D, floor, atol=1e-12) | torch.isclose(D, ceil, atol=1e-12))
        C = xqa[:, S].T @ xqa[:, S] / N
        assert torch.all(rounding_proxy(D, C) <= rounding_proxy(nearest, C) + 1e-9)
        assert not torch.equal(D, nearest)  # the refinement did change something here
    else:
        assert torch.allclose(D, nearest, rtol=0, atol=1e-12)
    on_grid = grid_errors(quantizer, W, S)[0]
    assert on_grid.abs().max() < 1e-9  # S now lies on the grid
    compensation = ridge_lstsq(xqa[:, R], xqa[:, S] @ D.T, lam).T
    assert torch.allclose(W[:, R], Wa[:, R] - compensation, rtol=0, atol=1e-8 * float(Wa.abs().max()))


def explicit_wqer(Wa: torch.Tensor, xqa: torch.Tensor, quantizer: WeightQuantizer, lam: float) -> torch.Tensor:
    """ERQ_ALGORITHM.md section 2 step 7 without the rounding refinement, on the activations."""
    W = Wa.clone()
    n, start = W.shape[1], 0
    while n - start > 1:
        half = (n - start) // 2
        S, R = slice(start, start + half), slice(start + half, n)
        D = grid_errors(quantizer, W, S)[0]
        W[:, S] += D
        W[:, R] -= ridge_lstsq(xqa[:, R], xqa[:, S] @ D.T, lam).T
        start += half
    return W


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_wqer_is_the_halving_loop_of_ridge_compensations(with_bias):
    x, xq = activations()
    weight, bias = layer(WIDE)
    Wa = augmented(weight, bias if with_bias else None)
    xqa = ones_column(xq.double()) if with_bias else xq.double()
    H = xqa.T @ xqa
    quantizer = weight_quantizer(Wa, 1)
    lam = 0.05 * float(H.diagonal().mean())

    got = wqer_update(Wa, H, quantizer, lam, N, refine=False)
    expected = explicit_wqer(Wa, xqa, quantizer, lam)
    assert torch.allclose(got, expected, rtol=0, atol=1e-8 * float(Wa.abs().max()))

    last_on_grid = D_IN if with_bias else D_IN - 1  # a bias-less layer leaves its last column to the quantizer
    assert grid_errors(quantizer, got, slice(0, last_on_grid))[0].abs().max() < 1e-9
    if with_bias:  # the bias column was never rounded, only compensated
        assert got.shape[1] == D_IN + 1
        assert not torch.allclose(got[:, -1], Wa[:, -1])
    else:
        assert grid_errors(quantizer, got, slice(D_IN - 1, D_IN))[0].abs().max() > 1e-3


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_wqer_with_refinement_ends_with_every_weight_column_on_the_grid_and_the_bias_free(with_bias):
    x, xq = activations()
    weight, bias = layer(WIDE)
    Wa = augmented(weight, bias if with_bias else None)
    xqa = ones_column(xq.double()) if with_bias else xq.double()
    H = xqa.T @ xqa
    quantizer = weight_quantizer(Wa, 2)
    got = wqer_update(Wa, H, quantizer, 0.05 * float(H.diagonal().mean()), N)

    last_on_grid = D_IN if with_bias else D_IN - 1
    assert grid_errors(quantizer, got, slice(0, last_on_grid))[0].abs().max() < 1e-9
    # the fixed weight quantizer maps the columns to themselves at inference
    weights = got[:, :D_IN].float()
    assert torch.allclose(quantizer(weights)[:, :last_on_grid], weights[:, :last_on_grid], rtol=0, atol=1e-6)
    if with_bias:
        assert not torch.allclose(got[:, -1], Wa[:, -1])  # it absorbed the last compensation
    # the quantized layer's output error on the activations is below round-to-nearest's
    y = xqa @ Wa.T
    rtn = Wa.clone()
    rtn[:, :D_IN] += grid_errors(quantizer, Wa, slice(0, D_IN))[0]
    assert (xqa @ got.T - y).pow(2).sum() < (xqa @ rtn.T - y).pow(2).sum()


@pytest.mark.parametrize("d_out", [WIDE, NARROW], ids=["widening_K", "narrowing_XqY"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_relative_output_error_is_the_error_of_the_quantized_input_layer_on_the_activations(d_out, with_bias):
    x, xq = activations()
    weight, bias = layer(d_out)
    bias = bias if with_bias else None
    y = (x @ weight.T + (0 if bias is None else bias)).double()
    stats = streamed_stats(x, xq, y.float())
    Wa = augmented(weight, bias)
    xqa = ones_column(xq.double()) if with_bias else xq.double()
    noise = torch.randn(Wa.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for A in (Wa, Wa + 0.01 * noise, Wa + 0.3 * noise):
        direct = float((xqa @ A.T - y).pow(2).sum() / y.pow(2).sum())
        got = relative_output_error(A, stats.gram(with_bias), stats.output_cross(Wa, with_bias), stats.output_sq)
        assert got == pytest.approx(direct, rel=1e-4)
