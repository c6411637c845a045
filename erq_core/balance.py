"""Balancing attention channels before quantization (erq+ at low activation bits): exact folds.

Outputs. The input of an attention's `proj` (attn @ v, quantized per tensor) has channels of very
different ranges (on the realistic DINOv2-S the widest is 2.3-9.6x the median). Each softmax row sums
to 1, so attn @ ((v - d) / r) = (attn @ v - d) / r for a per-channel shift d and scale r: they fold
exactly into v's rows of qkv (W / r, (b - d) / r) and into proj's columns and bias (W r, b + W d), and
the FP model computes the same function (as RepQ-ViT folds the LayerNorm's channel scales). With d the
channel's mid-range and r = (range / median range)^BALANCE_ALPHA the channels' ranges move towards
one another; measured in docs/accuracy.md ("Balancing the attention output").

Queries and keys. q @ k^T is quantized on both sides, per tensor. A key channel's shift c changes
every score of a query by the same q . c, which the softmax ignores, so each key channel is centred
(c its mid-range); and q_j k_j is unchanged when q's channel j is divided by s_j and k's multiplied by
it, so s_j = (|q_j|max / (k_j half-range))^QK_ALPHA brings each channel's two extents together. Both
fold into qkv's q and k rows; measured in docs/accuracy.md ("Balancing queries and keys").
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

BALANCE_ALPHA = 0.5  # 0.5 and 1.0 measured at W4/A4 (seed 0: 73.3 and 72.7); 0.5 kept
BALANCED_FLAG = "erq_attention_balanced"  # set on a model once its outputs are balanced (copies keep it)
QK_ALPHA = 0.5
QK_BALANCED_FLAG = "erq_queries_keys_balanced"  # set once its queries and keys are balanced


def balanceable(module: nn.Module) -> bool:
    """An attention whose proj reads attn @ v directly: qkv and proj linear layers, no norm or gate between."""
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
        return False
    if qkv.out_features != 3 * proj.in_features or getattr(module, "gate", None) is not None:
        return False
    return isinstance(getattr(module, "norm", nn.Identity()), nn.Identity)


@torch.no_grad()
def balance_attention_outputs(model: nn.Module, images: Tensor, alpha: float = BALANCE_ALPHA) -> list[str]:
    """Fold a per-channel shift and scale of every balanceable attention's proj input into its qkv
    and proj (the model's function unchanged); the names of the attentions balanced."""
    watched = {name: module.proj for name, module in model.named_modules() if balanceable(module)}
    ranges = _channel_ranges(model, images, watched, on_input=True)
    for name, (low, high) in ranges.items():
        width = (high - low).clamp(min=1e-6)
        _fold(model.get_submodule(name), (high + low) / 2, (width / width.median()) ** alpha)
    setattr(model, BALANCED_FLAG, True)
    return sorted(ranges)


def _channel_ranges(model: nn.Module, images: Tensor, watched: dict[str, nn.Module], on_input: bool
                    ) -> dict[str, tuple[Tensor, Tensor]]:
    """Each channel's (low, high) of every watched layer's input (on_input) or output, over `images`;
    keyed by the names given."""
    ranges: dict[str, tuple[Tensor, Tensor]] = {}

    def record(name: str):
        def hook(_module, inputs, output=None):
            x = inputs[0] if on_input else output
            x = x.reshape(-1, x.shape[-1])
            low, high = x.amin(0), x.amax(0)
            if name in ranges:
                low, high = torch.minimum(low, ranges[name][0]), torch.maximum(high, ranges[name][1])
            ranges[name] = (low, high)
        return hook

    hooks = [layer.register_forward_pre_hook(record(name)) if on_input else layer.register_forward_hook(record(name))
             for name, layer in watched.items()]
    try:
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def _fold(attention: nn.Module, shift: Tensor, scale: Tensor) -> None:
    qkv, proj = attention.qkv, attention.proj
    for layer in (qkv, proj):
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.out_features, device=layer.weight.device,
                                                  dtype=layer.weight.dtype))
    v_rows = slice(2 * proj.in_features, 3 * proj.in_features)
    qkv.bias[v_rows] = (qkv.bias[v_rows] - shift) / scale
    qkv.weight[v_rows] /= scale[:, None]
    proj.bias += proj.weight @ shift
    proj.weight *= scale[None, :]


def qk_balanceable(module: nn.Module) -> bool:
    """An attention whose q and k come straight from qkv's rows (no per-head norm between)."""
    qkv = getattr(module, "qkv", None)
    if not isinstance(qkv, nn.Linear) or qkv.out_features % 3:
        return False
    return all(isinstance(getattr(module, norm, nn.Identity()), nn.Identity) for norm in ("q_norm", "k_norm"))


@torch.no_grad()
def balance_queries_and_keys(model: nn.Module, images: Tensor, alpha: float = QK_ALPHA) -> list[str]:
    """Centre every qk-balanceable attention's key channels and move a per-channel scale from q to k,
    folded into qkv (the model's function unchanged); the names of the attentions balanced."""
    watched = {name: module.qkv for name, module in model.named_modules() if qk_balanceable(module)}
    ranges = _channel_ranges(model, images, watched, on_input=False)
    for name, (low, high) in ranges.items():
        qkv = model.get_submodule(name).qkv
        width = qkv.out_features // 3
        q_rows, k_rows = slice(0, width), slice(width, 2 * width)
        k_shift = (high[k_rows] + low[k_rows]) / 2
        k_extent = ((high[k_rows] - low[k_rows]) / 2).clamp(min=1e-6)
        q_extent = torch.maximum(high[q_rows], -low[q_rows]).clamp(min=1e-6)
        scale = (q_extent / k_extent) ** alpha
        if qkv.bias is None:
            qkv.bias = nn.Parameter(torch.zeros(qkv.out_features, device=qkv.weight.device, dtype=qkv.weight.dtype))
        qkv.bias[k_rows] = (qkv.bias[k_rows] - k_shift) * scale
        qkv.weight[k_rows] *= scale[:, None]
        qkv.bias[q_rows] /= scale
        qkv.weight[q_rows] /= scale[:, None]
    setattr(model, QK_BALANCED_FLAG, True)
    return sorted(ranges)
