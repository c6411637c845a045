"""The RepQ-ViT reparameterization: pairs found from the data flow, FP logits unchanged."""
import pytest
import torch

from erq_core.qmodules import QuantLinear, convert_model, set_quant_state
from erq_core.reparam import find_norm_linear_pairs, reparameterize

from tests.small_models import SMALL_MODELS, images, small_model


@pytest.mark.parametrize("kind", list(SMALL_MODELS))
def test_pairs_are_the_linear_layers_fed_by_a_layernorm(kind):
    model = small_model(kind)
    pairs = find_norm_linear_pairs(model, images(kind, 1))
    qkv = {n for n, _ in model.named_modules() if n.endswith("attn.qkv")}
    fc1 = {n for n, _ in model.named_modules() if n.endswith("mlp.fc1")}
    expected = qkv | fc1
    if kind == "swin":  # Swin's patch merging norm -> reduction is a pair too
        expected |= {n for n, _ in model.named_modules() if n.endswith("downsample.reduction")}
    assert set(pairs) == expected
    for linear, norm in pairs.items():
        block = linear.rsplit(".", 2)[0]
        assert norm.startswith(block)


@pytest.mark.parametrize("kind", list(SMALL_MODELS))
def test_reparameterization_leaves_fp_logits_unchanged(kind):
    model = small_model(kind)
    x = images(kind)
    with torch.no_grad():
        before = model(x)
        pairs = find_norm_linear_pairs(model, x[:1])
        convert_model(model, 4, 4, set(pairs), set(pairs), log_sqrt2_softmax=True)
        set_quant_state(model, activations=True, weights=False)
        model(x)  # calibrates every activation quantizer, per channel after each LayerNorm
        modules = dict(model.named_modules())
        assert all(modules[name].input_quantizer.per_channel for name in pairs)
        reparameterize(model, pairs)
        assert not any(modules[name].input_quantizer.per_channel for name in pairs)
        set_quant_state(model, activations=False, weights=False)
        after = model(x)
    relative = (after - before).pow(2).sum().sqrt() / before.pow(2).sum().sqrt()
    assert relative < 1e-4


def test_reparameterization_equalises_channel_ranges():
    model = small_model("vit")
    x = images("vit", 8)
    with torch.no_grad():
        pairs = find_norm_linear_pairs(model, x[:1])
        convert_model(model, 4, 4, set(pairs), set(pairs), log_sqrt2_softmax=True)
        set_quant_state(model, activations=True, weights=False)
        model(x)
        layer: QuantLinear = dict(model.named_modules())["blocks.0.attn.qkv"]
        spread_before = layer.input_quantizer.scale.max() / layer.input_quantizer.scale.min()
        captured = {}
        hook = layer.register_forward_pre_hook(lambda m, inp: captured.setdefault("x", inp[0]))
        reparameterize(model, pairs)
        set_quant_state(model, activations=False, weights=False)
        model(x)
        hook.remove()
    per_channel_range = captured["x"].amax(dim=(0, 1)) - captured["x"].amin(dim=(0, 1))
    assert spread_before > 1.5
    assert per_channel_range.max() / per_channel_range.min() < spread_before
