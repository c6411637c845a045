"""Balancing the attention outputs (erq_core.balance): the FP model's function is unchanged, each
proj input channel's range becomes its old range divided by the channel's scale, and erq+ applies it
exactly where it is meant to (4-bit activations, no rotation), once for a --max-drop run's two models."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from erq_core import ErqConfig, quantize
from erq_core.balance import BALANCE_ALPHA, BALANCED_FLAG, balance_attention_outputs, balanceable
from tests.small_models import blocks, images, small_model

FAMILIES = ["vit", "vit_layerscale_qknorm_registers", "deit_distilled", "swin"]


def proj_input_ranges(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    seen = {}
    hooks = [module.proj.register_forward_pre_hook(
        lambda _m, inputs, name=name: seen.__setitem__(name, (inputs[0].flatten(0, -2).amin(0),
                                                               inputs[0].flatten(0, -2).amax(0))))
        for name, module in model.named_modules() if balanceable(module)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("kind", FAMILIES)
def test_balancing_keeps_the_fp_function_and_evens_the_channel_ranges(kind):
    model, x = small_model(kind), images(kind, 8, seed=2)
    with torch.no_grad():
        before = model(x)
    ranges = proj_input_ranges(model, x)
    assert len(ranges) == blocks(kind)
    balanced = balance_attention_outputs(model, x)
    assert balanced == sorted(ranges) and getattr(model, BALANCED_FLAG)
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    for name, (low, high) in proj_input_ranges(model, x).items():
        width = ranges[name][1] - ranges[name][0]
        scale = (width / width.median()) ** BALANCE_ALPHA  # computed here from the ranges themselves
        torch.testing.assert_close(high - low, width / scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(high + low, torch.zeros_like(high), rtol=0, atol=1e-4 * float(width.max()))


def test_in_float64_the_function_is_the_same_to_1e_10():
    model, x = small_model("deit_distilled").double(), images("deit_distilled", 8, seed=2).double()
    with torch.no_grad():
        before = model(x)
        balance_attention_outputs(model, x)
        after = model(x)
    assert (after - before).abs().max() <= 1e-10 * before.abs().max()


def erq_plus(**fields) -> ErqConfig:
    return ErqConfig(model="vit_tiny_patch16_224", dataset="unused", method="erq+", calib_size=8,
                     random_init=True, **fields)


@pytest.mark.parametrize("fields, expected", [
    ({"w_bits": 4, "a_bits": 4}, True),
    ({"w_bits": 4, "a_bits": 3}, True),
    ({"w_bits": 4, "a_bits": 8}, False),
    ({"w_bits": 6, "a_bits": 6}, False),
    ({"w_bits": 4, "a_bits": 4, "rotate": True}, False),
    ({"w_bits": 4, "a_bits": 4, "method": "erq"}, False),
])
def test_erq_plus_balances_at_4_bit_activations_only(fields, expected):
    model = small_model("vit")
    config = dataclasses.replace(erq_plus(), **fields)
    quantize(model, [images("vit", 8, seed=2)], config)
    assert getattr(model, BALANCED_FLAG, False) is expected
