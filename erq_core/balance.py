"""Balancing each attention's output channels before quantization (erq+ at 4-bit activations).

The input of an attention's `proj` (attn @ v, quantized per tensor) has channels of very different
ranges (on the realistic DINOv2-S the widest is 2.3-9.6x the median). Each softmax row sums to 1, so
attn @ ((v - d) / r) = (attn @ v - d) / r for a per-channel shift d and scale r: they fold exactly
into v's rows of qkv (W / r, (b - d) / r) and into proj's columns and bias (W r, b + W d), and the FP
model computes the same function (as RepQ-ViT folds the LayerNorm's channel scales). With d the
channel's mid-range and r = (range / median range)^BALANCE_ALPHA the channels' ranges move towards
one another; measured in docs/accuracy.md ("Balancing the attention output").
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

BALANCE_ALPHA = 0.5  # 0.5 and 1.0 measured at W4/A4 (seed 0: 73.3 and 72.7); 0.5 kept
BALANCED_FLAG = "erq_attention_balanced"  # set on a model once balanced (copies keep it)


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
    ranges = _proj_input_ranges(model, images)
    for name, (low, high) in ranges.items():
        width = (high - low).clamp(min=1e-6)
        _fold(model.get_submodule(name), (high + low) / 2, (width / width.median()) ** alpha)
    setattr(model, BALANCED_FLAG, True)
    return sorted(ranges)


def _proj_input_ranges(model: nn.Module, images: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    ranges: dict[str, tuple[Tensor, Tensor]] = {}

    def record(name: str):
        def hook(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            low, high = x.amin(0), x.amax(0)
            if name in ranges:
                low, high = torch.minimum(low, ranges[name][0]), torch.maximum(high, ranges[name][1])
            ranges[name] = (low, high)
        return hook

    hooks = [module.proj.register_forward_pre_hook(record(name))
             for name, module in model.named_modules() if balanceable(module)]
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
