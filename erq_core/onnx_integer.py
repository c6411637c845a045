"""The linear layers of the two integer-kernel ONNX formats (`onnx-int8`, `onnx-w4`).

erq_core.onnx_export traces the model with one `Linear` marker per linear layer; this module writes
each marker as the operators onnxruntime's CPU provider turns into integer kernels:

- onnx-int8: the layer's own 8-bit input quantizer (scale, integer zero point) as one QuantizeLinear
  to UINT8 codes, and per column group a com.microsoft MatMulIntegerToFloat of those codes with the
  weight's integer codes and their per-output-channel scale and zero point (uint8 activations times
  int8 or uint8 weights, int32 sums, one float scale per output channel); the layer's bias is
  folded into its first product (finish_integer_graph). Codes are held in INT8 shifted by 2^(b-1),
  for onnxruntime's u8s8 kernel. Codes of 2 to 7 bits (|code| <= 64) cannot saturate its int16 pair
  sums even on x86 CPUs without VNNI; 8-bit codes can there, unless the session sets the entry
  erq_core.onnx_session describes (the file says so in its metadata). `int8_weights="exact"` keeps
  8-bit codes UINT8 (the u8u8 kernel, exact on every CPU without that entry, about half as fast)
  wherever a pair could saturate (_u8s8_exact). A two-part
  weight (outlier input columns with their own scales) is two such products, added: the ordinary
  part over the whole input with the outlier columns' codes at the zero point, the outlier part
  over a GatherElements of its few columns' UINT8 codes.
- onnx-w4: every linear layer is one com.microsoft MatMulNBits on its float input (an 8-bit input
  quantized first as erq quantizes it, onnx_export; the other activations float), at the kernel's
  W4_ACCURACY_LEVEL:
  4-bit codes packed two a byte in blocks of input columns (the longest of W4_BLOCKS that divides the
  input width), each block with its channel's scale and zero point repeated, which expresses erq's
  per-output-channel grid exactly. A two-part weight reads the whole input with the outlier columns'
  codes at the ordinary zero point, then those few columns again (a GatherElements concatenated to the
  input) in blocks of their own scale, padded with columns whose code is the zero point (they add
  exactly 0). Layers of 5 to 8 bits (mixed precision) use the kernel's 8-bit form.

Nothing is re-quantized: the codes written are erq's (WeightQuantizer.codes of the saved weights),
and what cannot be expressed exactly is refused with a message (IntegerExportError).
"""
from __future__ import annotations

import numpy as np
from torch import nn

from erq_core.config import DEFAULT_INT8_WEIGHTS, INT8_WEIGHTS
from erq_core.errors import ErqError
from erq_core.qmodules import QuantLinear
from erq_core.quantizers import TokenQuantizer, UniformQuantizer

CONTRIB_DOMAIN = "com.microsoft"
W4_BLOCKS = (128, 64, 32, 16)  # MatMulNBits' block lengths, fastest first
W4_BLOCK = 32  # for an input width none of them divides
# MatMulNBits' compute mode: 4 quantizes the float input to int8 per block inside the kernel (faster
# than float compute on this project's CPUs: bench/deploy.py); 0 computes in float32
W4_ACCURACY_LEVEL = 4
_UINT8, _INT8 = 2, 3  # onnx.TensorProto element types
# what a file with 8-bit INT8 weights asks of the session that runs it (metadata_props)
RUNTIME_NOTE_KEY = "onnxruntime_session_config"
RUNTIME_NOTE = ("session.x64quantprecision=1 on x86 CPUs without VNNI (AVX2, or AVX-512 without VNNI): else "
                "onnxruntime's u8s8 kernel saturates the 8-bit weights' 16-bit pair sums; not needed with VNNI or on ARM")


class IntegerExportError(ErqError):
    """The run cannot be written in an integer-kernel format (the message says why and what to do)."""


# ---------------------------------------------------------------- what each format can express


def check_integer_export(model: nn.Module, kernels: str, run_w_bits: int) -> None:
    """Refuse, before tracing, a model whose linear layers the format cannot express exactly.
    Bit widths are read from each layer's own quantizers (runs may mix precisions); `run_w_bits`,
    the run's weight bits, only decides whether onnx-w4 is the format for it at all."""
    if kernels == "w4" and run_w_bits > 4:
        raise IntegerExportError(f"onnx-w4 holds weights of 4 bits or fewer; this run has {run_w_bits}-bit weights: "
                                 "export it with --format onnx-int8")
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        if kernels == "int8":
            _int8_input(name, layer.input_quantizer)
            _int8_weight_group(name, layer, 0)  # every group is checked in the writer; this is the early word
        else:
            _nbits(name, layer)


def _int8_input(name: str, quantizer: nn.Module) -> tuple[np.float32, np.uint8]:
    """The per-tensor scale and UINT8 zero point of an 8-bit uniform input quantizer."""
    if isinstance(quantizer, TokenQuantizer):
        raise IntegerExportError(f"{name}: onnx-int8 runs its integer kernels on static per-tensor input ranges; "
                                 "this run quantizes activations per token at run time (act_granularity token): "
                                 "export it with --format onnx, onnx-float64 or onnx-w4")
    if not isinstance(quantizer, UniformQuantizer) or quantizer.bits != 8:
        bits = getattr(quantizer, "bits", "?")
        raise IntegerExportError(f"{name}: onnx-int8 needs 8-bit uniform activations, this layer's input has "
                                 f"{bits} bits; use --export onnx-w4 (activations below 8 bits in float) or onnx")
    if quantizer.per_channel:
        raise IntegerExportError(f"{name}: a per-channel input quantizer has no integer-kernel form; "
                                 "export with --format onnx")
    zero = float(quantizer.zero_point.reshape(()))
    if not zero.is_integer():
        raise IntegerExportError(
            f"{name}: its input quantizer has the fractional zero point {zero:.4g} that the RepQ-ViT fold of the "
            "erq and repq methods leaves, which integer kernels cannot take; quantize with --method erq+ "
            "(integer zero points), or export this run with --format onnx")
    if not 0 <= zero <= 255:
        raise IntegerExportError(f"{name}: input zero point {zero:g} lies outside 0..255; export with --format onnx")
    return np.float32(quantizer.scale.reshape(()).item()), np.uint8(zero)


def _layer_codes(layer: QuantLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """erq's integer codes (d_out, d_in), scales and zero points (d_out, groups), column groups (d_in,)."""
    quantizer = layer.weight_quantizer
    codes = quantizer.codes(layer.weight.detach().reshape(layer.out_features, -1)).cpu().numpy()
    scale = quantizer.scale.detach().float().cpu().numpy()
    zero = quantizer.zero_point.detach().float().cpu().numpy()
    return codes, scale, zero, quantizer.column_group.cpu().numpy()


def _int8_weight_group(name: str, layer: QuantLinear, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One column group's codes (d_out, d_in), its zero points (d_out,) clipped into what the stored
    type can hold, and their shortfall (true minus clipped, d_out,; see _zero_point_in_type)."""
    bits = layer.weight_quantizer.bits
    codes, _, zero, _ = _layer_codes(layer)
    zero = zero[:, group]
    if not np.all(zero == np.round(zero)):
        raise IntegerExportError(f"{name}: fractional weight zero points have no integer-kernel form")
    if bits > 8:
        raise IntegerExportError(f"{name}: {bits}-bit weights do not fit onnx-int8 (at most 8 bits)")
    low, high = (0, 255) if bits == 8 else (-128 + 2 ** (bits - 1), 127 + 2 ** (bits - 1))
    clipped, shortfall = _zero_point_in_type(zero, low, high)
    return codes.astype(np.int64), clipped.astype(np.int64), shortfall


def _int8_storage(bits: int, codes: np.ndarray, zero: np.ndarray, signed: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """How a block of codes (d_out, d_in) and its zero points (d_out,) are stored: INT8 shifted by
    2^(b-1), onnxruntime's fast u8s8 kernel, wherever that kernel computes them exactly on every
    CPU (or everywhere when `signed`); 8-bit codes that it could not are kept UINT8 (the u8u8
    kernel, about half as fast)."""
    offset = 2 ** (bits - 1)
    shifted = codes - offset
    if bits < 8 or signed or _u8s8_exact(shifted):
        return shifted.astype(np.int8), (zero - offset).astype(np.int8), _INT8
    return codes.astype(np.uint8), zero.astype(np.uint8), _UINT8


def _u8s8_exact(weights: np.ndarray) -> bool:
    """Whether onnxruntime's u8s8 kernel sums these INT8 weights (d_out, d_in) exactly for every UINT8
    input. On x86 CPUs without VNNI it multiplies the inputs k, k+1 (k even) by their weights with
    vpmaddubsw, whose 16-bit sum of the two products saturates past 32767: 255 (|a| + |b|) for a
    pair of one sign, at most 255 * 128 for a mixed pair. Codes of 7 bits or fewer, shifted, never
    reach it (|w| <= 64); 8-bit rows do when some pair of one sign has |a| + |b| > 128."""
    if weights.shape[1] % 2:
        weights = np.concatenate([weights, np.zeros((weights.shape[0], 1), weights.dtype)], axis=1)
    a, b = weights[:, 0::2], weights[:, 1::2]
    return not np.any((np.sign(a) == np.sign(b)) & (np.abs(a) + np.abs(b) > 128))


def _zero_point_in_type(zero: np.ndarray, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero points clipped into the stored type, and what the clip took off (zero - stored).

    A row all of one sign has its zero point outside the codes' range, where no integer type of the
    codes' width holds it. (q - z) s = (q - c) s - (z - c) s: the kernel computes with the stored c,
    and the layer adds -(z - c) s times the sum of its (quantized) inputs, exactly."""
    stored = np.clip(zero, low, high)
    return stored, zero - stored


def _nbits(name: str, layer: QuantLinear) -> int:
    """MatMulNBits' width for the layer: 4 for 2- to 4-bit codes, 8 for 5 to 8 bits."""
    bits = layer.weight_quantizer.bits
    zero = layer.weight_quantizer.zero_point.detach().float().cpu().numpy()
    if not np.all(zero == np.round(zero)):
        raise IntegerExportError(f"{name}: fractional weight zero points have no MatMulNBits form")
    if bits > 8:
        raise IntegerExportError(f"{name}: {bits}-bit weights do not fit MatMulNBits (at most 8 bits)")
    return 4 if bits <= 4 else 8


# ---------------------------------------------------------------- writers


def write_linear(g, x: str, out: str, stem: str, layer: QuantLinear, kernels: str,
                 int8_weights: str = DEFAULT_INT8_WEIGHTS) -> None:
    """The Linear marker x -> Q_a(x) Q_w(W)^T (no bias) written on `g` (onnx_export._Graph)."""
    if int8_weights not in INT8_WEIGHTS:
        raise IntegerExportError(f"int8 weights must be one of {', '.join(INT8_WEIGHTS)}, got {int8_weights!r}")
    if kernels == "int8":
        _int8_linear(g, x, out, stem, layer, int8_weights == "signed")
    elif kernels == "w4":
        _w4_linear(g, x, out, stem, layer)
    else:
        raise IntegerExportError(f"no integer writer for kernels {kernels!r}")


def _rank(graph, value: str) -> int | None:
    for info in graph.value_info:
        if info.name == value and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return None


def _int8_linear(g, x: str, out: str, stem: str, layer: QuantLinear, signed: bool = False) -> None:
    if _rank(g.graph, x) == 2:
        # MatMulIntegerToFloat multiplies a batch of matrices: the head's (batch, d_in) input is one
        axes = g.constant(f"{stem}.axes", np.asarray([0], dtype=np.int64))
        product = g.name(f"{stem}_product3d")
        _int8_linear(g, g.node("Unsqueeze", [x, axes], stem=stem), product, stem, layer, signed)
        g.node("Squeeze", [product, axes], out, stem=stem)
        return
    scale_x, zero_x = _int8_input(stem, layer.input_quantizer)
    _, scale, _, column_group = _layer_codes(layer)
    s_x, z_x = g.constant(f"{stem}.input_scale", scale_x), g.constant(f"{stem}.input_zero_point", zero_x)
    x_codes = g.node("QuantizeLinear", [x, s_x, z_x], stem=stem)  # one for every part of the layer
    parts = []
    for group in range(layer.weight_quantizer.groups):
        columns = np.flatnonzero(column_group == group)
        codes, zero, shortfall = _int8_weight_group(stem, layer, group)
        # the ordinary columns (most of them) read the whole input, with the outlier columns' codes at the
        # zero point (they add exactly 0): a strided Gather of the input costs more than those few columns
        whole = layer.weight_quantizer.groups == 1 or (group == 0 and not np.any(shortfall))
        if whole:
            part_codes, block = x_codes, np.where((column_group == group)[None, :], codes, zero[:, None])
        else:  # the outlier columns' UINT8 input codes, gathered once quantized (a quarter of the bytes)
            part_codes, block = _gather_columns(g, x_codes, columns, f"{stem}.columns{group}", stem), codes[:, columns]
        stored, stored_zero, elem = _int8_storage(layer.weight_quantizer.bits, block, zero, signed)
        w_codes = g.packed(f"{stem}.codes{group}", np.ascontiguousarray(stored.T), elem)
        w_zero = g.packed(f"{stem}.zero_point{group}", stored_zero, elem)
        w_scale = g.constant(f"{stem}.scale{group}", scale[:, group].astype(np.float32))
        parts.append(g.node("MatMulIntegerToFloat", [part_codes, w_codes, s_x, w_scale, z_x, w_zero], stem=stem,
                            domain=CONTRIB_DOMAIN))
        if np.any(shortfall):
            x_sum = g.node("ReduceSum", [g.node("DequantizeLinear", [part_codes, s_x, z_x], stem=stem),
                                         g.constant(f"{stem}.last_axis", np.asarray([-1], dtype=np.int64))],
                           stem=stem, keepdims=1)
            correction = (-shortfall * scale[:, group]).astype(np.float32)
            parts.append(g.node("Mul", [x_sum, g.constant(f"{stem}.zero_point_correction{group}", correction)],
                                stem=stem))
    if len(parts) == 1:
        g.rename(parts[0], out)
    else:
        total = parts[0]
        for k, part in enumerate(parts[1:], start=2):
            total = g.node("Add", [total, part], out if k == len(parts) else None, stem=stem)


def _gather_columns(g, x: str, columns: np.ndarray, tag: str, stem: str) -> str:
    """x[..., columns] as GatherElements with the columns broadcast over x's leading axes: the same
    values as Gather(axis=-1), which onnxruntime copies element by element (about 8x slower here)."""
    leading = g.node("Shape", [x], stem=stem, end=-1)
    shape = g.node("Concat", [leading, g.constant(f"{tag}.count", np.asarray([len(columns)], dtype=np.int64))],
                   stem=stem, axis=0)
    index = g.node("Expand", [g.constant(tag, columns.astype(np.int64)), shape], stem=stem)
    return g.node("GatherElements", [x, index], stem=stem, axis=-1)


def _w4_block(d_in: int) -> int:
    """The layer's MatMulNBits block: the longest that divides its input width (the kernel runs long
    blocks faster, bench/deploy.py), else W4_BLOCK with the last block padded."""
    return next((block for block in W4_BLOCKS if d_in % block == 0), W4_BLOCK)


def _w4_layout(column_group: np.ndarray, groups: int, d_in: int, block: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel reads the layer's input columns in their own order, then `extra` columns of it
    (gathered) for each further column group, so that every block holds one group's columns:
    (extra columns; which of the kernel's columns, all blocks * block of them, hold a code (the rest
    hold their block's zero point: padding, and a column's place in the blocks of groups it is not
    in); each block's column group)."""
    main_blocks = -(-d_in // block)
    extra: list[int] = [0] * (main_blocks * block - d_in) if groups > 1 else []
    live = list(column_group == 0) + [False] * (main_blocks * block - d_in)
    block_group = [0] * main_blocks
    for group in range(1, groups):
        columns = np.flatnonzero(column_group == group)
        pad = (-len(columns)) % block
        extra += list(columns) + [int(columns[0])] * pad
        live += [True] * len(columns) + [False] * pad
        block_group += [group] * ((len(columns) + pad) // block)
    return np.asarray(extra, dtype=np.int64), np.asarray(live), np.asarray(block_group, dtype=np.int64)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Two 4-bit values a byte along the last axis, the first in the low nibble (odd lengths padded)."""
    values = values.astype(np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), np.uint8)], axis=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def _w4_linear(g, x: str, out: str, stem: str, layer: QuantLinear) -> None:
    width = _nbits(stem, layer)
    codes, scale, zero, column_group = _layer_codes(layer)
    d_out, d_in = codes.shape
    block = _w4_block(d_in)
    extra, live, block_group = _w4_layout(column_group, layer.weight_quantizer.groups, d_in, block)
    blocks = len(block_group)
    stored_zero, shortfall = _zero_point_in_type(zero, 0, 2**width - 1)
    block_zero = stored_zero[:, block_group]  # (d_out, blocks)
    columns = np.concatenate([np.arange(d_in), extra])
    kernel_codes = np.zeros((d_out, blocks * block), codes.dtype)
    kernel_codes[:, :len(columns)] = codes[:, columns]
    # the other columns hold their block's zero point: (code - zero) * scale = 0 whatever the input there
    kernel_codes = np.where(live[None, :], kernel_codes, np.repeat(block_zero, block, axis=1))
    kernel_codes = kernel_codes.reshape(d_out, blocks, block)
    inputs_x = x
    if len(extra):  # the gather copies only these few columns; the layer's input is read as it is
        inputs_x = g.node("Concat", [x, _gather_columns(g, x, extra, f"{stem}.extra_columns", stem)], stem=stem,
                          axis=-1)
    if width == 4:
        packed_codes, packed_zero = _pack_nibbles(kernel_codes), _pack_nibbles(block_zero).reshape(-1)
    else:
        packed_codes, packed_zero = kernel_codes.astype(np.uint8), block_zero.astype(np.uint8).reshape(-1)
    b = g.constant(f"{stem}.codes", np.ascontiguousarray(packed_codes))
    s = g.constant(f"{stem}.scales", scale[:, block_group].astype(np.float32).reshape(-1))
    z = g.constant(f"{stem}.zero_points", np.ascontiguousarray(packed_zero))
    corrected = np.any(shortfall)
    product = g.node("MatMulNBits", [inputs_x, b, s, z], None if corrected else out, stem=stem, domain=CONTRIB_DOMAIN,
           K=len(columns), N=d_out, bits=width, block_size=block, accuracy_level=W4_ACCURACY_LEVEL)
    if corrected:  # each column group's input sum times its rows' -(z - c) s (see _zero_point_in_type)
        total = product
        for group in range(layer.weight_quantizer.groups):
            part_x = x if layer.weight_quantizer.groups == 1 else _gather_columns(
                g, x, np.flatnonzero(column_group == group), f"{stem}.columns{group}", stem)
            x_sum = g.node("ReduceSum", [part_x, g.constant(f"{stem}.last_axis", np.asarray([-1], dtype=np.int64))],
                           stem=stem, keepdims=1)
            correction = g.constant(f"{stem}.zero_point_correction{group}",
                                    (-shortfall[:, group] * scale[:, group]).astype(np.float32))
            last = group == layer.weight_quantizer.groups - 1
            total = g.node("Add", [total, g.node("Mul", [x_sum, correction], stem=stem)], out if last else None,
                           stem=stem)


def finish_integer_graph(proto) -> None:
    """Fold each linear layer's bias into its first integer product, write the post-softmax codes'
    table lookups in their faster form, and declare the contrib domain the kernels live in."""
    from onnx import helper

    _fold_biases(proto.graph)
    _log_softmax(proto.graph)
    _lookups_as_gather_elements(proto.graph)
    if any(n.domain == CONTRIB_DOMAIN for n in proto.graph.node) and \
            not any(e.domain == CONTRIB_DOMAIN for e in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    if saturating_weights(proto.graph):
        proto.metadata_props.add(key=RUNTIME_NOTE_KEY, value=RUNTIME_NOTE)


def saturating_weights(graph) -> bool:
    """Whether some integer product's INT8 weights (stored d_in x d_out) are ones onnxruntime's u8s8
    kernel can saturate on x86 CPUs without VNNI (erq_core.onnx_session)."""
    from onnx import numpy_helper

    weights = {node.input[1] for node in graph.node if node.op_type == "MatMulIntegerToFloat"}
    return any(not _u8s8_exact(numpy_helper.to_array(t).T.astype(np.int64))
               for t in graph.initializer if t.name in weights and t.data_type == _INT8)


def _consumers(graph) -> dict[str, int]:
    count: dict[str, int] = {}
    for node in graph.node:
        for value in node.input:
            count[value] = count.get(value, 0) + 1
    for output in graph.output:
        count[output.name] = count.get(output.name, 0) + 1
    return count


def _fold_biases(graph) -> None:
    """Add(layer output, bias) -> the bias input of the layer's first MatMulIntegerToFloat, which adds
    it while it scales the sums (one pass over the output fewer). A two-part layer's parts are
    summed after it: (p0 + b) + p1 for (p0 + p1) + b, the same up to float rounding order."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers = _consumers(graph)
    vectors = {t.name: t for t in graph.initializer if len(t.dims) == 1 and t.data_type == 1}
    removed = []
    for add in graph.node:
        if add.op_type != "Add" or add.domain or len(add.input) != 2:
            continue
        value, bias = (add.input[0], add.input[1]) if add.input[1] in vectors else (add.input[1], add.input[0])
        if bias not in vectors or consumers.get(value) != 1 or value not in producer:
            continue
        last = node = producer[value]
        # down the first inputs of the layer's own part sums to its first product
        while node.op_type == "Add" and not node.domain and consumers.get(node.input[0]) == 1 \
                and node.input[0] in producer:
            node = producer[node.input[0]]
        stem = last.name.split("/")[0]
        if node.op_type != "MatMulIntegerToFloat" or len(node.input) > 6 or node.name.split("/")[0] != stem:
            continue
        codes = next((t for t in graph.initializer if t.name == node.input[1]), None)
        if codes is None or list(codes.dims)[-1:] != list(vectors[bias].dims):
            continue
        node.input.append(bias)
        last.output[0] = add.output[0]
        removed.append(add)
    for add in removed:
        graph.node.remove(add)


def _log_softmax(graph) -> None:
    """Softmax followed by the log-sqrt2 quantizer's Log as one LogSoftmax: the same logarithms up to
    float rounding (a code can move only where a value lies on a rounding boundary, as anywhere in
    the file), without exponentiating the probabilities only to take their logarithm again."""
    from onnx import helper

    consumers = _consumers(graph)
    readers: dict[str, list] = {}
    for node in graph.node:
        for value in node.input:
            readers.setdefault(value, []).append(node)
    rewritten, dropped = [], set()
    for node in graph.node:
        log = readers[node.output[0]][0] if node.output and len(readers.get(node.output[0], [])) == 1 else None
        if node.op_type == "Softmax" and not node.domain and consumers.get(node.output[0]) == 1 \
                and log is not None and log.op_type == "Log" and not log.domain:
            merged = helper.make_node("LogSoftmax", [node.input[0]], [log.output[0]], name=f"{node.name}_log")
            merged.attribute.extend(node.attribute)  # the softmax axis
            rewritten.append(merged)
            dropped.add(log.name)
        elif node.name not in dropped or node.op_type != "Log":
            rewritten.append(node)
    del graph.node[:]
    graph.node.extend(rewritten)


def _lookups_as_gather_elements(graph) -> None:
    """The log-sqrt2 quantizer's Gather(levels, codes) as GatherElements on the flattened codes: the
    same values, but onnxruntime's Gather copies element by element (about 4x slower here)."""
    from onnx import helper

    levels = {t.name for t in graph.initializer if len(t.dims) == 1 and ".levels" in t.name}
    producer = {out: node for node in graph.node for out in node.output}
    consumers = _consumers(graph)
    flat = None
    rewritten = []
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] not in levels:
            rewritten.append(node)
            continue
        if flat is None:
            flat = "erq.flat_shape"
            graph.initializer.append(helper.make_tensor(flat, 7, [1], [-1]))
        index, out, stem = node.input[1], node.output[0], node.name.split("/")[0]
        cast = producer.get(index)
        if cast is not None and cast.op_type == "Cast" and consumers.get(index) == 1:
            next(a for a in cast.attribute if a.name == "to").i = 6  # INT32 indices: the codes are 0..2^b
        rewritten += [helper.make_node("Shape", [index], [f"{out}.shape"], name=f"{stem}/Shape_levels"),
                      helper.make_node("Reshape", [index, flat], [f"{out}.flat"], name=f"{stem}/Reshape_codes"),
                      helper.make_node("GatherElements", [node.input[0], f"{out}.flat"], [f"{out}.values"],
                                       name=f"{stem}/GatherElements_levels", axis=0),
                      helper.make_node("Reshape", [f"{out}.values", f"{out}.shape"], [out],
                                       name=f"{stem}/Reshape_levels")]
    del graph.node[:]
    graph.node.extend(rewritten)
