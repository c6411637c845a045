"""A saved quantized run as a standard ONNX model that onnxruntime runs without erq or torch.

    export_onnx("runs/deit_small_w4a4", "model.onnx")

How it is built: the saved model is traced by torch.onnx.export with every quantizer replaced by
a marker node; the markers are then rewritten with standard operators only:

- weights: packed UINT4 codes (2 to 4 bits) or UINT8 codes (5 to 8 bits) per output channel with
  their scale and zero point, and a DequantizeLinear (opset 21). A two-part weight (ordinary and
  outlier input columns with their own scales) is a block per part, and output channels whose
  zero point lies outside the code range a block on a wider integer type; Concat + Gather put
  the blocks back in order. No float copy of a quantized weight is left in the file.
- uniform activation quantizers: QuantizeLinear -> DequantizeLinear with the quantizer's scale and
  zero point (UINT4 for 4 bits, UINT8 otherwise). The clamp to 2^b - 1 codes that UINT8 does not
  give for b < 8 is a Clip of the dequantized value. A zero point that the reparameterization
  made fractional (RepQ-ViT's fold keeps the mean of the channels' zero points) is quantized on
  INT16 with zero point 0 and clipped to the two ends -Z s and (2^b - 1 - Z) s: exactly the
  2^b + 1 values the fake-quantized model takes.
- per-token activation quantizers (--act-granularity token): each row's range from ReduceMin and
  ReduceMax at run time, then the fake-quantization formula with Div, Round, Clip (_token_activation).
- the log-sqrt2 post-softmax quantizer: code q = clamp(round(-n (log2 x - log2 s)), 0, 2^b) with
  n = log_steps(b) codes per octave (2 up to 6 bits), and a Gather from the table 2^(-q/n) s
  (q < 2^b) plus a 0 for the codes past the last level.

The fake-quantized model and the ONNX model compute the same codes except where a value lies on
a rounding boundary to the last bit (see README: ONNX export, fidelity). With precision "float64"
(`--format onnx-float64`) every operator between quantizers runs in float64, as
`erq evaluate --precision float64` computes it (erq_core.float64): the uniform quantizers cast to
float32 around their QuantizeLinear/DequantizeLinear pair, the log-sqrt2 one computes its code in
float64, the patch embedding is a MatMul of the patches and GELU's erf a piecewise polynomial
(onnxruntime has no float64 Conv or Erf). onnxruntime then gives erq's logits image for image.
"""
from __future__ import annotations

import io
import math
import types
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch import Tensor, nn

from erq_core.errors import ErqError
from erq_core.checkpoint import read_config, write_atomic
from erq_core.config import DEFAULT_INT8_WEIGHTS, PRECISIONS
from erq_core.files import EXPORT_FILE_NAMES
from erq_core.float64 import Float64Model
from erq_core.qmodules import QuantConv2d, QuantLinear, weight_layers
from erq_core.quantizers import (_MIN_SCALE, ActivationQuantizer, LogSqrt2Quantizer, TokenQuantizer, UniformQuantizer,
                                 log_sqrt2_levels, log_steps)

if TYPE_CHECKING:
    import onnx

MIN_OPSET = 21  # INT4/UINT4 initializers and QuantizeLinear/DequantizeLinear on them
DEFAULT_OPSET = 21
TRACE_OPSET = 20  # the TorchScript exporter's last opset; the graph is converted afterwards
MARKER_DOMAIN = "erq.marker"
INPUT_NAME, OUTPUT_NAME = "images", "logits"
ONNX_FILE = EXPORT_FILE_NAMES["onnx"]  # what `erq quantize --export onnx` writes into the run folder
# each export format: the file `erq quantize --export FORMAT` writes into the run folder, its precision and
# how its linear layers are written (qdq: DequantizeLinear weights; int8 and w4: erq_core.onnx_integer)
# format -> (file, precision, kernels)
EXPORT_FILES = {name: (EXPORT_FILE_NAMES[name], precision, kernels) for name, precision, kernels in (
    ("onnx", "float32", "qdq"), ("onnx-float64", "float64", "qdq"), ("onnx-int8", "float32", "int8"),
    ("onnx-w4", "float32", "w4"))}
KERNELS = ("qdq", "int8", "w4")
# onnx-w4 quantizes a linear layer's input as erq does at this width (W4/A8: 0.5 point more top-1
# than float inputs over 3 seeds, docs/export.md); lower widths stay float (no runtime kernel, no gain)
W4_QUANTIZED_INPUT_BITS = 8


class OnnxExportError(ErqError):
    """The saved model cannot be written as ONNX (the message says why and what is supported)."""


@dataclass
class ExportResult:
    path: Path
    bytes: int
    opset: int
    weight_layers: int
    activation_quantizers: int
    weight_code_types: dict[str, int]  # weight blocks (a layer, or one part of a two-part layer) per type


# ---------------------------------------------------------------- markers traced by torch.onnx.export


class _Marker(torch.autograd.Function):
    """Identity in torch; a node erq.marker::KIND(index) in the traced graph, rewritten afterwards."""

    @staticmethod
    def forward(ctx, x: Tensor, kind: str, index: int) -> Tensor:  # noqa: ARG004
        return x.clone()

    @staticmethod
    def symbolic(g, x, kind: str, index: int):
        out = g.op(f"{MARKER_DOMAIN}::{kind}", x, index_i=index)
        out.setType(x.type())
        return out


def _mark(x: Tensor, kind: str, index: int) -> Tensor:
    return _Marker.apply(x, kind, index)


class _LinearMarker(torch.autograd.Function):
    """x -> (..., d_out) in torch (zeros: only the shape is traced); a node erq.marker::Linear(index)
    that stands for the whole quantized product Q_a(x) Q_w(W)^T, written by erq_core.onnx_integer."""

    @staticmethod
    def forward(ctx, x: Tensor, index: int, d_out: int) -> Tensor:  # noqa: ARG004
        return x.new_zeros(*x.shape[:-1], d_out)

    @staticmethod
    def symbolic(g, x, index: int, d_out: int):
        out = g.op(f"{MARKER_DOMAIN}::Linear", x, index_i=index)
        sizes = x.type().sizes() if x.type().dim() is not None else None
        out.setType(x.type().with_sizes(list(sizes[:-1]) + [d_out]) if sizes else x.type())
        return out


def _marked_activation_forward(index: int):
    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float64 and isinstance(self, (UniformQuantizer, TokenQuantizer)):  # quantized in float32
            return _mark(x.float(), "Act", index).double()
        return _mark(x, "Act", index)
    return forward


def _marked_linear_forward(index: int):
    def forward(self, x: Tensor) -> Tensor:
        # the weight is marked transposed (d_in, d_out): x @ W^T needs no Transpose at run time;
        # it stays float32 (DequantizeLinear's output) and is cast for a float64 model
        y = self.input_quantizer(x) @ _mark(self.weight.t(), "Weight", index).to(x.dtype)
        return y if self.bias is None else y + self.bias
    return forward


def _marked_integer_linear_forward(index: int):
    def forward(self, x: Tensor) -> Tensor:
        y = _LinearMarker.apply(x, index, self.out_features)
        return y if self.bias is None else y + self.bias
    return forward


def _marked_conv_forward(index: int):
    def forward(self, x: Tensor) -> Tensor:
        weight = _mark(self.weight, "Weight", index).to(x.dtype)
        if x.dtype == torch.float64:  # onnxruntime has no float64 Conv
            return _patch_matmul(self, x, weight)
        return torch.nn.functional.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)
    return forward


def _patch_matmul(conv: QuantConv2d, x: Tensor, weight: Tensor) -> Tensor:
    """The patch embedding (stride = kernel, no padding) as a matrix product of the patches."""
    (kh, kw), (_, channels, height, width) = conv.kernel_size, x.shape
    rows, cols = height // kh, width // kw
    patches = x.reshape(-1, channels, rows, kh, cols, kw).permute(0, 2, 4, 1, 3, 5)
    y = patches.reshape(-1, rows * cols, channels * kh * kw) @ weight.reshape(weight.shape[0], -1).t()
    if conv.bias is not None:
        y = y + conv.bias
    return y.reshape(-1, rows, cols, weight.shape[0]).permute(0, 3, 1, 2)


# ---------------------------------------------------------------- float64: GELU without Erf

# erf(t) for |t| < 6 as a degree-7 Taylor polynomial around the middle of each of 192 intervals of
# width 1/32 (absolute error 1.1e-16 against torch's erf; narrower intervals, fewer coefficients:
# each one is a Gather over the whole tensor); erf(t) = sign(t) from 6 on (1 - erf(6) < 2^-53).
_ERF_WIDTH, _ERF_INTERVALS, _ERF_DEGREE = 1 / 32, 192, 7


@lru_cache(maxsize=1)
def _erf_taylor_table() -> tuple[Tensor, Tensor]:
    """(centres (K,), coefficients (degree + 1, K)): erf^(n)(c) / n! = 2/sqrt(pi) (-1)^(n-1)
    H_(n-1)(c) e^(-c^2) / n! with H the physicists' Hermite polynomials."""
    centres = [_ERF_WIDTH * (k + 0.5) for k in range(_ERF_INTERVALS)]
    columns = []  # plain floats: built while tracing, tensor writes would become graph operators
    for c in centres:
        hermite = [1.0, 2 * c]
        for m in range(1, _ERF_DEGREE):
            hermite.append(2 * c * hermite[m] - 2 * m * hermite[m - 1])
        slope = 2 / math.sqrt(math.pi) * math.exp(-c * c)
        columns.append([math.erf(c)] + [slope * (-1) ** (n - 1) * hermite[n - 1] / math.factorial(n)
                                        for n in range(1, _ERF_DEGREE + 1)])
    return torch.tensor(centres, dtype=torch.float64), torch.tensor(columns, dtype=torch.float64).T.contiguous()


def erf_float64(t: Tensor) -> Tensor:
    """erf of a float64 tensor with operators onnxruntime runs in float64 (its Erf is float32 only)."""
    centres, table = _erf_taylor_table()
    flat = t.reshape(-1)  # 1-D throughout: each coefficient lookup is then a single Gather
    magnitude = flat.abs()
    interval = torch.clamp(torch.floor(magnitude / _ERF_WIDTH), max=_ERF_INTERVALS - 1).long()
    offset = magnitude - centres.index_select(0, interval)
    value = table[_ERF_DEGREE].index_select(0, interval)
    for n in range(_ERF_DEGREE - 1, -1, -1):
        value = value * offset + table[n].index_select(0, interval)
    value = torch.where(magnitude < _ERF_INTERVALS * _ERF_WIDTH, value, 1.0) * torch.sign(flat)
    return value.reshape(t.shape)


def _gelu_float64(self, x: Tensor) -> Tensor:
    if _gelu_kind(self) == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))
    return x * 0.5 * (1 + erf_float64(x * math.sqrt(0.5)))


def _gelu_kind(module: nn.Module) -> Optional[str]:
    """'none' or 'tanh' for torch's and timm's GELU modules, None for anything else."""
    if isinstance(module, nn.GELU):
        return module.approximate
    return {"GELU": "none", "GELUTanh": "tanh"}.get(type(module).__name__) if \
        type(module).__module__.startswith("timm.") else None


def _prepare_float64(model: nn.Module) -> Float64Model:
    """The model as to_float64 computes it, but with the float32 weights kept for their codes
    (the markers cast the dequantized weights) and GELU written without Erf."""
    for name, layer in weight_layers(model):
        if isinstance(layer, QuantConv2d) and (tuple(layer.stride) != tuple(layer.kernel_size)
                                               or any(layer.padding) or any(d != 1 for d in layer.dilation)):
            raise OnnxExportError(f"{name}: a float64 export needs a patch embedding with stride = kernel and "
                                  "no padding or dilation (onnxruntime has no float64 Conv)")
    weights = {layer: (layer.weight.data.clone(), layer.weight_quantizer) for _, layer in weight_layers(model)}
    model.double()
    for layer, (weight, quantizer) in weights.items():
        layer.weight.data = weight
        quantizer.float()
    for module in model.modules():
        if _gelu_kind(module) is not None:
            module.forward = types.MethodType(_gelu_float64, module)
    return Float64Model(model).eval()


def _check_supported(model: nn.Module) -> None:
    """Refuse what the rewrite would not reproduce exactly."""
    for name, module in model.named_modules():
        if isinstance(module, ActivationQuantizer) and not isinstance(
                module, (UniformQuantizer, LogSqrt2Quantizer, TokenQuantizer)):
            raise OnnxExportError(f"{name}: activation quantizer {type(module).__name__} has no ONNX form; "
                                  "supported: uniform, per-token and log-sqrt2 quantizers")
        if isinstance(module, ActivationQuantizer) and not bool(module.calibrated):
            raise OnnxExportError(f"{name}: activation quantizer is not calibrated; export a finished run")
        if isinstance(module, (QuantLinear, QuantConv2d)) and module.weight_quantizer.groups > 2:
            raise OnnxExportError(f"{name}: weights with {module.weight_quantizer.groups} column groups "
                                  "cannot be exported (one or two are supported)")
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and not isinstance(module, QuantConv2d)):
            raise OnnxExportError(f"{name}: {type(module).__name__} is not quantized; the exporter writes "
                                  "fully quantized ViT/DeiT/Swin models only")


def _install_markers(model: nn.Module, kernels: str = "qdq"
                     ) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """Swap the forwards of quantizers and weight layers for marked ones; return both lists in index order.

    kernels "int8", "w4": each linear layer is one Linear marker (its input quantizer included); "w4"
    also leaves every other activation in float (those quantizers pass their input through)."""
    activations = [(name, m) for name, m in model.named_modules() if isinstance(m, ActivationQuantizer)]
    weights = list(weight_layers(model))
    for index, (_, quantizer) in enumerate(activations):
        if kernels == "w4":
            quantizer.enabled = False
        else:
            quantizer.forward = types.MethodType(_marked_activation_forward(index), quantizer)
    linear_maker = _marked_linear_forward if kernels == "qdq" else _marked_integer_linear_forward
    for index, (_, layer) in enumerate(weights):
        maker = linear_maker if isinstance(layer, QuantLinear) else _marked_conv_forward
        layer.forward = types.MethodType(maker(index), layer)
    return activations, weights


def _trace(model: nn.Module, example: Tensor) -> "onnx.ModelProto":
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=TRACE_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          custom_opsets={MARKER_DOMAIN: 1}, do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


# ---------------------------------------------------------------- the rewrite


class _Graph:
    """Adds initializers and nodes under unique names."""

    def __init__(self, graph):
        self.graph = graph
        self.nodes: list = []
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}__{self.count}"

    def constant(self, stem: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def packed(self, stem: str, codes: np.ndarray, elem_type: int) -> str:
        """An integer initializer in raw bytes; UINT4 two codes a byte, the first in the low nibble."""
        from onnx import TensorProto

        tensor = TensorProto()
        tensor.name = self.name(stem)
        tensor.data_type = elem_type
        tensor.dims.extend(codes.shape)
        flat = codes.reshape(-1)
        if elem_type == TensorProto.UINT4:
            flat = flat.astype(np.uint8)
            if flat.size % 2:
                flat = np.append(flat, np.uint8(0))
            flat = flat[0::2] | (flat[1::2] << 4)
        tensor.raw_data = flat.astype(flat.dtype.newbyteorder("<")).tobytes()
        self.graph.initializer.append(tensor)
        return tensor.name

    def rename(self, value: str, new: str) -> str:
        """Let the node written here that produces `value` produce `new` instead."""
        producer = next(n for n in self.nodes if value in n.output)
        producer.output[list(producer.output).index(value)] = new
        return new

    def node(self, op: str, inputs: list[str], output: Optional[str] = None, stem: str = "q", **attrs) -> str:
        from onnx import helper

        output = output or self.name(f"{stem}_{op}")
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.name(f"{stem}/{op}"), **attrs))
        return output


def _f32(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _activation(g: _Graph, x: str, out: str, stem: str, quantizer: ActivationQuantizer, float_type: type) -> str:
    """The activation quantizer x -> out in standard operators; returns out."""
    if isinstance(quantizer, LogSqrt2Quantizer):
        _log_sqrt2_activation(g, x, out, stem, quantizer, float_type)
    elif isinstance(quantizer, TokenQuantizer):
        _token_activation(g, x, out, stem, quantizer)
    else:
        _uniform_activation(g, x, out, stem, quantizer)
    return out


def _uniform_activation(g: _Graph, x: str, out: str, stem: str, q: UniformQuantizer) -> None:
    from onnx import TensorProto

    top = 2**q.bits - 1
    scale = q.scale.detach().float().cpu().numpy()
    zero = q.zero_point.detach().float().cpu().numpy()
    if scale.size > 1:  # a per-channel quantizer left unfolded: the fake-quantization formula itself
        s, z = g.constant(f"{stem}.scale", scale), g.constant(f"{stem}.zero_point", zero)
        codes = g.node("Round", [g.node("Div", [x, s], stem=stem)], stem=stem)
        codes = g.node("Clip", [g.node("Add", [codes, z], stem=stem), g.constant(f"{stem}.lo", _f32(0)),
                                g.constant(f"{stem}.hi", _f32(top))], stem=stem)
        g.node("Mul", [g.node("Sub", [codes, z], stem=stem), s], out, stem=stem)
        return
    s32, z32 = np.float32(scale.item()), np.float32(zero.item())
    s = g.constant(f"{stem}.scale", _f32(s32))
    if float(z32).is_integer() and 0 <= z32 <= top:
        elem, dtype = (TensorProto.UINT4, None) if q.bits == 4 else (TensorProto.UINT8, np.uint8)
        if dtype is None:
            zp = g.packed(f"{stem}.zero_point", np.asarray(int(z32), dtype=np.uint8), elem)
        else:
            zp = g.constant(f"{stem}.zero_point", np.asarray(int(z32), dtype=dtype))
        exact = q.bits in (4, 8)  # the type saturates at the top code itself
        deq = g.node("DequantizeLinear", [g.node("QuantizeLinear", [x, s, zp], stem=stem), s, zp],
                     out if exact else None, stem=stem)
        if not exact:  # UINT8 saturates at 255: the b-bit top code is a clip of the dequantized value
            g.node("Clip", [deq, "", g.constant(f"{stem}.hi", _f32((np.float32(top) - z32) * s32))], out, stem=stem)
        return
    # fractional zero point: round(x / s) on INT16, then the two fractional ends
    zp = g.constant(f"{stem}.zero_point", np.asarray(0, dtype=np.int16))
    deq = g.node("DequantizeLinear", [g.node("QuantizeLinear", [x, s, zp], stem=stem), s, zp], stem=stem)
    lo, hi = (np.float32(0) - z32) * s32, (np.float32(top) - z32) * s32
    g.node("Clip", [deq, g.constant(f"{stem}.lo", _f32(lo)), g.constant(f"{stem}.hi", _f32(hi))], out, stem=stem)


def _token_activation(g: _Graph, x: str, out: str, stem: str, q: TokenQuantizer) -> None:
    """quantizers.token_quantize in float32, operator for operator: each row's range from ReduceMin
    and ReduceMax along q.dim (with 0, times the clipping ratio), its scale and zero point, then the
    fake-quantization formula (Div, Round, Add, Clip, Sub, Mul) with those per-row tensors."""
    def constant(tag: str, value) -> str:
        return g.constant(f"{stem}.{tag}", _f32(value))

    top = 2**q.bits - 1
    axes = g.constant(f"{stem}.axes", np.asarray([q.dim], dtype=np.int64))
    clip = constant("clip", q.clip.detach().float().cpu().numpy())
    zero_f = constant("zero", 0)
    low = g.node("Min", [g.node("ReduceMin", [x, axes], stem=stem, keepdims=1), zero_f], stem=stem)
    high = g.node("Max", [g.node("ReduceMax", [x, axes], stem=stem, keepdims=1), zero_f], stem=stem)
    low, high = g.node("Mul", [low, clip], stem=stem), g.node("Mul", [high, clip], stem=stem)
    scale = g.node("Div", [g.node("Sub", [high, low], stem=stem), constant("levels", top)], stem=stem)
    scale = g.node("Max", [scale, constant("min_scale", _MIN_SCALE)], stem=stem)
    zero = g.node("Round", [g.node("Div", [g.node("Neg", [low], stem=stem), scale], stem=stem)], stem=stem)
    codes = g.node("Round", [g.node("Div", [x, scale], stem=stem)], stem=stem)
    codes = g.node("Clip", [g.node("Add", [codes, zero], stem=stem), zero_f, constant("top", top)], stem=stem)
    g.node("Mul", [g.node("Sub", [codes, zero], stem=stem), scale], out, stem=stem)


def _log_sqrt2_activation(g: _Graph, x: str, out: str, stem: str, q: LogSqrt2Quantizer,
                          dtype: type = np.float32) -> None:
    """In float32, or in float64 as float64.log_sqrt2_quantize_float64 computes it."""
    levels = 2**q.bits
    scale = q.scale.detach().float().cpu().reshape(())

    def constant(tag: str, value) -> str:
        return g.constant(f"{stem}.{tag}", np.asarray(value, dtype=dtype))

    log2x = g.node("Div", [g.node("Log", [x], stem=stem), constant("ln2", math.log(2))], stem=stem)
    shifted = g.node("Sub", [log2x, constant("log2_scale", torch.log2(scale).item())], stem=stem)
    steps = log_steps(q.bits)
    codes = g.node("Round", [g.node("Mul", [shifted, constant(f"minus{steps}", -steps)], stem=stem)], stem=stem)
    codes = g.node("Clip", [codes, constant("lo", 0), constant("hi", levels)], stem=stem)
    index = g.node("Cast", [codes], stem=stem, to=7)  # INT64
    # the levels exactly as erq computes them (torch.exp2 * s), and 0 for the codes past the last one
    g.node("Gather", [constant("levels", log_sqrt2_levels(scale, q.bits).numpy()), index], out, stem=stem, axis=0)


# integer types for weight codes, smallest first: (ONNX type, numpy type, lowest, highest value)
_CODE_TYPES = ((21, np.uint8, 0, 15), (2, np.uint8, 0, 255), (3, np.int8, -128, 127), (5, np.int16, -32768, 32767))
_UINT4 = 21


def _code_type(bits: int, zero: np.ndarray) -> tuple[int, type]:
    """The smallest type that holds the codes 0..2^b-1 and the zero points (exactly)."""
    top = 2**bits - 1
    for elem, dtype, low, high in _CODE_TYPES:
        if top <= high and low <= zero.min() and zero.max() <= high:
            return elem, dtype
    raise OnnxExportError(f"weight zero points {zero.min()}..{zero.max()} fit no ONNX integer type")


def _stitched(g: _Graph, stem: str, tag: str, parts: list[tuple[np.ndarray, str]], axis: int,
              output: Optional[str]) -> str:
    """Blocks of a tensor (each: the indices it holds along `axis`, its value) put back in order."""
    if len(parts) == 1:
        return g.rename(parts[0][1], output) if output else parts[0][1]
    order = np.argsort(np.concatenate([indices for indices, _ in parts])).astype(np.int64)
    stacked = g.node("Concat", [value for _, value in parts], stem=stem, axis=axis)
    return g.node("Gather", [stacked, g.constant(f"{stem}.{tag}_order", order)], output, stem=stem, axis=axis)


def _weight(g: _Graph, out: str, stem: str, layer: nn.Module, transposed: bool) -> None:
    """The dequantized weight, as the layer's forward reads it: (d_in, d_out) for a linear
    (transposed), (out, in, kh, kw) for the patch convolution.

    Blocks: each column group (two-part weights: ordinary and outlier input columns), and in it the
    output channels whose zero point fits the b-bit codes and those whose zero point does not (a
    row all of one sign: its zero point lies outside 0..2^b-1), which go on the next integer type
    that holds them exactly. Each block is one DequantizeLinear; Concat + Gather restore the order.
    """
    quantizer = layer.weight_quantizer
    w2d = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    codes = quantizer.codes(w2d).cpu().numpy()  # (d_out, d_in)
    scale = quantizer.scale.detach().float().cpu().numpy()  # (d_out, groups)
    zero = quantizer.zero_point.detach().float().cpu().numpy()
    groups = quantizer.column_group.cpu().numpy()
    if not np.all(zero == np.round(zero)):
        raise OnnxExportError(f"{stem}: fractional weight zero points have no DequantizeLinear form")
    if quantizer.groups > 1 and not transposed:
        raise OnnxExportError(f"{stem}: two-part weights are supported on linear layers only")
    row_axis = 1 if transposed else 0
    narrow_top = 15 if quantizer.bits <= 4 else 255

    def block(rows: np.ndarray, columns: np.ndarray, group: int, tag: str) -> str:
        elem, dtype = _code_type(quantizer.bits, zero[rows, group])
        part = codes[np.ix_(rows, columns)]
        data = part.T if transposed else part.reshape((len(rows),) + tuple(layer.weight.shape[1:]))
        c = g.packed(f"{stem}.codes{tag}", np.ascontiguousarray(data).astype(dtype), elem)
        zp = g.packed(f"{stem}.zero_point{tag}", zero[rows, group].astype(dtype), elem)
        s = g.constant(f"{stem}.scale{tag}", scale[rows, group].astype(np.float32))
        return g.node("DequantizeLinear", [c, s, zp], stem=stem, axis=row_axis)

    column_parts = []
    for group in range(quantizer.groups):
        columns = np.flatnonzero(groups == group)
        fits = (zero[:, group] >= 0) & (zero[:, group] <= narrow_top)
        row_sets = [rows for rows in (np.flatnonzero(fits), np.flatnonzero(~fits)) if rows.size]
        row_parts = [(rows, block(rows, columns, group, f"{group}_{k}")) for k, rows in enumerate(row_sets)]
        column_parts.append((columns, _stitched(g, stem, f"rows{group}", row_parts, row_axis, None)))
    _stitched(g, stem, "columns", column_parts, 0, out)


def _rewrite(model_proto, activations, weights, float_type: type = np.float32, kernels: str = "qdq",
             int8_weights: str = DEFAULT_INT8_WEIGHTS):
    """Every marker node replaced by its standard-operator form; the float weights they read removed.
    `float_type`: what the log-sqrt2 quantizers compute in (uniform ones are always float32);
    `kernels`: how Linear markers are written (erq_core.onnx_integer)."""
    graph = model_proto.graph
    g = _Graph(graph)
    found_weight = set()
    replaced_inputs: set[str] = set()
    kept = []
    for node in graph.node:
        if node.domain != MARKER_DOMAIN:
            kept.append(node)
            continue
        index = next(a.i for a in node.attribute if a.name == "index")
        if node.op_type == "Act":
            name, quantizer = activations[index]
            _activation(g, node.input[0], node.output[0], name, quantizer, float_type)
        elif node.op_type == "Linear":
            from erq_core.onnx_integer import write_linear

            name, layer = weights[index]
            found_weight.add(index)
            x = node.input[0]
            if kernels == "w4" and layer.input_quantizer.bits == W4_QUANTIZED_INPUT_BITS:
                # erq+ solved the weights for quantized inputs: 8-bit inputs are quantized as erq does
                x = _activation(g, x, g.name(f"{name}_quantized_input"), f"{name}.input_quantizer",
                                layer.input_quantizer, float_type)
            write_linear(g, x, node.output[0], name, layer, kernels, int8_weights)
        else:
            name, layer = weights[index]
            found_weight.add(index)
            replaced_inputs.add(node.input[0])
            _weight(g, node.output[0], name, layer, transposed=isinstance(layer, QuantLinear))
        kept.extend(g.nodes)
        g.nodes = []
    unused_weight = [weights[i][0] for i in range(len(weights)) if i not in found_weight]
    if unused_weight:  # a layer the trace did not see: its weights would be missing from the file
        raise OnnxExportError(f"the traced model does not use the quantized layers {unused_weight[:3]}: "
                              "the export would differ from the quantized model")
    del graph.node[:]
    graph.node.extend(kept)
    # the float weights the markers read (transposed by constant folding) are gone with them
    still_used = {i for n in graph.node for i in n.input}
    remaining = [t for t in graph.initializer if t.name not in replaced_inputs or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(remaining)
    for entry in list(model_proto.opset_import):
        if entry.domain == MARKER_DOMAIN:
            model_proto.opset_import.remove(entry)
    return model_proto


def _set_opset(model_proto, opset: int):
    """The traced graph's opset raised to `opset` by onnx's version converter."""
    from onnx import version_converter

    plain = [e for e in model_proto.opset_import if e.domain in ("", "ai.onnx")]
    if plain and plain[0].version != opset:
        try:
            return version_converter.convert_version(model_proto, opset)
        except Exception as exc:  # the converter lacks an adapter for some operator
            raise OnnxExportError(f"cannot convert the traced graph to opset {opset}: {exc}") from None
    return model_proto


def export_format(folder: str | Path, export_format: str, out: Optional[str | Path] = None,
                  opset: int = DEFAULT_OPSET, int8_weights: str = DEFAULT_INT8_WEIGHTS) -> ExportResult:
    """Write the run in `folder` in one of EXPORT_FILES' formats (default: its file in the folder);
    `int8_weights`: onnx-int8's 8-bit weight kernel (erq_core.config.INT8_WEIGHTS)."""
    if export_format not in EXPORT_FILES:
        raise OnnxExportError(f"unknown export format {export_format!r}; one of {', '.join(EXPORT_FILES)}")
    file_name, precision, kernels = EXPORT_FILES[export_format]
    return export_onnx(folder, out or Path(folder) / file_name, opset=opset, precision=precision, kernels=kernels,
                       int8_weights=int8_weights)


def export_onnx(folder: str | Path, out: str | Path, opset: int = DEFAULT_OPSET,
                batch_size: int = 1, precision: str = "float32", kernels: str = "qdq",
                int8_weights: str = DEFAULT_INT8_WEIGHTS) -> ExportResult:
    """Write the quantized model saved in `folder` (erq quantize --out) as an ONNX file.

    precision "float64": every operator between quantizers in float64, as `erq evaluate
    --precision float64` computes it (see erq_core.float64); float32 images in, float32 logits out.
    kernels "int8" (onnx-int8) and "w4" (onnx-w4): linear layers on onnxruntime's integer and
    4-bit kernels (erq_core.onnx_integer, which says what `int8_weights` chooses)."""
    import onnx

    from erq_core.checkpoint import load_quantized

    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise OnnxExportError(f"opset must be from {MIN_OPSET} (4-bit ONNX tensors) to "
                              f"{onnx.defs.onnx_opset_version()}, got {opset}")
    if precision not in PRECISIONS:
        raise OnnxExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if kernels not in KERNELS:
        raise OnnxExportError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels != "qdq" and precision != "float32":
        raise OnnxExportError(f"the {kernels} kernels compute in float32 only")
    config = read_config(folder)
    model = load_quantized(folder, "cpu")
    _check_supported(model)
    if kernels != "qdq":
        from erq_core.onnx_integer import check_integer_export

        check_integer_export(model, kernels, int(config["quantization"]["w_bits"]))
    activations, weights = _install_markers(model, kernels)
    traced_model = _prepare_float64(model) if precision == "float64" else model
    size = config["pretrained_cfg"].get("input_size") or [3, 224, 224]
    example = torch.zeros(batch_size, *size)
    try:
        traced = _trace(traced_model, example)
    except Exception as exc:
        raise OnnxExportError(f"torch.onnx.export cannot trace {config['model_source']['architecture']}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    traced = _set_opset(traced, opset)
    float_type = np.float64 if precision == "float64" else np.float32
    proto = _rewrite(traced, activations, weights, float_type, kernels, int8_weights)
    if kernels != "qdq":
        from erq_core.onnx_integer import finish_integer_graph

        finish_integer_graph(proto)
    if precision == "float64":
        _check_float64_operators(proto)
    proto.ir_version = max(proto.ir_version, 10)  # opset 21 needs IR 10
    proto.producer_name = "erq"
    # the architecture, not the run's model spec: that can be a path on the host that ran it (a data
    # root, or a worker's cache folder of an uploaded model), which a deployed file should not carry
    proto.doc_string = (f"erq {config['quantization']['method']} W{config['quantization']['w_bits']}/"
                        f"A{config['quantization']['a_bits']} of {config['model_source']['architecture']}"
                        + (", computed in float64" if precision == "float64" else "")
                        + {"qdq": "", "int8": ", integer kernels (onnx-int8)",
                           "w4": ", 4-bit weight kernels (onnx-w4)"}[kernels])
    onnx.checker.check_model(proto)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = proto.SerializeToString()
    write_atomic(out, data)
    return ExportResult(out, len(data), opset, len(weights), len(activations), _weight_code_types(proto))


# operators onnxruntime's CPU provider runs in float32 only, which a float64 graph must not hold
_FLOAT32_ONLY = {"Conv", "Erf", "Gelu", "FastGelu", "BiasGelu"}


def _check_float64_operators(proto) -> None:
    found = sorted({n.op_type for n in proto.graph.node} & _FLOAT32_ONLY)
    if found:
        raise OnnxExportError(f"the float64 export still holds {', '.join(found)}, which onnxruntime runs in "
                              "float32 only; export this model with --format onnx")


def _weight_code_types(proto) -> dict[str, int]:
    from collections import Counter

    from onnx import TensorProto

    stored = {t.name: t.data_type for t in proto.graph.initializer}
    codes = [n.input[{"DequantizeLinear": 0, "MatMulIntegerToFloat": 1}[n.op_type]] for n in proto.graph.node
             if n.op_type in ("DequantizeLinear", "MatMulIntegerToFloat")]
    return dict(Counter(TensorProto.DataType.Name(stored[c]) for c in codes if c in stored))
