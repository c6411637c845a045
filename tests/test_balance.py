"""Balancing the attention outputs and the queries and keys (erq_core.balance): the FP model's function
is unchanged, each channel's range becomes what the fold says, computed here from the ranges measured
before it, and erq+ applies each exactly where it is meant to, once for a --max-drop run's two models."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from erq_core import ErqConfig, quantize
from erq_core.balance import (BALANCE_ALPHA, BALANCED_FLAG, QK_ALPHA, QK_BALANCED_FLAG, balance_attention_outputs,
                              balance_queries_and_keys, balanceable)
from tests.small_models import blocks, images, small_model

FAMILIES = ["vit", "vit_layerscale_qknorm_registers", "deit_distilled", "swin"]


def channel_ranges(model: torch.nn.Module, x: torch.Tensor, layer: str, on_input: bool
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per attention: each channel's (low, high) of its `layer`'s input or output."""
    seen = {}

    def record(name):
        def hook(_module, inputs, output=None):
            y = (inputs[0] if on_input else output).flatten(0, -2)
            seen[name] = (y.amin(0), y.amax(0))
        return hook

    layers = {name: getattr(module, layer) for name, module in model.named_modules()
              if isinstance(getattr(module, layer, None), torch.nn.Linear)}
    hooks = [module.register_forward_pre_hook(record(name)) if on_input else module.register_forward_hook(record(name))
             for name, module in layers.items()]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


def proj_input_ranges(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: r for name, r in channel_ranges(model, x, "proj", on_input=True).items()
            if balanceable(model.get_submodule(name))}


def fold_keeping_the_function(model: torch.nn.Module, x: torch.Tensor, fold, tolerance: float = 1e-5) -> list[str]:
    """Apply `fold` and assert the model's logits on x moved by at most tolerance (relative to their largest)."""
    with torch.no_grad():
        before = model(x)
        folded = fold(model, x)
        after = model(x)
    assert (after - before).abs().max() <= tolerance * before.abs().max()
    return folded


@pytest.mark.parametrize("kind", FAMILIES)
def test_balancing_keeps_the_fp_function_and_evens_the_channel_ranges(kind):
    model, x = small_model(kind), images(kind, 8, seed=2)
    ranges = proj_input_ranges(model, x)
    assert len(ranges) == blocks(kind)
    balanced = fold_keeping_the_function(model, x, balance_attention_outputs)
    assert balanced == sorted(ranges) and getattr(model, BALANCED_FLAG)
    for name, (low, high) in proj_input_ranges(model, x).items():
        width = ranges[name][1] - ranges[name][0]
        scale = (width / width.median()) ** BALANCE_ALPHA  # computed here from the ranges themselves
        torch.testing.assert_close(high - low, width / scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(high + low, torch.zeros_like(high), rtol=0, atol=1e-4 * float(width.max()))


@pytest.mark.parametrize("fold", [balance_attention_outputs, balance_queries_and_keys])
def test_in_float64_each_fold_keeps_the_function_to_1e_10(fold):
    model, x = small_model("deit_distilled").double(), images("deit_distilled", 8, seed=2).double()
    assert fold_keeping_the_function(model, x, fold, tolerance=1e-10)


def erq_plus(**fields) -> ErqConfig:
    return ErqConfig(model="vit_tiny_patch16_224", dataset="unused", method="erq+", calib_size=8,
                     random_init=True, **fields)


def query_key_ranges(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per attention: q's and k's per-channel (low, high), read off qkv's output."""
    ranges = {}
    for name, (low, high) in channel_ranges(model, x, "qkv", on_input=False).items():
        width = low.shape[0] // 3
        ranges[name] = (low[:width], high[:width], low[width:2 * width], high[width:2 * width])
    return ranges


@pytest.mark.parametrize("kind", FAMILIES)
def test_balancing_queries_and_keys_keeps_the_fp_function_and_centres_and_evens_them(kind):
    model, x = small_model(kind), images(kind, 8, seed=2)
    ranges = query_key_ranges(model, x)
    balanced = fold_keeping_the_function(model, x, balance_queries_and_keys)
    if kind == "vit_layerscale_qknorm_registers":  # q_norm / k_norm sit between qkv and q @ k^T
        assert balanced == [] and query_key_ranges(model, x).keys() == ranges.keys()
        return
    assert len(balanced) == blocks(kind) and balanced == sorted(ranges) and getattr(model, QK_BALANCED_FLAG)
    for name, (q_low, q_high, k_low, k_high) in query_key_ranges(model, x).items():
        old_q_low, old_q_high, old_k_low, old_k_high = ranges[name]
        q_extent = torch.maximum(old_q_high, -old_q_low)
        k_extent = (old_k_high - old_k_low) / 2
        scale = (q_extent / k_extent) ** QK_ALPHA
        torch.testing.assert_close(torch.maximum(q_high, -q_low), q_extent / scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close((k_high - k_low) / 2, k_extent * scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(k_high + k_low, torch.zeros_like(k_high), rtol=0,
                                   atol=1e-4 * float((k_extent * scale).max()))


@pytest.mark.parametrize("fields, outputs, queries_keys", [
    ({"w_bits": 4, "a_bits": 4}, True, True),
    ({"w_bits": 4, "a_bits": 3}, True, True),
    ({"w_bits": 6, "a_bits": 6}, False, True),
    ({"w_bits": 4, "a_bits": 8}, False, False),
    ({"w_bits": 8, "a_bits": 8}, False, False),
    ({"w_bits": 4, "a_bits": 4, "rotate": True}, False, False),
    ({"w_bits": 4, "a_bits": 4, "method": "erq"}, False, False),
])
def test_erq_plus_balances_where_it_was_measured_to_pay(fields, outputs, queries_keys):
    model = small_model("vit")
    config = dataclasses.replace(erq_plus(), **fields)
    quantize(model, [images("vit", 8, seed=2)], config)
    assert getattr(model, BALANCED_FLAG, False) is outputs
    assert getattr(model, QK_BALANCED_FLAG, False) is queries_keys
