"""RepQ-ViT scale reparameterization of post-LayerNorm activations.

A post-LayerNorm activation varies a lot from channel to channel. It is calibrated per channel
(scale s_c, zero point z_c), then the variation is folded into the LayerNorm's affine parameters
and the next linear layer's weight so that one per-tensor quantizer fits all channels. In full
precision the network output is unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from erq_core.qmodules import QuantLinear


@torch.no_grad()
def find_norm_linear_pairs(model: nn.Module, example: Tensor) -> dict[str, str]:
    """Map each linear layer fed by exactly one LayerNorm's output to that LayerNorm's name.

    Found from the data flow, not from names: one forward pass records, per channel, the sum and
    sum of squares of every LayerNorm output and every linear input. A linear whose input has the
    same per-channel sums as a LayerNorm output is fed by it, up to a reordering of tokens (Swin
    rolls and partitions windows in between). A LayerNorm that feeds several linear layers is
    left alone: one fold cannot serve two weights.
    """
    signatures: dict[str, Tensor] = {}
    norms, linears = [], []

    def record(name: str, tensor: Tensor) -> None:
        flat = tensor.detach().reshape(-1, tensor.shape[-1]).double()
        signatures[name] = torch.cat([flat.sum(0), flat.pow(2).sum(0)])

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            norms.append(name)
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: record(n, o)))
        elif isinstance(module, (nn.Linear, QuantLinear)):
            linears.append(name)
            hooks.append(module.register_forward_pre_hook(lambda m, i, n=name: record(n, i[0])))
    try:
        model(example)
    finally:
        for hook in hooks:
            hook.remove()

    fed_by: dict[str, list[str]] = {}
    for norm in norms:
        for linear in linears:
            a, b = signatures.get(norm), signatures.get(linear)
            if a is not None and b is not None and a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-6):
                fed_by.setdefault(norm, []).append(linear)
    return {users[0]: norm for norm, users in fed_by.items() if len(users) == 1}


@torch.no_grad()
def fold_channel_scales(norm: nn.LayerNorm, linear: QuantLinear, integer_zero_point: bool = False) -> None:
    """Fold the linear layer's per-channel input quantizer into `norm` and `linear`.

    r = s / mean(s), beta = m / r - t with m = -z s (channel minimum) and t = -Z mean(s).
    LayerNorm: gamma /= r, bias = bias / r - beta. Linear: W[:, c] *= r_c, b += W beta.
    The input quantizer becomes per-tensor with scale mean(s) and zero point Z = mean(z).

    RepQ-ViT's and ERQ's code keep Z fractional. Then the two clamped ends of the per-tensor
    quantizer, -Z s and (2^b - 1 - Z) s, fall between the integer steps k s that the codes in
    between give: 2^b + 1 distinct values. With `integer_zero_point` Z is rounded, and the folded
    quantizer is exactly each channel's own b-bit quantizer.
    """
    quantizer = linear.input_quantizer
    s, z = quantizer.scale.double(), quantizer.zero_point.double()
    mean_s, mean_z = s.mean(), z.mean()
    if integer_zero_point:
        mean_z = torch.round(mean_z)
    r = s / mean_s
    beta = (-z * s) / r - (-mean_z * mean_s)
    norm.weight.copy_(norm.weight.double() / r)
    norm.bias.copy_(norm.bias.double() / r - beta)
    weight = linear.weight.double() * r[None, :]
    linear.weight.copy_(weight)
    bias = linear.ensure_bias()
    bias.copy_(bias.double() + weight @ beta)
    quantizer.set_per_tensor(mean_s.to(quantizer.scale), mean_z.to(quantizer.zero_point))


def reparameterize(model: nn.Module, pairs: dict[str, str], integer_zero_point: bool = False) -> None:
    modules = dict(model.named_modules())
    for linear_name, norm_name in pairs.items():
        norm, linear = modules[norm_name], modules[linear_name]
        # the fold needs an affine LayerNorm: create only what is missing (a LayerNorm with
        # bias=False keeps its weight), beside the linear weight's device and dtype
        like = dict(dtype=linear.weight.dtype, device=linear.weight.device)
        if norm.weight is None:
            norm.weight = nn.Parameter(torch.ones(norm.normalized_shape, **like), requires_grad=False)
        if norm.bias is None:
            norm.bias = nn.Parameter(torch.zeros(norm.normalized_shape, **like), requires_grad=False)
        fold_channel_scales(norm, linear, integer_zero_point)
