"""Aqer and Wqer on real activations of the fixture model, and the rounding refinement alone."""
import pytest
import torch

from erq_core.aqer import aqer_update
from erq_core.layer import augmented_weight as _augmented_weight, quantized_view as _quantized_view, relative_output_error
from erq_core.qmodules import QuantLinear
from erq_core.quantizers import WeightQuantizer
from erq_core.wqer import refine_rounding, rounding_proxy, wqer_update

from tests.layer_statistics import fixture_statistics

COE = 10000.0


@pytest.fixture(scope="module")
def fixture_layers():
    _, layers, stats = fixture_statistics()
    return layers, stats


def _linear_layers(fixture_layers):
    layers, stats = fixture_layers
    for name, layer in layers.items():
        if isinstance(layer, QuantLinear):
            yield name, layer, stats[name]


def test_aqer_lowers_each_layers_output_error_under_quantized_input(fixture_layers):
    checked = 0
    for name, layer, stats in _linear_layers(fixture_layers):
        weight = _augmented_weight(layer)
        H, cross = stats.gram(True), stats.output_cross(weight, True)
        lam = 0.1 * COE if stats.token_input else 0.1
        before = relative_output_error(weight, H, cross, stats.output_sq)
        after = relative_output_error(aqer_update(weight, H, cross, lam), H, cross, stats.output_sq)
        assert after < before, name
        checked += 1
    assert checked == 4 * 4 + 1  # qkv, proj, fc1, fc2 in each of 4 blocks, and the head


def test_wqer_output_error_is_below_round_to_nearest_of_the_same_weights(fixture_layers):
    for name, layer, stats in _linear_layers(fixture_layers):
        weight = _augmented_weight(layer)
        H, cross = stats.gram(True), stats.output_cross(weight, True)
        quantizer = WeightQuantizer(4, weight.shape[0], layer.in_features, layer.weight_quantizer.groups)
        quantizer.calibrate(weight[:, :-1])
        rtn = relative_output_error(_quantized_view(quantizer, weight), H, cross, stats.output_sq)
        refined = wqer_update(weight, H, quantizer, 0.1 * COE, stats.count)
        wqer = relative_output_error(_quantized_view(quantizer, refined), H, cross, stats.output_sq)
        assert wqer < rtn, name
        # every weight column is on the grid: the fixed quantizer maps it to itself
        assert torch.allclose(_quantized_view(quantizer, refined), refined, atol=1e-6)


def test_wqer_leaves_a_weight_already_on_the_grid_unchanged():
    torch.manual_seed(0)
    quantizer = WeightQuantizer(4, 6, 8)
    quantizer.calibrate(torch.randn(6, 8))
    on_grid = quantizer(torch.randn(6, 8)).double()
    weight = torch.cat([on_grid, torch.randn(6, 1).double()], dim=1)
    x = torch.cat([torch.randn(100, 8), torch.ones(100, 1)], dim=1).double()
    out = wqer_update(weight, x.T @ x, quantizer, 1.0, 100)
    assert torch.allclose(out, weight, atol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_rounding_refinement_never_increases_its_proxy(seed):
    generator = torch.Generator().manual_seed(seed)
    rows, cols = 32, 24
    x = torch.randn(200, cols, generator=generator, dtype=torch.float64) + 0.5
    C = x.T @ x / 200
    scale = 0.1
    w = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    floor = torch.floor(w / scale) * scale - w
    ceil = torch.ceil(w / scale) * scale - w
    nearest = torch.round(w / scale) * scale - w
    result = refine_rounding(nearest, floor, ceil, C)
    assert torch.all(result.proxy_after <= result.proxy_before + 1e-12)
    assert result.proxy_after.sum() < result.proxy_before.sum()  # it does find improvements
    assert torch.allclose(result.proxy_after, rounding_proxy(result.error, C))
    is_floor = torch.isclose(result.error, floor)
    is_ceil = torch.isclose(result.error, ceil)
    assert torch.all(is_floor | is_ceil)  # every entry still rounds to a grid point next to it
