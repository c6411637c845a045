"""ONNX export: the saved fixture run as a standard ONNX model that onnxruntime runs alone and
that gives erq's accuracy and (up to rounding ties) erq's logits."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from erq_core import load_quantized
from erq_core.onnx_export import OnnxExportError, export_onnx
from erq_core.quantizers import LogSqrt2Quantizer, UniformQuantizer

from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_VAL_LIMIT
from tests.test_cli import ERQ, assert_one_line_error, erq

RUNNER = Path(__file__).parent / "onnx_runner.py"
UINT4, FLOAT = onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT


def run_onnxruntime_alone(model: Path, images: np.ndarray, work: Path) -> np.ndarray:
    """Logits from onnxruntime in an isolated process that refuses torch, timm and erq."""
    np.savez(work / "inputs.npz", images=images)
    result = subprocess.run([sys.executable, "-I", str(RUNNER), str(model), str(work / "inputs.npz"),
                             str(work / "outputs.npz")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    outputs = np.load(work / "outputs.npz")
    assert not any(m.split(".")[0] in ("torch", "erq_core", "timm") for m in outputs["modules"])
    return outputs["logits"]


def validation_images(folder: Path) -> tuple[torch.Tensor, np.ndarray]:
    """The images `erq evaluate` scores (the same val_limit subset), preprocessed as erq does."""
    from erq_core.data import build_transform, validation_loader

    config = json.loads((folder / "config.json").read_text())
    loader = validation_loader(FIXTURE_DATASET, build_transform(config["pretrained_cfg"]), 100, FIXTURE_VAL_LIMIT)
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]).numpy()


@pytest.fixture(scope="module")
def exported(erq_w4a4_run, tmp_path_factory):
    folder, metrics = erq_w4a4_run
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = export_onnx(folder, out)
    return folder, metrics, out, result


@pytest.mark.integration
def test_onnxruntime_alone_gives_erq_evaluate_accuracy_and_logits(exported, tmp_path):
    folder, metrics, path, _ = exported
    images, labels = validation_images(folder)
    logits = run_onnxruntime_alone(path, images.numpy(), tmp_path)
    top1 = 100.0 * float((logits.argmax(1) == labels).mean())
    assert len(labels) == metrics["n_val"]
    assert abs(top1 - metrics["quantized"]["top1"]) <= 0.2, (top1, metrics["quantized"])
    with torch.no_grad():
        expected = load_quantized(folder, "cpu")(images).numpy()
    per_image = np.abs(logits - expected).max(axis=1)
    # the same codes everywhere but where a value sits on a rounding boundary to the last bit:
    # nearly every image agrees to float precision, and a tie moves an image by a step or two
    assert (per_image < 1e-4).mean() >= 0.98, np.sort(per_image)[-20:]
    assert per_image.max() < 0.1 * np.abs(expected).max(), per_image.max()
    print(f"largest logit difference {per_image.max():.3g}; images above 1e-4: {(per_image >= 1e-4).sum()}"
          f"/{len(per_image)}; top-1 onnxruntime {top1:.2f} erq {metrics['quantized']['top1']:.2f}")


def test_weights_are_packed_four_bit_codes_with_no_float_copy(exported):
    folder, _, path, result = exported
    proto = onnx.load(str(path))
    model = load_quantized(folder, "cpu")
    initializers = {t.name: t for t in proto.graph.initializer}
    dequantized = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                   and n.input[0] in initializers]  # weights: codes stored in the file
    code_types = Counter(initializers[n.input[0]].data_type for n in dequantized)
    assert code_types[UINT4] >= result.weight_layers and code_types[UINT4] >= 0.9 * sum(code_types.values())
    weight_sizes = {p.numel() for name, p in model.named_parameters() if name.endswith(".weight") and p.dim() >= 2}
    floats = [t for t in proto.graph.initializer if t.data_type == FLOAT]
    assert not [t.name for t in floats if int(np.prod(t.dims)) in weight_sizes]
    packed = sum(len(initializers[n.input[0]].raw_data) for n in dequantized)
    codes = sum(int(np.prod(initializers[n.input[0]].dims)) for n in dequantized)
    assert packed <= codes // 2 + len(dequantized)  # two codes a byte
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert path.stat().st_size < fp32_bytes / 5


def test_only_standard_operators_and_a_qdq_pair_per_uniform_activation_quantizer(exported):
    folder, _, path, _ = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert [(e.domain, e.version) for e in proto.opset_import] == [("", 21)]
    model = load_quantized(folder, "cpu")
    uniform = [m for m in model.modules() if isinstance(m, UniformQuantizer)]
    log_sqrt2 = [m for m in model.modules() if isinstance(m, LogSqrt2Quantizer)]
    consumers = {i: n for n in proto.graph.node for i in n.input}
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) == len(uniform)
    for node in quantize:  # each quantize feeds a dequantize with the same scale and zero point
        pair = consumers[node.output[0]]
        assert pair.op_type == "DequantizeLinear" and list(pair.input[1:]) == list(node.input[1:])
    assert Counter(n.op_type for n in proto.graph.node)["Log"] == len(log_sqrt2) > 0


def test_the_description_names_the_architecture_and_no_path_of_the_host(exported):
    folder, _, path, _ = exported
    proto = onnx.load(str(path))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_source"]["spec"].startswith("local-dir:/")  # a path on this host
    assert proto.doc_string == f"erq erq W4/A4 of {config['model_source']['architecture']}"
    assert str(folder.parent) not in proto.doc_string and "local-dir" not in proto.doc_string


@pytest.mark.integration
def test_cli_writes_the_model_and_refuses_what_it_cannot_express(erq_w4a4_run, tmp_path):
    folder, _ = erq_w4a4_run
    result = subprocess.run([ERQ, "export", str(folder), "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["opset"] == 21 and onnx.load(str(tmp_path / "m.onnx")).graph.node
    assert_one_line_error(erq("export", str(folder), "--format", "onnx", "--opset", "17"), "opset must be from 21")
    assert_one_line_error(erq("export", str(tmp_path), "--format", "onnx"), "not a quantized model folder")


def test_a_weight_zero_point_without_integer_form_is_refused(erq_w4a4_run, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = erq_w4a4_run
    for name in ("config.json", "metrics.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    state = load_file(str(folder / "quantized.safetensors"))
    state["blocks.1.mlp.fc1.weight_quantizer.zero_point"] += 0.5
    save_file(state, str(tmp_path / "quantized.safetensors"), metadata={"format": "erq-quantized/1"})
    with pytest.raises(OnnxExportError, match="blocks.1.mlp.fc1: fractional weight zero points"):
        export_onnx(tmp_path, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("kind", ["vit_layerscale_qknorm_registers", "deit_distilled", "swin"])
def test_every_supported_family_exports_with_the_quantized_models_outputs(kind, tmp_path):
    """Two-part weights, zero points outside the 4-bit range, register/distillation tokens, Swin windows."""
    import onnxruntime as ort

    from tests.small_models import images, saved_quantized

    saved_quantized(kind, tmp_path)
    result = export_onnx(tmp_path, tmp_path / "model.onnx")
    assert result.weight_code_types["UINT4"] >= result.weight_layers
    x = images(kind, 16, seed=3)
    with torch.no_grad():
        expected = load_quantized(tmp_path, "cpu")(x).numpy()
    got = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.integration
def test_erq_quantize_export_onnx_writes_model_onnx_beside_the_checkpoint(tmp_path, fixture_model_spec,
                                                                          fixture_dataset):
    common = ["quantize", "--model", fixture_model_spec, "--dataset", str(fixture_dataset), "--calib-size", "8",
              "--no-eval", "--device", "cpu", "--quiet"]
    assert_one_line_error(erq(*common, "--export", "tflite", "--out", str(tmp_path / "bad")), "--export", "onnx")
    result = erq(*common, "--export", "onnx", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["seconds"]["export_onnx"] > 0
    assert {"model.onnx", "report.html"} <= {p.name for p in (tmp_path / "run").iterdir()}
    onnx.checker.check_model(str(tmp_path / "run" / "model.onnx"))
