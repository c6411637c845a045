"""--rotate (erq_core/rotation.py): the rotated FP model computes what the original computes, every
rotation is orthogonal, and a rotated quantized model saves, reloads and exports like any other."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from erq_core import ConfigError, ErqConfig, load_quantized, quantize
from erq_core.cli import quantize_parser
from erq_core.rotation import (OnlineHadamard, RotationError, RotationPlan, hadamard, head_rotation,
                               residual_rotation, rotate_model)
from service.schemas import JobRequest

from tests.fixture_paths import FIXTURE_MODEL
from tests.small_models import SMALL_MODELS, images, saved_quantized, small_model

VIT_KINDS = ["vit", "vit_layerscale_qknorm_registers", "deit_distilled"]
PLANS = [RotationPlan(), RotationPlan(qk=False), RotationPlan(random_orthogonal=True),
         RotationPlan(heads=False, online=False)]


@pytest.mark.parametrize("order", [1, 2, 12, 24, 32, 64, 96, 384, 1536])
def test_hadamard_matrices_are_orthonormal_with_entries_of_one_magnitude(order):
    h = hadamard(order)
    assert h.dtype == torch.float64
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(order)), rtol=0, atol=1e-15)
    assert (h @ h.T - torch.eye(order, dtype=torch.float64)).abs().max() <= 1e-12


@pytest.mark.parametrize("order", [3, 20, 100, 48 * 3])
def test_orders_without_a_hadamard_matrix_get_none(order):
    assert hadamard(order) is None


@pytest.mark.parametrize("d, random", [(64, False), (96, False), (384, False), (384, True), (100, False)])
def test_the_residual_rotation_is_orthogonal_and_fixes_the_all_ones_vector(d, random):
    q = residual_rotation(d, seed=3, random=random)
    eye = torch.eye(d, dtype=torch.float64)
    assert (q @ q.T - eye).abs().max() <= 1e-12 and (q.T @ q - eye).abs().max() <= 1e-12
    ones = torch.ones(d, dtype=torch.float64)
    assert (q @ ones - ones).abs().max() <= 1e-12
    assert not torch.allclose(q, eye)  # it does move every other direction: spread, not identity
    assert not torch.equal(q, residual_rotation(d, seed=4, random=random))


@pytest.mark.parametrize("head_dim", [16, 32, 48, 64])
def test_head_rotations_are_orthogonal(head_dim):
    h = head_rotation(head_dim, seed=0)
    assert (h @ h.T - torch.eye(head_dim, dtype=torch.float64)).abs().max() <= 1e-12


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("plan", PLANS, ids=["default", "no-qk", "random", "residual-only"])
@pytest.mark.parametrize("kind", VIT_KINDS)
def test_the_rotated_fp_model_gives_the_original_logits(kind, plan):
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        model = small_model(kind).to(dtype)
        x = images(kind).to(dtype)
        with torch.no_grad():
            expected = model(x)
            rotate_model(model, seed=1, plan=plan)
            got = model(x)
        assert _relative_error(got, expected) <= tolerance, (dtype, _relative_error(got, expected))
    assert any(isinstance(m, OnlineHadamard) for m in model.modules()) == plan.online


def test_the_bundled_fixture_rotated_gives_its_logits_and_really_changes_weights():
    from erq_core.models import load_model

    model = load_model(ErqConfig(model=FIXTURE_MODEL, dataset="unused")).model.double()
    original = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        rotate_model(model, seed=0)
        assert _relative_error(model(x), expected) <= 1e-10
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.weight", "head.weight", "pos_embed"):
        assert not torch.allclose(model.get_parameter(name), original.get_parameter(name))
    norm = model.blocks[0].norm1
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_swin_is_refused_before_anything_changes():
    model = small_model("swin")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RotationError, match="Swin"):
        rotate_model(model, seed=0)
    config = ErqConfig(model="swin_tiny_patch4_window7_224", dataset="unused", method="erq+", calib_size=8,
                       rotate=True)
    with pytest.raises(RotationError, match="without --rotate"):
        quantize(model, [images("swin", 8, seed=2)], config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", ["vit_layerscale_qknorm_registers", "deit_distilled"])
def test_a_rotated_quantized_model_reloads_bit_for_bit(kind, tmp_path):
    from erq_core import save_quantized

    name, args = SMALL_MODELS[kind]
    source = {"spec": name, "architecture": name, "model_args": dict(args, num_classes=10), "num_classes": 10}
    config = ErqConfig(model=name, dataset="unused", method="erq+", calib_size=8, random_init=True, rotate=True)
    quantized = quantize(small_model(kind), [images(kind, 8, seed=2)], config)
    save_quantized(quantized, tmp_path, source, {"input_size": [3, args["img_size"], args["img_size"]]})
    x = images(kind, 4, seed=3)
    loaded = load_quantized(tmp_path, "cpu")
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized.model(x))
    assert sum(isinstance(m, OnlineHadamard) for m in loaded.modules()) == SMALL_MODELS[kind][1]["depth"]


@pytest.mark.parametrize("export_format", ["onnx-float64", "onnx"])
def test_a_rotated_model_exports_to_onnx_with_the_models_outputs(export_format, tmp_path):
    import onnx
    import onnxruntime as ort

    from erq_core.float64 import to_float64
    from erq_core.onnx_export import export_format as export

    kind = "vit_layerscale_qknorm_registers"
    saved_quantized(kind, tmp_path, method="erq+", rotate=True)
    path = export(tmp_path, export_format).path
    assert "MatMul" in {n.op_type for n in onnx.load(str(path)).graph.node}  # the online Hadamard
    x = images(kind, 16, seed=3)
    model = load_quantized(tmp_path, "cpu")
    with torch.no_grad():
        expected = (to_float64(model) if export_format == "onnx-float64" else model)(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    atol = 1e-6 if export_format == "onnx-float64" else 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def test_rotate_is_a_cli_flag_a_rest_field_and_a_config_json_key():
    options = vars(quantize_parser().parse_args(["--model", "m", "--dataset", "/d", "--out", "/o", "--rotate"]))
    for key in ("out", "device", "quiet"):
        options.pop(key)
    config = ErqConfig.from_dict({k: v for k, v in options.items() if v is not None})
    assert config.rotate is True
    assert ErqConfig.from_dict(config.to_dict()) == config
    body = JobRequest(model="deit_small", dataset="/data", method="erq+", rotate=True).model_dump()
    assert ErqConfig.from_dict(body).rotate is True
    assert ErqConfig(model="deit_small", dataset="/data").rotate is False
    with pytest.raises(ConfigError, match="rotate"):
        ErqConfig(model="deit_small", dataset="/data", rotate="yes").validate()


def test_erq_quantize_refuses_swin_with_rotate_before_evaluating_anything(tmp_path):
    import subprocess

    from tests.fixture_paths import FIXTURE_DATASET
    from tests.test_cli import ERQ

    result = subprocess.run([ERQ, "quantize", "--model", "swin_tiny_patch4_window7_224", "--random-init",
                             "--dataset", str(FIXTURE_DATASET), "--method", "erq+", "--rotate", "--device", "cpu",
                             "--quiet", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "Swin" in result.stderr and "without --rotate" in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("w_bits", [8, 4])
def test_a_rotated_model_runs_the_integer_formats_on_integer_kernels_with_its_logits(w_bits, tmp_path):
    """onnx-int8 (and onnx-w4 at 4 bits) of a rotated run: every linear layer on onnxruntime's
    integer / 4-bit kernels, the only float products reading a constant being the online Hadamards'
    factor matrices, and the logits those formats promise (tests/test_onnx_integer.py's bounds)."""
    from collections import Counter

    import onnx
    from onnx import numpy_helper

    from erq_core.onnx_export import export_format as export
    from erq_core.qmodules import QuantLinear
    from tests.test_onnx_integer import (FLOAT_PRODUCTS, INT8_LOGIT_BOUND, W4_LOGIT_BOUND, assert_logits_within,
                                         optimised_graph, w4_reference)

    kind = "vit_layerscale_qknorm_registers"
    saved_quantized(kind, tmp_path, method="erq+", rotate=True, w_bits=w_bits, a_bits=8)
    model = load_quantized(tmp_path, "cpu")
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    hadamards = sum(isinstance(m, OnlineHadamard) for m in model.modules())
    blocks = SMALL_MODELS[kind][1]["depth"]
    assert hadamards == blocks
    x = images(kind, 16, seed=3)
    with torch.no_grad():
        expected = model(x).numpy()
        w4_expected = w4_reference(model, x)
    formats = {"onnx-int8": ("MatMulIntegerToFloat", sum(m.weight_quantizer.groups for m in linears) + blocks,
                             expected, INT8_LOGIT_BOUND)}
    if w_bits == 4:
        formats["onnx-w4"] = ("MatMulNBits", len(linears), w4_expected, W4_LOGIT_BOUND)
    for fmt, (kernel, kernels, reference, bound) in formats.items():
        path = export(tmp_path, fmt).path
        graph = optimised_graph(path, tmp_path)
        operators = Counter(n.op_type for n in graph.node)
        assert operators[kernel] == kernels, (fmt, operators)
        constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        read = [constants[i] for n in graph.node if n.op_type in FLOAT_PRODUCTS for i in n.input if i in constants]
        assert len(read) == 2 * hadamards, fmt  # each online Hadamard: two Kronecker factors
        for factor in read:  # an orthonormal matrix of entries of one magnitude, not a layer's weight
            n = factor.shape[0]
            assert factor.shape == (n, n) and np.allclose(np.abs(factor), 1 / math.sqrt(n), atol=1e-6)
        assert_logits_within(path, x, reference, bound, tmp_path)
    assert "MatMul" in {n.op_type for n in onnx.load(str(tmp_path / "model-int8.onnx")).graph.node}
