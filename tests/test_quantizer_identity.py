"""The fast calibration code computes, bit for bit, what the straightforward code computes.

The searches write each candidate into buffers that the candidates share and compute in place;
the references below are the plain expressions they replace (one fresh tensor per operation).
Equality is exact (torch.equal on the bits), never approximate: the quantized model must not
change by a single bit when the calibration gets faster.
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from erq_core.quantizers import (
    ACTIVATION_PERCENTILES, WEIGHT_PERCENTILES, LogSqrt2Quantizer, UniformQuantizer, WeightQuantizer,
    best_uniform_range, fake_quantize, log_sqrt2_quantize, percentile_bounds, range_to_scale, squared_error,
)


def reference_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    top = 2**bits - 1
    z = float(zero_point) if zero_point.numel() == 1 else None
    if scale.numel() == 1 and x.dtype == torch.float32 and z is not None and z.is_integer() and 0 <= z <= top:
        return torch.fake_quantize_per_tensor_affine(x, scale.float().reshape(()), zero_point.int().reshape(()), 0, top)
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, top)
    return (codes - zero_point) * scale


def reference_best_uniform_range(x: Tensor, uppers: Tensor, lowers: Tensor, bits: int, channel_dim: int):
    shape = [1, 1]
    shape[channel_dim] = -1
    best_err = best_scale = best_zero = None
    for upper, lower in zip(uppers, lowers):
        scale, zero = range_to_scale(upper, lower, bits)
        err = (reference_fake_quantize(x, scale.reshape(shape), zero.reshape(shape), bits) - x).pow(2).sum(
            dim=1 - channel_dim)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def reference_log_sqrt2_quantize(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    levels = 2**bits
    steps = {7: 4, 8: 8}.get(bits, 2)  # codes per octave: sqrt(2) steps below 7 bits (issue 18: finer at 7, 8)
    codes = torch.round(-steps * (torch.log2(x) - torch.log2(scale)))
    underflow = codes >= levels
    codes = codes.clamp(0, levels - 1)
    return (torch.exp2(-codes / steps) * scale).masked_fill_(underflow, 0.0)


def reference_log_sqrt2_scale(x: Tensor, bits: int) -> Tensor:
    flat = x.float().reshape(-1)
    uppers = reference_percentiles(flat.reshape(-1, 1), ACTIVATION_PERCENTILES)[0].reshape(-1).clamp(min=1e-8)
    errors = [(reference_log_sqrt2_quantize(flat, u, bits) - flat).pow(2).sum() for u in uppers]
    return uppers[int(torch.stack(errors).argmin())].reshape(1)


def reference_percentiles(x: Tensor, percentiles) -> tuple[Tensor, Tensor]:
    """Percentiles along dim 0 from a full sort, interpolated in float32 as percentile_bounds does."""
    ordered = x.sort(dim=0).values
    n = x.shape[0]
    uppers, lowers = [], []
    for p in percentiles:
        for position, out in ((p * (n - 1), uppers), ((1 - p) * (n - 1), lowers)):
            below = int(position // 1)
            above = min(below + 1, n - 1)
            out.append(ordered[below] + (position - below) * (ordered[above] - ordered[below]))
    return torch.stack(uppers), torch.stack(lowers)


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Equal bit for bit (torch.equal alone takes -0.0 for 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {torch.float32: torch.int32, torch.float64: torch.int64}.get(a.dtype)
    if as_int is None:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def activations(seed: int, rows: int, channels: int) -> Tensor:
    """Heavy-tailed activations with outlier channels, ties and values on rounding boundaries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, generator=g) * torch.rand(channels, generator=g).pow(3).mul(20).add(0.1)
    x[:, 0] = torch.round(x[:, 0] * 4) / 4  # many ties
    x[::5, 1] = 0.0
    x[rows // 2:, 2] = x[0, 2]  # a channel half made of one value
    x[3, 3] = 1e3  # an outlier
    return x


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_fake_quantize_into_buffers_equals_the_plain_expression(seed, bits):
    x = activations(seed, 257, 9)
    g = torch.Generator().manual_seed(seed)
    top = 2**bits - 1
    cases = [  # per tensor with an integer zero point (fused kernel), fractional, outside the codes, per channel
        (torch.tensor([0.05]), torch.tensor([float(top // 2)])),
        (torch.tensor([0.05]), torch.tensor([top / 2 + 0.3])),
        (torch.tensor([0.05]), torch.tensor([-3.0])),
        (torch.rand(1, 9, generator=g) + 0.01, torch.randint(0, top + 1, (1, 9), generator=g).float()),
    ]
    for scale, zero in cases:
        scale2d, zero2d = scale.reshape(1, -1), zero.reshape(1, -1)
        # a value exactly half a step from a level: round half to even decides, in both
        on_edge = (torch.round(x / scale2d) + 0.5) * scale2d
        for data in (x, on_edge, x.double()):
            expected = reference_fake_quantize(data, scale2d, zero2d, bits)
            assert same_bits(fake_quantize(data, scale2d, zero2d, bits), expected)
            out = torch.full_like(expected, float("nan"))
            assert same_bits(fake_quantize(data, scale2d, zero2d, bits, out), expected)


@pytest.mark.parametrize("zero_point", [0, 1, 8, 15])
def test_per_tensor_fake_quantize_equals_torchs_fused_kernel(zero_point):
    g = torch.Generator().manual_seed(zero_point)
    scale = torch.tensor(0.0371)
    x = torch.randn(2 * 65536 + 13, generator=g) * 0.4  # whole chunks and a ragged one
    inverse = torch.reciprocal(scale)
    x[:1000] = ((torch.round(x[:1000] * inverse) + 0.5) / inverse)  # on the rounding edges
    x[1000:1010] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, float("inf"), float("-inf"), float("nan"),
                                  torch.finfo(torch.float32).tiny / 4])  # zeros, subnormals, huge values, NaN
    fused = torch.fake_quantize_per_tensor_affine(x, scale, torch.tensor(zero_point, dtype=torch.int32), 0, 15)
    assert same_bits(fake_quantize(x, scale.reshape(1), torch.tensor([float(zero_point)]), 4), fused)
    transposed = x[: 300 * 7].reshape(300, 7).T  # a strided input keeps its layout, as the kernel's output does
    fused = torch.fake_quantize_per_tensor_affine(transposed, scale, torch.tensor(zero_point, dtype=torch.int32), 0, 15)
    got = fake_quantize(transposed, scale, torch.tensor(float(zero_point)), 4)
    assert same_bits(got, fused) and got.stride() == fused.stride()
    buffer = torch.empty_like(x)
    squared = (torch.fake_quantize_per_tensor_affine(x, scale, torch.tensor(zero_point, dtype=torch.int32), 0, 15)
               - x).pow(2)
    assert same_bits(squared_error(x, scale, torch.tensor(float(zero_point)), 4, buffer), squared)


def test_fake_quantize_under_autograd_keeps_the_kernels_gradient():
    x = torch.randn(50, requires_grad=True)
    scale, zero = torch.tensor([0.1]), torch.tensor([7.0])
    fake_quantize(x, scale, zero, 4).sum().backward()
    reference = x.detach().clone().requires_grad_()
    torch.fake_quantize_per_tensor_affine(reference, scale.reshape(()), torch.tensor(7, dtype=torch.int32), 0, 15).sum(
        ).backward()
    assert same_bits(x.grad, reference.grad)
    attn = torch.softmax(torch.randn(4, 9), dim=-1).requires_grad_()
    assert log_sqrt2_quantize(attn, torch.tensor(0.5), 4).requires_grad


def test_fake_quantize_keeps_the_plain_result_type_when_in_place_would_not():
    x = torch.randn(5, 4)
    scale, zero = torch.tensor([[0.1]], dtype=torch.float64), torch.tensor([[3.0]], dtype=torch.float64)
    assert same_bits(fake_quantize(x, scale, zero, 4), reference_fake_quantize(x, scale, zero, 4))
    row = torch.randn(4)
    scale, wide_zero = torch.full((4,), 0.1), torch.full((5, 4), 2.0)  # the zero point broadcasts x to more rows
    assert same_bits(fake_quantize(row, scale, wide_zero, 4), reference_fake_quantize(row, scale, wide_zero, 4))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_activation_range_search_equals_the_reference(seed, bits):
    x = activations(seed, 700, 12)
    for flat in (x.reshape(-1, 1), x):  # per tensor, per channel
        uppers, lowers = percentile_bounds(flat, ACTIVATION_PERCENTILES, dim=0)
        got = best_uniform_range(flat, uppers, lowers, bits, channel_dim=1)
        expected = reference_best_uniform_range(flat, uppers, lowers, bits, channel_dim=1)
        assert same_bits(got[0], expected[0]) and same_bits(got[1], expected[1])


@pytest.mark.parametrize("rows", [1, 2, 3, 17])
def test_range_search_on_tiny_and_constant_tensors(rows):
    for x in (torch.randn(rows, 3), torch.full((rows, 3), 0.7), torch.zeros(rows, 3)):
        for flat in (x.reshape(-1, 1), x):
            uppers, lowers = percentile_bounds(flat, ACTIVATION_PERCENTILES, dim=0)
            got = best_uniform_range(flat, uppers, lowers, 4, channel_dim=1)
            expected = reference_best_uniform_range(flat, uppers, lowers, 4, channel_dim=1)
            assert same_bits(got[0], expected[0]) and same_bits(got[1], expected[1])


@pytest.mark.parametrize("seed", range(3))
def test_weight_range_search_equals_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 80, generator=g) * torch.rand(48, 1, generator=g)
    w[:, :4] *= 25  # outlier columns
    w[5] = 0.0
    uppers, lowers = percentile_bounds(w, WEIGHT_PERCENTILES, dim=1)
    got = best_uniform_range(w, uppers, lowers, 4, channel_dim=0)
    expected = reference_best_uniform_range(w, uppers, lowers, 4, channel_dim=0)
    assert same_bits(got[0], expected[0]) and same_bits(got[1], expected[1])
    one_group = WeightQuantizer(4, 48, 80)
    one_group.calibrate(w)
    scale, zero = one_group.scale[:, one_group.column_group], one_group.zero_point[:, one_group.column_group]
    assert same_bits(one_group(w), reference_fake_quantize(w, scale, zero, 4))
    quantizer = WeightQuantizer(4, 48, 80, groups=2)
    quantizer.calibrate(w)
    for group in range(2):
        cols = (quantizer.column_group == group).nonzero().squeeze(1)
        u, lo = percentile_bounds(w[:, cols], WEIGHT_PERCENTILES, dim=1)
        scale, zero = reference_best_uniform_range(w[:, cols], u, lo, 4, channel_dim=0)
        assert same_bits(quantizer.scale[:, group], scale) and same_bits(quantizer.zero_point[:, group], zero)
    scale, zero = quantizer.scale[:, quantizer.column_group], quantizer.zero_point[:, quantizer.column_group]
    assert same_bits(quantizer(w), reference_fake_quantize(w, scale, zero, 4))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("bits", [2, 4, 6])
def test_uniform_quantizer_calibration_equals_the_reference(seed, bits):
    x = activations(seed, 64 * 5, 16).reshape(4, 80, 16)
    for quantizer, flat in ((UniformQuantizer(bits), x.reshape(-1, 1)), (UniformQuantizer(bits, 16), x.reshape(-1, 16))):
        quantizer.enabled = True
        got = quantizer(x)  # the first input calibrates, then is quantized (sharing one buffer)
        uppers, lowers = reference_percentiles(flat, ACTIVATION_PERCENTILES)
        scale, zero = reference_best_uniform_range(flat, uppers, lowers, bits, channel_dim=1)
        assert same_bits(quantizer.scale, scale.reshape(-1)) and same_bits(quantizer.zero_point, zero.reshape(-1))
        assert same_bits(got, reference_fake_quantize(x, quantizer.scale, quantizer.zero_point, bits))
        assert same_bits(quantizer(x), got)


def attention_maps(seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    attn = torch.softmax(torch.randn(3, 2, 40, 40, generator=g) * 4, dim=-1)
    attn[0, 0, 0] = 0.0  # log2(0) = -inf: an underflow
    attn[0, 0, 1, :8] = torch.exp2(-0.5 * torch.arange(8.0))  # exactly on the levels
    attn[0, 0, 2, :8] = torch.exp2(-0.5 * torch.arange(8.0) - 0.25)  # half way between levels (in the log)
    return attn


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_log_sqrt2_quantization_and_calibration_equal_the_reference(seed, bits):
    attn = attention_maps(seed)
    for scale in (torch.tensor(1.0), torch.tensor([0.37]), torch.tensor(2**-3.5)):
        assert same_bits(log_sqrt2_quantize(attn, scale, bits), reference_log_sqrt2_quantize(attn, scale, bits))
        flat = attn.reshape(-1)
        out, underflow = torch.empty_like(flat), torch.empty_like(flat, dtype=torch.bool)
        assert same_bits(log_sqrt2_quantize(flat, scale, bits, torch.log2(flat), out, underflow),
                         reference_log_sqrt2_quantize(flat, scale, bits))
    quantizer = LogSqrt2Quantizer(bits)
    quantizer.enabled = True
    got = quantizer(attn)  # calibrates on the first input, then quantizes it with the search's log2
    assert same_bits(quantizer.scale, reference_log_sqrt2_scale(attn, bits))
    assert same_bits(got, reference_log_sqrt2_quantize(attn, quantizer.scale, bits))
    assert same_bits(quantizer(attn), got)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1001, 100_003, 2_000_003])
def test_percentiles_equal_a_full_sort_and_torch_quantile(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    x[: n // 3] = torch.round(x[: n // 3] * 2) / 2  # ties
    percentiles = ACTIVATION_PERCENTILES + WEIGHT_PERCENTILES
    uppers, lowers = percentile_bounds(x.reshape(-1, 1), percentiles, dim=0)
    ref_uppers, ref_lowers = reference_percentiles(x.reshape(-1, 1), percentiles)
    assert same_bits(uppers, ref_uppers) and same_bits(lowers, ref_lowers)
    # the positions are torch.quantile's linear interpolation; the arithmetic is float32 (a few ulps)
    ordered = x.double().sort().values
    for i, p in enumerate(percentiles):
        for got, q in ((uppers[i], p), (lowers[i], 1 - p)):
            exact = float(torch.quantile(x.double(), q, interpolation="linear"))
            below = int(q * (n - 1) // 1)
            size = max(abs(float(ordered[below])), abs(float(ordered[min(below + 1, n - 1)])))
            assert abs(float(got) - exact) <= 4 * torch.finfo(torch.float32).eps * size


def test_per_channel_percentiles_equal_a_full_sort():
    x = activations(7, 3001, 20)
    uppers, lowers = percentile_bounds(x, ACTIVATION_PERCENTILES, dim=0)
    ref_uppers, ref_lowers = reference_percentiles(x, ACTIVATION_PERCENTILES)
    assert same_bits(uppers, ref_uppers) and same_bits(lowers, ref_lowers)
    w_uppers, w_lowers = percentile_bounds(x.T, WEIGHT_PERCENTILES, dim=1)
    ref_uppers, ref_lowers = reference_percentiles(x, WEIGHT_PERCENTILES)
    assert same_bits(w_uppers, ref_uppers) and same_bits(w_lowers, ref_lowers)
