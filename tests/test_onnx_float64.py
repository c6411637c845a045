"""The float64 ONNX export and `erq evaluate --precision float64`: onnxruntime gives the same
logits, image for image, because neither side leaves a value on a float32 rounding boundary that
the other rounds the other way.

The pieces are checked against independent computations: each activation quantizer's float32
emulation against onnxruntime's own QuantizeLinear/DequantizeLinear on values placed on rounding
boundaries, and the float64 erf against torch's."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import pytest
import torch

from erq_core import load_quantized
from erq_core.evaluate import percent
from erq_core.float64 import quantize_as_exported, to_float64
from erq_core.onnx_export import _Graph, _log_sqrt2_activation, _uniform_activation, erf_float64, export_onnx
from erq_core.quantizers import LogSqrt2Quantizer, UniformQuantizer, fake_quantize

from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_VAL_LIMIT
from tests.test_cli import ERQ
from tests.test_onnx_export import run_onnxruntime_alone, validation_images

FLOAT32_ONLY_OPERATORS = {"Conv", "Erf", "Gelu"}


def run_quantizer_in_onnxruntime(quantizer, x: np.ndarray, float_type=np.float32) -> np.ndarray:
    """The exporter's operators for one activation quantizer, run by onnxruntime on x."""
    import onnxruntime as ort
    from onnx import helper

    elem = onnx.TensorProto.FLOAT if float_type == np.float32 else onnx.TensorProto.DOUBLE
    graph = helper.make_graph([], "q", [helper.make_tensor_value_info("x", elem, None)],
                              [helper.make_tensor_value_info("y", elem, None)])
    g = _Graph(graph)
    if isinstance(quantizer, LogSqrt2Quantizer):
        _log_sqrt2_activation(g, "x", "y", "q", quantizer, float_type)
    else:
        _uniform_activation(g, "x", "y", "q", quantizer)
    graph.node.extend(g.nodes)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def boundary_values(scale: float, generator: np.random.Generator, count: int = 200_000) -> np.ndarray:
    """Values whose x / s lies within a few float32 steps of a half-integer (where the two ways
    of rounding part), and ordinary ones."""
    halves = (generator.integers(-300, 300, count) + 0.5).astype(np.float32) * np.float32(scale)
    for _ in range(3):
        step = generator.integers(-1, 2, count)
        halves = np.where(step > 0, np.nextafter(halves, np.float32(np.inf)),
                          np.where(step < 0, np.nextafter(halves, np.float32(-np.inf)), halves))
    ordinary = generator.standard_normal(count).astype(np.float32) * np.float32(40 * scale)
    return np.concatenate([halves, ordinary]).astype(np.float32)


def uniform_quantizer(bits: int, scale, zero_point) -> UniformQuantizer:
    quantizer = UniformQuantizer(bits, None if np.ndim(scale) == 0 else len(scale))
    quantizer.scale = torch.tensor(scale, dtype=torch.float32).reshape(quantizer.scale.shape)
    quantizer.zero_point = torch.tensor(zero_point, dtype=torch.float32).reshape(quantizer.zero_point.shape)
    quantizer.calibrated.fill_(True)
    quantize_as_exported(quantizer)
    return quantizer


@pytest.mark.parametrize("bits, scale, zero_point", [
    (4, 0.0371, 7.0),  # a UINT4 pair
    (8, 0.0123, 100.0),  # a UINT8 pair
    (6, 0.0517, 20.0),  # UINT8 and a Clip at the 6-bit top code
    (4, 0.0293, 6.4375),  # RepQ-ViT's fractional zero point: INT16 and a Clip to the two ends
    (4, [0.031, 0.017, 0.052, 0.009], [3.0, 8.0, 0.0, 15.0]),  # per channel, left unfolded
])
def test_the_float64_models_uniform_quantizer_is_what_onnxruntime_computes_bit_for_bit(bits, scale, zero_point):
    quantizer = uniform_quantizer(bits, scale, zero_point)
    x = boundary_values(float(np.min(scale)), np.random.default_rng(bits))
    if np.ndim(scale):
        x = x[: len(x) // len(scale) * len(scale)].reshape(-1, len(scale))
    expected = run_quantizer_in_onnxruntime(quantizer, x)
    got = quantizer.quantize(torch.from_numpy(x).double())
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got.float().numpy(), expected)
    if np.ndim(scale) == 0 and float(zero_point).is_integer():
        # torch's fused kernel multiplies by 1/s: on these inputs it rounds some values the other way
        fused = fake_quantize(torch.from_numpy(x), quantizer.scale, quantizer.zero_point, bits).numpy()
        assert (fused != expected).sum() > 0


@pytest.mark.parametrize("bits, steps", [(3, 2), (4, 2), (8, 8)])  # codes per octave: finer at 8 bits
def test_the_float64_log_sqrt2_quantizer_is_what_onnxruntime_computes(bits, steps):
    quantizer = LogSqrt2Quantizer(bits)
    quantizer.scale = torch.tensor([0.61])
    quantizer.calibrated.fill_(True)
    quantize_as_exported(quantizer)
    generator = np.random.default_rng(0)
    # log-uniform over every level and past the last, the midpoints between levels, and the ends
    spread = 0.61 * np.exp2(-generator.uniform(-0.5, 2**bits / steps + 1, 100_000))
    midpoints = 0.61 * np.exp2(-(np.arange(2**bits + 1) + 0.5) / steps)
    probabilities = np.concatenate([spread, midpoints, np.nextafter(midpoints, 0), np.nextafter(midpoints, 1),
                                    [0.0, 1.0, 1e-300]])
    expected = run_quantizer_in_onnxruntime(quantizer, probabilities, np.float64)
    np.testing.assert_array_equal(quantizer.quantize(torch.from_numpy(probabilities)).numpy(), expected)
    assert len(np.unique(expected)) == 2**bits + 1  # every level and the 0 past the last one


def test_erf_float64_is_torchs_erf_to_the_last_bit_or_two():
    t = torch.cat([torch.linspace(-8, 8, 1_000_001, dtype=torch.float64),
                   torch.randn(100_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3,
                   torch.tensor([0.0, -0.0, 1e-300, 5.999999, 6.0, -6.0, 30.0])])
    error = (erf_float64(t) - torch.special.erf(t)).abs()
    assert float(error.max()) <= 2 * 2.0**-53, float(error.max())
    assert torch.equal(erf_float64(torch.tensor([6.0, -7.5, 40.0], dtype=torch.float64)),
                       torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))


@pytest.fixture(scope="module")
def float64_run(tmp_path_factory, fixture_model_spec, fixture_dataset):
    """`erq quantize --export onnx-float64` on the fixture, from the command line."""
    out = tmp_path_factory.mktemp("float64") / "run"
    result = subprocess.run([ERQ, "quantize", "--model", fixture_model_spec, "--dataset", str(fixture_dataset),
                             "--calib-size", "32", "--val-limit", str(FIXTURE_VAL_LIMIT), "--export", "onnx-float64", "--device",
                             "cpu", "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return out, json.loads((out / "metrics.json").read_text())


@pytest.mark.integration
def test_onnxruntime_alone_gives_the_float64_evaluation_image_for_image(float64_run, tmp_path):
    folder, metrics = float64_run
    path = folder / "model-float64.onnx"
    proto = onnx.load(str(path))
    assert not {n.op_type for n in proto.graph.node} & FLOAT32_ONLY_OPERATORS
    assert [t.elem_type for t in (proto.graph.input[0].type.tensor_type, proto.graph.output[0].type.tensor_type)] \
        == [onnx.TensorProto.FLOAT] * 2
    images, labels = validation_images(folder)
    logits = run_onnxruntime_alone(path, images.numpy(), tmp_path)
    with torch.no_grad():
        expected = to_float64(load_quantized(folder, "cpu"))(images).numpy()
    assert np.abs(logits - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.array_equal(logits.argmax(1), expected.argmax(1))
    # the same image count, rounded as erq reports it (100 * 422 / 500 is 84.39999999999999 unrounded)
    top1 = percent(int((logits.argmax(1) == labels).sum()), len(labels))
    assert top1 == metrics["quantized_float64"]["top1"]
    evaluated = subprocess.run([ERQ, "evaluate", str(folder), "--dataset", str(FIXTURE_DATASET),
                                "--val-limit", str(FIXTURE_VAL_LIMIT), "--precision", "float64", "--device", "cpu"],
                               capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["top1"] == top1
    # the same packed weight codes as the float32 export, and no float copy of a weight
    export_onnx(folder, tmp_path / "model.onnx")
    float32_codes, float64_codes = ([t.raw_data for t in onnx.load(str(p)).graph.initializer
                                     if t.data_type == onnx.TensorProto.UINT4] for p in (tmp_path / "model.onnx", path))
    assert sorted(float64_codes) == sorted(float32_codes) and len(float64_codes) >= 18
    weight_sizes = {p.numel() for name, p in load_quantized(folder, "cpu").named_parameters()
                    if name.endswith(".weight") and p.dim() >= 2}
    assert not [t.name for t in proto.graph.initializer if int(np.prod(t.dims)) in weight_sizes
                and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)]


@pytest.mark.integration
def test_erq_export_writes_the_same_float64_model_the_run_wrote(float64_run):
    folder, _ = float64_run
    written = (folder / "model-float64.onnx").read_bytes()
    result = subprocess.run([ERQ, "export", str(folder), "--format", "onnx-float64"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["out"] == f"{folder}/model-float64.onnx"
    assert (folder / "model-float64.onnx").read_bytes() == written


def test_a_patch_embedding_that_overlaps_is_refused_in_float64():
    from torch import nn

    from erq_core.onnx_export import OnnxExportError, _prepare_float64
    from erq_core.qmodules import QuantConv2d

    model = nn.Sequential(QuantConv2d(nn.Conv2d(3, 8, 4, stride=2), 4))
    with pytest.raises(OnnxExportError, match="0: a float64 export needs a patch embedding with stride = kernel"):
        _prepare_float64(model)


@pytest.mark.parametrize("kind", ["vit_layerscale_qknorm_registers", "deit_distilled", "swin"])
def test_every_supported_family_exports_in_float64_with_the_float64_models_outputs(kind, tmp_path):
    import onnxruntime as ort

    from tests.small_models import images, saved_quantized

    saved_quantized(kind, tmp_path)
    export_onnx(tmp_path, tmp_path / "model.onnx", precision="float64")
    x = images(kind, 16, seed=3)
    with torch.no_grad():
        expected = to_float64(load_quantized(tmp_path, "cpu"))(x).numpy()
    got = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.integration
def test_the_report_shows_the_float64_accuracy_of_metrics_json(float64_run):
    from tests.test_report import rendered

    folder, metrics = float64_run
    page = rendered(folder / "report.html")
    for key in ("top1", "top5"):
        cell = page.metrics[f"quantized_float64.{key}"]
        assert cell["value"] == metrics["quantized_float64"][key]
        assert cell["text"].strip() == f"{metrics['quantized_float64'][key]:.2f}"
