"""The RepQ-ViT reparameterization: pairs found from the data flow, FP logits unchanged."""
from functools import partial

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


class NormThenLinear(torch.nn.Module):
    """A LayerNorm feeding one linear layer, over tokens whose channels differ widely after the norm."""

    def __init__(self, norm: torch.nn.Module, bias: bool = True, d: int = 16, d_out: int = 12):
        super().__init__()
        self.norm, self.fc = norm, torch.nn.Linear(d, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def norm_then_linear(norm: torch.nn.Module, bias: bool = True, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = NormThenLinear(norm, bias).eval()
    with torch.no_grad():
        if model.norm.weight is not None:
            model.norm.weight.copy_(torch.logspace(-1, 1, 16))  # per-channel ranges over two decades
        if model.norm.bias is not None:
            model.norm.bias.uniform_(-1, 1)
    return model.to(dtype)


def calibrated(model: torch.nn.Module, x: torch.Tensor) -> dict[str, str]:
    """Convert, calibrate the activation quantizers (per channel after the norm); returns the pairs."""
    pairs = find_norm_linear_pairs(model, x[:1])
    assert pairs == {"fc": "norm"}
    convert_model(model, 4, 4, set(pairs), set(pairs), log_sqrt2_softmax=True)
    model.to(next(model.parameters()))  # the quantizers' buffers follow the model's dtype and device
    set_quant_state(model, activations=True, weights=False)
    model(x)
    return pairs


def tokens(dtype=torch.float32, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 20, 16, generator=g) * torch.linspace(0.5, 3, 16) + torch.linspace(-2, 2, 16)
    return x.to(dtype=dtype, device=device)


NORMS = {
    "weight_and_bias": lambda: torch.nn.LayerNorm(16),
    "weight_no_bias": lambda: torch.nn.LayerNorm(16, bias=False),
    "no_affine": lambda: torch.nn.LayerNorm(16, elementwise_affine=False),
}


@pytest.mark.parametrize("linear_bias", [True, False], ids=["linear_bias", "linear_no_bias"])
@pytest.mark.parametrize("norm_kind", list(NORMS))
def test_fold_matches_the_formulas_computed_from_the_channel_scales(norm_kind, linear_bias):
    model = norm_then_linear(NORMS[norm_kind](), linear_bias)
    x = tokens()
    with torch.no_grad():
        fp = model(x)
        pairs = calibrated(model, x)
        quantizer = model.fc.input_quantizer
        s, z = quantizer.scale.double().clone(), quantizer.zero_point.double().clone()
        assert quantizer.per_channel and s.max() > 3 * s.min()
        norm = model.norm
        gamma = torch.ones(16, dtype=torch.float64) if norm.weight is None else norm.weight.double().clone()
        ln_bias = torch.zeros(16, dtype=torch.float64) if norm.bias is None else norm.bias.double().clone()
        W = model.fc.weight.double().clone()
        b = torch.zeros(12, dtype=torch.float64) if model.fc.bias is None else model.fc.bias.double().clone()

        reparameterize(model, pairs)

        scale, zp = quantizer.scale.double(), quantizer.zero_point.double()
        assert scale.shape == zp.shape == (1,)
        assert torch.allclose(scale, s.mean(), rtol=1e-6)  # per-tensor scale: mean(s)
        assert abs(float(zp) - float(z.mean())) <= 0.5  # per-tensor zero point: mean(z), rounded or not
        r = s / s.mean()
        m = -z * s  # each channel's minimum
        t = -zp * s.mean()  # the per-tensor minimum, from whatever zero point the quantizer keeps
        beta = m / r - t

        def close(got, expected):
            return torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))

        assert close(norm.weight, gamma / r)
        assert close(norm.bias, ln_bias / r - beta)
        assert close(model.fc.weight, W * r[None, :])
        assert close(model.fc.bias, b + (W * r[None, :]) @ beta)
        set_quant_state(model, activations=False, weights=False)
        assert torch.allclose(model(x), fp, rtol=1e-5, atol=1e-4)  # in full precision nothing changed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm_kind", list(NORMS))
def test_folded_per_tensor_quantizer_keeps_each_channels_own_step(norm_kind, dtype):
    """Mapped back through the fold, the per-tensor quantization of the folded activation is a
    uniform quantizer of each channel with that channel's step s_c and range:
        x_hat_c = s_c (clamp(round(x_c / s_c + z_c - Z) + Z, 0, 2^b - 1) - z_c)
    With an integer per-tensor zero point Z this is exactly the per-channel quantizer calibrated
    before the fold. In float64 this holds to the last bit; in float32 (the fused per-tensor
    kernel) a value on the edge between two levels may land on the other one."""
    model = norm_then_linear(NORMS[norm_kind](), dtype=dtype)
    x = tokens(dtype)
    captured = []
    with torch.no_grad():
        pairs = calibrated(model, x)
        model.fc.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
        set_quant_state(model, activations=False, weights=False)
        model(x)
        original = captured[-1]
        quantizer = model.fc.input_quantizer
        s, z = quantizer.scale.clone(), quantizer.zero_point.clone()
        per_channel = quantizer.quantize(original)
        reparameterize(model, pairs)
        set_quant_state(model, activations=False, weights=False)
        model(x)
        folded = captured[-1]
        scale, Z = quantizer.scale, quantizer.zero_point
    r = s / scale
    beta = (-z * s) / r + Z * scale
    mapped_back = (quantizer.quantize(folded) + beta) * r
    top = 2**quantizer.bits - 1
    expected = s * (torch.clamp(torch.round(original / s + z - Z) + Z, 0, top) - z)
    assert (expected - original).abs().max() > 0.1 * s.min()  # it does quantize

    def steps_off(got):  # per entry, how many of its channel's steps away from `expected`
        return ((got - expected).abs() / s).double()

    def agrees(got):
        if dtype == torch.float64:
            return steps_off(got).max() < 1e-9
        return steps_off(got).max() < 1 + 1e-3 and (steps_off(got) > 1e-3).double().mean() < 0.005

    assert agrees(mapped_back)
    if float(Z) == round(float(Z)):
        assert agrees(per_channel)


@pytest.mark.parametrize("kind, norm_kind", [("vit", "weight_no_bias"), ("vit", "no_affine"), ("swin", "weight_no_bias")])
def test_reparameterization_keeps_fp_logits_of_layernorms_without_bias_or_affine(kind, norm_kind):
    # (timm's Swin blocks cannot be built without a LayerNorm weight)
    norm_layer = {"weight_no_bias": partial(torch.nn.LayerNorm, eps=1e-6, bias=False),
                  "no_affine": partial(torch.nn.LayerNorm, eps=1e-6, elementwise_affine=False)}[norm_kind]
    model = small_model(kind, norm_layer=norm_layer)
    x = images(kind)
    with torch.no_grad():
        before = model(x)
        pairs = find_norm_linear_pairs(model, x[:1])
        assert pairs
        convert_model(model, 4, 4, set(pairs), set(pairs), log_sqrt2_softmax=True)
        set_quant_state(model, activations=True, weights=False)
        model(x)
        reparameterize(model, pairs)
        set_quant_state(model, activations=False, weights=False)
        after = model(x)
    assert (after - before).norm() / before.norm() < 1e-4


def test_created_parameters_follow_the_models_dtype_and_device():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = norm_then_linear(NORMS["no_affine"](), bias=False, dtype=torch.float64).to(device)
    x = tokens(torch.float64, device)
    with torch.no_grad():
        fp = model(x)
        pairs = calibrated(model, x)
        reparameterize(model, pairs)
        set_quant_state(model, activations=False, weights=False)
        assert torch.allclose(model(x), fp, rtol=1e-9, atol=1e-9)
    reference = model.fc.weight
    quantizer = model.fc.input_quantizer
    for tensor in (model.norm.weight, model.norm.bias, model.fc.bias, quantizer.scale, quantizer.zero_point):
        assert tensor is not None
        assert (tensor.dtype, tensor.device) == (reference.dtype, reference.device)
