"""Quantized stand-ins for the modules of a timm ViT / DeiT / Swin.

Every matrix product is quantized: nn.Linear (input + weight quantizers), the patch-embedding
Conv2d (weight only) and attention's two matmuls (q @ k^T and attn @ v), for which timm's fused
attention is replaced by an explicit forward.
"""
from __future__ import annotations

import types
from typing import Iterator, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from erq_core.errors import ModelLoadError
from erq_core.quantizers import ActivationQuantizer, LogSqrt2Quantizer, TokenQuantizer, UniformQuantizer, WeightQuantizer


class QuantLinear(nn.Module):
    """y = Q_a(x) Q_w(W)^T + b. The weight stays a float tensor; quantizers are switched on by flags."""

    def __init__(self, linear: nn.Linear, a_bits: int, w_bits: int, per_channel_input: bool, two_part: bool,
                 token_input: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.input_quantizer: ActivationQuantizer = (
            TokenQuantizer(a_bits) if token_input and not per_channel_input
            else UniformQuantizer(a_bits, self.in_features if per_channel_input else None))
        self.weight_quantizer = WeightQuantizer(w_bits, self.out_features, self.in_features, 2 if two_part else 1)
        self.quantize_weight = False
        self._cache: Optional[tuple[tuple, Tensor]] = None

    def ensure_bias(self) -> Tensor:
        """The bias, created as zeros if the layer had none (reparameterization needs one)."""
        if self.bias is None:
            self.bias = nn.Parameter(self.weight.new_zeros(self.out_features), requires_grad=False)
        return self.bias

    def effective_weight(self) -> Tensor:
        if not self.quantize_weight:
            return self.weight
        key = (self.weight._version, self.weight.data_ptr(), self.weight_quantizer.scale._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.weight_quantizer(self.weight))
        return self._cache[1]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, a_bits={self.input_quantizer.bits}, "
                f"w_bits={self.weight_quantizer.bits}, groups={self.weight_quantizer.groups}")


class QuantConv2d(nn.Module):
    """The patch embedding: weight quantizer only (its input is the image)."""

    def __init__(self, conv: nn.Conv2d, w_bits: int):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.kernel_size = conv.kernel_size
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("only plain convolutions (groups=1, zero padding) are supported in the patch embedding")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        out_channels = self.weight.shape[0]
        self.weight_quantizer = WeightQuantizer(w_bits, out_channels, self.weight[0].numel(), 1)
        self.quantize_weight = False
        self._cache: Optional[tuple[tuple, Tensor]] = None

    effective_weight = QuantLinear.effective_weight

    def unfold(self, x: Tensor) -> Tensor:
        """im2col: the (patches, C*kh*kw) matrix this conv multiplies with its 2-D weight."""
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation)


class QuantMatMul(nn.Module):
    """a @ b with each operand quantized."""

    def __init__(self, a_quantizer: nn.Module, b_quantizer: nn.Module):
        super().__init__()
        self.a_quantizer = a_quantizer
        self.b_quantizer = b_quantizer

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.a_quantizer(a) @ self.b_quantizer(b)


def _vit_attention_forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """timm.layers.attention.Attention.forward with explicit, quantized matmuls."""
    from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    attn = self.matmul_qk(q * self.scale, k.transpose(-2, -1))
    attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
    attn = self.attn_drop(attn.softmax(dim=-1))
    x = self.matmul_av(attn, v)
    x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _swin_window_attention_forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """timm's Swin WindowAttention.forward with explicit, quantized matmuls."""
    B_, N, _ = x.shape
    qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = self.matmul_qk(q * self.scale, k.transpose(-2, -1))
    attn = attn + self._get_rel_pos_bias()
    if mask is not None:
        num_win = mask.shape[0]
        attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, N, N)
    attn = self.attn_drop(self.softmax(attn))
    x = self.matmul_av(attn, v)
    x = x.transpose(1, 2).reshape(B_, N, -1)
    return self.proj_drop(self.proj(x))


def _attention_forward_for(module: nn.Module):
    """The quantized forward for a timm attention module, or None when we do not know it.

    A subclass qualifies only if it keeps timm's forward: its computation is then the one we rewrite.
    """
    from timm.layers.attention import Attention
    from timm.models.swin_transformer import WindowAttention

    for known, forward in ((Attention, _vit_attention_forward), (WindowAttention, _swin_window_attention_forward)):
        if isinstance(module, known) and type(module).forward is known.forward:
            return forward
    return None


def _looks_like_attention(module: nn.Module) -> bool:
    """An attention-like module (by its class name or timm's fused_attn flag) with linear layers."""
    kind = type(module).__name__.lower()
    named_like_attention = "attn" in kind or "attention" in kind or hasattr(module, "fused_attn")
    return named_like_attention and any(isinstance(child, nn.Linear) for child in module.children())


def convert_model(
    model: nn.Module,
    a_bits: int,
    w_bits: int,
    per_channel_inputs: set[str],
    two_part_weights: set[str],
    log_sqrt2_softmax: bool,
    act_granularity: str = "tensor",
) -> None:
    """Swap every quantizable module of `model` in place for its quantized stand-in.

    `per_channel_inputs` names the linear layers whose input quantizer starts per channel (to be
    folded by the reparameterization), `two_part_weights` those with two-part weight quantizers.
    `act_granularity` "token": dynamic per-token quantizers (TokenQuantizer) for the linear inputs
    (a per-channel one becomes one after the fold: dynamic_inputs) and for q and k; v per channel;
    the post-softmax quantizer stays static.
    """
    attentions = [(name, module, _attention_forward_for(module)) for name, module in model.named_modules()]
    unsupported = [(name, module) for name, module, forward in attentions
                   if forward is None and _looks_like_attention(module)]
    if unsupported:  # refused before anything is changed
        name, module = unsupported[0]
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        others = f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else ""
        raise ModelLoadError(
            f"attention {name} ({kind}){others} is not supported: its q @ k^T and attn @ v would stay in full "
            "precision. erq quantizes timm's ViT/DeiT Attention (timm.layers.attention.Attention) and Swin "
            "WindowAttention: use a ViT, DeiT or Swin built from those blocks")
    for name, module, forward in attentions:
        if forward is not None:
            attn_quantizer = LogSqrt2Quantizer(a_bits) if log_sqrt2_softmax else UniformQuantizer(a_bits)
            if act_granularity == "token":  # q's rows and k^T's columns: their scales factor out of q @ k^T
                module.matmul_qk = QuantMatMul(TokenQuantizer(a_bits), TokenQuantizer(a_bits, dim=-2))
                # v dynamic per channel (one range per head channel over the tokens: its scales factor out
                # of attn @ v); static per tensor measured alike (docs/accuracy.md)
                module.matmul_av = QuantMatMul(attn_quantizer, TokenQuantizer(a_bits, dim=-2))
            else:
                module.matmul_qk = QuantMatMul(UniformQuantizer(a_bits), UniformQuantizer(a_bits))
                module.matmul_av = QuantMatMul(attn_quantizer, UniformQuantizer(a_bits))
            module.fused_attn = False
            module.forward = types.MethodType(forward, module)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear):
                setattr(module, child_name, QuantLinear(
                    child, a_bits, w_bits, full in per_channel_inputs, full in two_part_weights,
                    token_input=act_granularity == "token"))
            elif isinstance(child, nn.Conv2d):  # ViT and Swin convolve only in the patch embedding
                setattr(module, child_name, QuantConv2d(child, w_bits))


def dynamic_inputs(model: nn.Module, names: set[str]) -> None:
    """Give the linear layers `names` (their per-channel input folded to per-tensor by the
    reparameterization) a dynamic per-token input quantizer, calibrated on its next input."""
    modules = dict(model.named_modules())
    for name in names:
        layer = modules[name]
        old = layer.input_quantizer
        layer.input_quantizer = TokenQuantizer(old.bits).to(old.scale.device)
        layer.input_quantizer.enabled = old.enabled


def weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module with a weight quantizer, in forward order: the patch conv, then linears."""
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            yield name, module


def activation_quantizers(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        if isinstance(module, ActivationQuantizer):
            yield module


def set_quant_state(model: nn.Module, activations: bool, weights: bool) -> None:
    for quantizer in activation_quantizers(model):
        quantizer.enabled = activations
    for _, layer in weight_layers(model):
        layer.quantize_weight = weights
