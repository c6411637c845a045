import math

import pytest
import torch

from erq_core.quantizers import (
    LogSqrt2Quantizer, UniformQuantizer, WeightQuantizer, fake_quantize, log_sqrt2_quantize, outlier_columns,
    percentile_bounds,
)


@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_codes_stay_in_range(bits):
    torch.manual_seed(bits)
    w = torch.randn(64, 48) * torch.logspace(-2, 1, 48)
    quantizer = WeightQuantizer(bits, 64, 48)
    quantizer.calibrate(w)
    codes = quantizer.codes(w)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert codes.max() == 2**bits - 1  # the range is used, not wasted
    assert torch.equal(quantizer.dequantize(codes), quantizer(w))


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_uniform_error_is_at_most_half_a_step_inside_the_range(bits):
    torch.manual_seed(0)
    x = torch.randn(8, 50, 32)
    quantizer = UniformQuantizer(bits)
    quantizer.calibrate(x)
    scale, zero = quantizer.scale, quantizer.zero_point
    low, high = (0 - zero) * scale, (2**bits - 1 - zero) * scale
    inside = (x >= low) & (x <= high)
    error = (quantizer.quantize(x) - x).abs()
    assert inside.float().mean() > 0.99
    assert error[inside].max() <= scale / 2 + 1e-6
    assert error[~inside].min() > 0  # clipped values are further away


def test_log_sqrt2_on_hand_computed_values():
    # scale 1, 4 bits: code q = round(-2 log2 x), value 2^(-q/2); codes >= 16 become 0
    x = torch.tensor([1.0, 0.5, 2**-0.5, 0.6, 0.3, 2**-7.5, 2**-8.0, 2**-9.0])
    expected = torch.tensor([1.0, 0.5, 2**-0.5, 2**-0.5, 2**-1.5, 2**-7.5, 0.0, 0.0])
    # 0.6: -2 log2 0.6 = 1.474 -> code 1; 0.3: 3.474 -> code 3 -> 2^-2 * sqrt2 = 2^-1.5
    assert torch.allclose(log_sqrt2_quantize(x, torch.tensor(1.0), 4), expected, atol=1e-7)
    # scale 0.5, 2 bits (codes 0..3): 0.5 -> 0.5, 0.25 -> code 2 -> 0.25, 0.1 -> code 4.6 -> 0
    got = log_sqrt2_quantize(torch.tensor([0.5, 0.25, 0.1]), torch.tensor(0.5), 2)
    assert torch.allclose(got, torch.tensor([0.5, 0.25, 0.0]))
    # the reference formula: 2^(-ceil(q/2)) (1 + (q mod 2)(sqrt2 - 1)) s
    for q in range(16):
        reference = 2 ** (-math.ceil(q / 2)) * (1 + (q % 2) * (math.sqrt(2) - 1))
        assert math.isclose(float(log_sqrt2_quantize(torch.tensor(2 ** (-q / 2)), torch.tensor(1.0), 4)),
                            reference, rel_tol=1e-6)


@pytest.mark.parametrize("bits, steps", [(2, 2), (4, 2), (6, 2), (7, 4), (8, 8)])
def test_the_post_softmax_grid_has_finer_steps_at_7_and_8_bits(bits, steps):
    # sqrt(2) steps up to 6 bits; at 7 and 8 bits steps of 2^(1/4) and 2^(1/8): the 2^b codes span 32 octaves
    x = torch.cat([torch.rand(4000), torch.exp2(-40 * torch.rand(4000))])
    scale = torch.tensor(0.9)
    codes = torch.round(-steps * torch.log2(x.double() / 0.9))
    expected = torch.where(codes >= 2**bits, 0.0, 0.9 * 2 ** (-codes.clamp(0, 2**bits - 1) / steps))
    assert torch.allclose(log_sqrt2_quantize(x, scale, bits).double(), expected, rtol=1e-5, atol=1e-30)
    quantizer = LogSqrt2Quantizer(bits)
    quantizer.enabled = True
    quantizer(torch.softmax(torch.randn(2, 3, 20, 20) * 2, dim=-1))  # calibrates (the buffered path)
    attn = torch.softmax(torch.randn(2, 3, 20, 20) * 2, dim=-1)
    assert torch.equal(quantizer(attn), log_sqrt2_quantize(attn, quantizer.scale, bits))
    lowest = float(quantizer.scale) * 2 ** (-(2**bits - 1) / steps)
    inside = (attn >= max(lowest, 0.01)) & (attn <= quantizer.scale)
    # the largest relative error on the probabilities that matter: half a step of the grid
    assert ((quantizer(attn) - attn).abs() / attn)[inside].max() <= 2 ** (0.5 / steps) - 1 + 1e-6


def test_log_sqrt2_quantizer_calibrates_on_attention_maps():
    torch.manual_seed(0)
    attn = torch.softmax(torch.randn(4, 3, 50, 50) * 2, dim=-1)
    quantizer = LogSqrt2Quantizer(4)
    quantizer.enabled = True
    out = quantizer(attn)
    assert bool(quantizer.calibrated)
    assert 0 < float(quantizer.scale) <= float(attn.max())
    assert (out - attn).pow(2).mean() < 1e-3


def test_per_channel_and_per_tensor_shapes():
    x = torch.randn(4, 10, 24)
    per_tensor, per_channel = UniformQuantizer(4), UniformQuantizer(4, 24)
    per_tensor.calibrate(x)
    per_channel.calibrate(x * torch.linspace(0.1, 10, 24))
    assert per_tensor.scale.shape == (1,) and per_tensor.zero_point.shape == (1,)
    assert per_channel.scale.shape == (24,) and per_channel.zero_point.shape == (24,)
    assert per_channel.scale[-1] > 20 * per_channel.scale[0]
    weights = WeightQuantizer(4, 40, 24, groups=2)
    weights.calibrate(torch.randn(40, 24))
    assert weights.scale.shape == (40, 2) and weights.column_group.shape == (24,)


def test_two_part_weights_isolate_outlier_columns():
    torch.manual_seed(0)
    w = torch.randn(80, 64) * 0.1
    w[:, [3, 17, 40, 41]] *= 30  # four columns with large values
    assert set(outlier_columns(w, 4).tolist()) == {3, 17, 40, 41}
    one, two = WeightQuantizer(4, 80, 64, 1), WeightQuantizer(4, 80, 64, 2)
    one.calibrate(w)
    two.calibrate(w)
    assert int(two.column_group.sum()) == 80 // 20
    assert (two(w) - w).pow(2).sum() < 0.5 * (one(w) - w).pow(2).sum()


def test_percentiles_are_exact_on_large_inputs():
    torch.manual_seed(0)
    x = torch.randn(3_000_000)
    uppers, lowers = percentile_bounds(x, (0.999, 0.99999), dim=0)
    ordered = x.sort().values
    n = x.numel()
    for i, p in enumerate((0.999, 0.99999)):
        assert float(uppers[i]) == float(ordered[round(p * (n - 1))])
        assert float(lowers[i]) == float(ordered[round((1 - p) * (n - 1))])


@pytest.mark.parametrize("zero_point", [7.0, 7.4, 6.5])
def test_per_tensor_fake_quantization_follows_the_definition_for_any_zero_point(zero_point):
    # float32 per-tensor inputs take torch's fused kernel, which only knows integer zero points
    x = torch.linspace(-3, 3, 1001)
    scale, zero, top = torch.tensor([0.37]), torch.tensor([zero_point]), 15
    expected = (torch.clamp(torch.round(x.double() / 0.37) + zero_point, 0, top) - zero_point) * 0.37
    got = fake_quantize(x, scale, zero, 4)
    off = (got.double() - expected).abs() / 0.37  # steps away; a value on a level's edge may flip
    assert off.max() < 1 + 1e-4 and (off > 1e-4).double().mean() < 0.01
