"""--act-granularity token: dynamic per-token activation ranges (issue 21).

The quantizer is checked against an explicit per-row computation, a quantized model's layers
against a hand computation, save/load and the float64 ONNX export against the model itself, and
the option through the config, the CLI and the REST body."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from erq_core import ConfigError, ErqConfig, load_quantized
from erq_core.cli import quantize_parser
from erq_core.float64 import quantize_as_exported, to_float64
from erq_core.onnx_export import _Graph, _token_activation, export_onnx
from erq_core.qmodules import QuantLinear, QuantMatMul, activation_quantizers
from erq_core.quantizers import LogSqrt2Quantizer, TokenQuantizer, UniformQuantizer, token_quantize

from tests.small_models import images, saved_quantized

pytestmark = pytest.mark.unit


def per_row_reference(x: np.ndarray, bits: int, clip: float) -> np.ndarray:
    """Each row of a 2-D float32 array quantized on its own range [min(row, 0), max(row, 0)] * clip,
    one row at a time, in float32 numpy."""
    top = np.float32(2**bits - 1)
    out = np.empty_like(x)
    for i, row in enumerate(x):
        low = np.float32(min(row.min(), np.float32(0))) * np.float32(clip)
        high = np.float32(max(row.max(), np.float32(0))) * np.float32(clip)
        scale = max(np.float32((high - low) / top), np.float32(1e-8))
        zero = np.round(-low / scale)
        codes = np.clip(np.round(row / scale) + zero, 0, top)
        out[i] = (codes - zero) * scale
    return out


def rows_with_spread(seed: int = 0, rows: int = 64, width: int = 48) -> torch.Tensor:
    """Rows whose ranges differ by orders of magnitude; some all positive, one all zero."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator) * torch.logspace(-2, 2, rows)[:, None]
    x[::7] = x[::7].abs() + 0.5
    x[5] = 0.0
    return x


@pytest.mark.parametrize("bits, clip", [(4, 1.0), (3, 0.85), (8, 0.9)])
def test_token_quantize_equals_an_explicit_per_row_computation(bits, clip):
    x = rows_with_spread(bits)
    got = token_quantize(x, bits, torch.tensor([clip]))
    np.testing.assert_array_equal(got.numpy(), per_row_reference(x.numpy(), bits, clip))
    for row in got:  # each row on its own grid: at most 2^b values
        assert len(torch.unique(row)) <= 2**bits
    # rows along dim -2 are the columns
    np.testing.assert_array_equal(token_quantize(x.T.contiguous(), bits, torch.tensor([clip]), dim=-2).T.numpy(),
                                  got.numpy())


def test_each_token_is_quantized_on_its_own_range_alone():
    x = rows_with_spread()
    scaled = x.clone()
    scaled[3] *= 1024  # a power of two: every step of that row scales exactly
    before, after = (token_quantize(t, 4, torch.ones(1)) for t in (x, scaled))
    assert torch.equal(after[3], before[3] * 1024)
    others = torch.arange(len(x)) != 3
    assert torch.equal(after[others], before[others])


def test_calibration_chooses_the_clipping_ratio_with_least_squared_error():
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))
    x[:, 0] *= 30  # an outlier channel in every token: clipping it pays at 3 bits
    quantizer = TokenQuantizer(3)
    quantizer.enabled = True
    quantizer(x)
    errors = {ratio: float((token_quantize(x, 3, torch.tensor([ratio])) - x).pow(2).sum())
              for ratio in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)}
    assert float(quantizer.clip) == float(np.float32(min(errors, key=errors.get))) != 1.0
    assert bool(quantizer.calibrated)


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    """erq+ W4/A4 with per-token activations of the small ViT, saved; and the model before saving."""
    from erq_core import quantize, save_quantized
    from tests.small_models import SMALL_MODELS, small_model

    folder = tmp_path_factory.mktemp("token")
    name, args = SMALL_MODELS["vit"]
    config = ErqConfig(model=name, dataset="unused", method="erq+", calib_size=8, random_init=True,
                       act_granularity="token")
    quantized = quantize(small_model("vit"), [images("vit", 8, seed=2)], config)
    source = {"spec": name, "architecture": name, "model_args": dict(args, num_classes=10), "num_classes": 10}
    save_quantized(quantized, folder, source, {"input_size": [3, args["img_size"], args["img_size"]]})
    return folder, quantized.model


def test_every_linear_input_q_k_and_v_are_per_token_and_the_softmax_quantizer_static(token_run):
    _, model = token_run
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(isinstance(m.input_quantizer, TokenQuantizer) and m.input_quantizer.dim == -1
                           for m in linears)
    for attention in (m for m in model.modules() if hasattr(m, "matmul_qk")):
        assert (attention.matmul_qk.a_quantizer.dim, attention.matmul_qk.b_quantizer.dim) == (-1, -2)
        assert isinstance(attention.matmul_av.a_quantizer, LogSqrt2Quantizer)
        assert isinstance(attention.matmul_av.b_quantizer, TokenQuantizer)
        assert attention.matmul_av.b_quantizer.dim == -2  # v per channel
    assert all(bool(q.calibrated) for q in activation_quantizers(model))


def test_a_quantized_layer_computes_the_hand_computation(token_run):
    _, model = token_run
    layer = model.blocks[1].mlp.fc2
    x = torch.randn(2, 17, layer.in_features, generator=torch.Generator().manual_seed(4))
    clip = float(layer.input_quantizer.clip)
    xq = torch.from_numpy(per_row_reference(x.reshape(-1, layer.in_features).numpy(), 4, clip)).reshape(x.shape)
    scale, zero = layer.weight_quantizer.column_scale()
    weight = (torch.clamp(torch.round(layer.weight / scale) + zero, 0, 15) - zero) * scale
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(xq, weight, layer.bias), rtol=0, atol=1e-5)
        # q @ k^T: q's rows and k's rows (k^T's columns) each on their own range
        q, k = torch.randn(2, 2, 17, 32), torch.randn(2, 2, 17, 32) * torch.linspace(0.1, 5, 17)[:, None]
        matmul = model.blocks[0].attn.matmul_qk
        rows = lambda t, ratio: torch.from_numpy(per_row_reference(t.reshape(-1, 32).numpy(), 4, ratio)  # noqa: E731
                                                 ).reshape(t.shape)
        expected = rows(q, float(matmul.a_quantizer.clip)) @ rows(k, float(matmul.b_quantizer.clip)).transpose(-2, -1)
        torch.testing.assert_close(matmul(q, k.transpose(-2, -1)), expected, rtol=0, atol=1e-5)


def test_a_saved_token_run_loads_bit_identical(token_run):
    folder, model = token_run
    loaded = load_quantized(folder, "cpu")
    x = images("vit", 6, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for (name, saved), (_, back) in zip(((n, m) for n, m in model.named_modules() if isinstance(m, TokenQuantizer)),
                                        ((n, m) for n, m in loaded.named_modules() if isinstance(m, TokenQuantizer)),
                                        strict=True):
        assert torch.equal(saved.clip, back.clip) and saved.dim == back.dim, name
    import json
    assert json.loads((folder / "config.json").read_text())["quantization"]["act_granularity"] == "token"


def run_token_quantizer_in_onnxruntime(quantizer: TokenQuantizer, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph([], "q", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    g = _Graph(graph)
    _token_activation(g, "x", "y", "q", quantizer)
    graph.node.extend(g.nodes)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits, clip, dim", [(4, 1.0, -1), (4, 0.85, -2), (6, 0.9, -1)])
def test_the_exported_operators_compute_the_per_token_quantizer_bit_for_bit(bits, clip, dim):
    quantizer = TokenQuantizer(bits, dim)
    quantizer.clip = torch.tensor([clip])
    x = rows_with_spread(bits, rows=4096).reshape(16, 256, 48).numpy()
    # values on rounding boundaries of their row's own grid: x / s a few float32 steps from a half
    scale = (np.maximum(x.max(axis=dim, keepdims=True), 0) - np.minimum(x.min(axis=dim, keepdims=True), 0)) \
        * np.float32(clip) / np.float32(2**bits - 1)
    scale = np.maximum(scale, np.float32(1e-8))
    halves = (np.round(x / scale - 0.5) + 0.5).astype(np.float32) * scale.astype(np.float32)
    x = np.where(np.random.default_rng(0).random(x.shape) < 0.5, x, halves).astype(np.float32)
    expected = run_token_quantizer_in_onnxruntime(quantizer, x)
    np.testing.assert_array_equal(quantizer.quantize(torch.from_numpy(x)).numpy(), expected)
    quantize_as_exported(quantizer)
    got = quantizer.quantize(torch.from_numpy(x).double())
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got.float().numpy(), expected)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_the_onnx_export_of_a_token_run_computes_the_quantized_model(token_run, tmp_path, precision):
    import onnxruntime as ort

    folder, _ = token_run
    path = tmp_path / "model.onnx"
    export_onnx(folder, path, precision=precision)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"ReduceMin", "ReduceMax", "Round", "Clip"} <= ops and not any(n.startswith("erq") for n in ops)
    x = images("vit", 16, seed=3)
    model = load_quantized(folder, "cpu")
    with torch.no_grad():
        expected = (to_float64(model) if precision == "float64" else model)(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    if precision == "float64":  # the same codes everywhere: equal to float64 rounding
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    else:  # float32 sums in another order cross 4-bit rounding boundaries (docs/accuracy.md, "How much of a
        # spread is the evaluation itself"), which moves logits by several % here: only near-ties may flip
        top_two = np.sort(expected, 1)[:, -2:]
        clear = top_two[:, 1] - top_two[:, 0] > 0.05 * np.abs(expected).max()
        assert clear.sum() >= 12 and np.array_equal(got.argmax(1)[clear], expected.argmax(1)[clear])


def test_onnx_int8_refuses_a_token_run_and_onnx_w4_takes_it(token_run, tmp_path):
    from erq_core.onnx_export import export_format
    from erq_core.onnx_integer import IntegerExportError

    folder, _ = token_run
    with pytest.raises(IntegerExportError, match="per token at run time"):
        export_onnx(folder, tmp_path / "int8.onnx", kernels="int8")
    result = export_format(folder, "onnx-w4", tmp_path / "w4.onnx")
    assert result.path.exists()
    with pytest.raises(ConfigError, match="act_granularity token"):
        ErqConfig(model="deit_small", dataset="/d", a_bits=8, method="erq+", act_granularity="token",
                  export=("onnx-int8",)).validate()


def test_the_option_round_trips_through_config_cli_and_rest_body():
    from service.schemas import JobRequest

    config = ErqConfig(model="deit_small", dataset="/d", act_granularity="token")
    assert ErqConfig.from_dict(config.to_dict()) == config
    assert ErqConfig(model="deit_small", dataset="/d").act_granularity == "tensor"
    parsed = quantize_parser().parse_args(["--model", "m", "--dataset", "/d", "--out", "/o",
                                           "--act-granularity", "token"])
    assert parsed.act_granularity == "token"
    body = JobRequest(model="deit_small", dataset="/d", act_granularity="token").model_dump()
    assert ErqConfig.from_dict(body) == config
    with pytest.raises(ValueError):
        JobRequest(model="deit_small", dataset="/d", act_granularity="channel")
    with pytest.raises(ConfigError, match="act_granularity must be one of tensor, token"):
        ErqConfig(model="deit_small", dataset="/d", act_granularity="channel").validate()
    with pytest.raises(ConfigError, match="reconstruct"):
        ErqConfig(model="deit_small", dataset="/d", method="erq+", reconstruct=True,
                  act_granularity="token").validate()


@pytest.mark.parametrize("method", ["erq", "repq", "rtn"])
def test_every_method_quantizes_with_per_token_activations(method, tmp_path):
    saved_quantized("swin" if method == "erq" else "vit", tmp_path, method=method, act_granularity="token")
    model = load_quantized(tmp_path, "cpu")
    static = [q for q in activation_quantizers(model) if not isinstance(q, TokenQuantizer)]
    # only the post-softmax quantizer stays static: log-sqrt2 after the fold, uniform for rtn
    softmax = [m.a_quantizer for m in model.modules() if isinstance(m, QuantMatMul) and m.b_quantizer.dim == -2
               and not isinstance(m.a_quantizer, TokenQuantizer)]
    assert static and static == softmax
    assert all(isinstance(q, LogSqrt2Quantizer if method != "rtn" else UniformQuantizer) for q in static)
    with torch.no_grad():
        assert torch.isfinite(model(images("swin" if method == "erq" else "vit", 2))).all()
