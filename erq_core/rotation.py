"""--rotate: orthogonal rotations of a ViT that leave its FP output unchanged and its quantizers
an easier job (QuaRot/SpinQuant-style, without training).

Three rotations, all folded into weights except one:
- the residual stream by Q (d x d): every writer (patch embedding, class/distillation/register
  tokens, position embedding, attention proj, fc2) is multiplied by Q on its output side, every
  reader (qkv, fc1, the heads) by Q on its input side. The LayerNorms in between stay LayerNorms:
  their affine parameters are folded into the readers first, and Q is built to fix the all-ones
  vector (Q 1 = 1), so LN(x Q) = LN(x) Q exactly (the mean over channels and the norm of the
  centred vector are both preserved). LayerScale gammas fold into the rows of proj and fc2.
  Q is a seeded randomized Hadamard matrix turned by one Householder reflection that maps Q0 1 to 1.
- per attention head, v's output and proj's input by a head-dim Hadamard matrix (attn @ v is
  linear on the right), so the attn @ v quantizer and proj's input quantizer see rotated values.
- before fc2, an online Hadamard transform of the post-GELU activation (OnlineHadamard, a matmul
  by a constant), with fc2's weight multiplied by the same matrix on its input side.

Only timm's VisionTransformer family (ViT, DeiT, DINOv2 with LayerScale and register tokens) is
supported; anything else is refused with RotationError before the model is changed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from erq_core.errors import ModelLoadError


class RotationError(ModelLoadError):
    """The model's structure is one --rotate cannot rotate exactly."""


@dataclass(frozen=True)
class RotationPlan:
    """Which rotations --rotate applies (all on by default; the others are measured ablations)."""

    residual: bool = True
    heads: bool = True  # v / proj per head
    qk: bool = True  # q and k per head by the same matrix (q @ k^T unchanged; not under qk_norm)
    online: bool = True  # the Hadamard before fc2
    repq_fold: bool = True  # RepQ-ViT's per-channel fold into the (rotated) LayerNorms
    random_orthogonal: bool = False  # Q0 from QR of a Gaussian instead of a randomized Hadamard
    fold_norms: bool = True  # LayerNorm/LayerScale affine into the weights (needed by, and forced with, residual)


def _paley_12() -> Tensor:
    """A Hadamard matrix of order 12 (Paley's construction I with q = 11)."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    jacobsthal = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def hadamard_factors(n: int) -> Optional[tuple[Tensor, Tensor]]:
    """Orthonormal Hadamard matrices A (order 1 or 12) and B (Sylvester, order 2^k) with
    kron(A, B) of order n = 2^k or 12 * 2^k, float64; None for other orders."""
    base = torch.ones(1, 1, dtype=torch.float64)
    if n % 12 == 0 and (n // 12) & (n // 12 - 1) == 0:
        base, n = _paley_12(), n // 12
    if n < 1 or n & (n - 1):
        return None
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < n:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)])
    return base / math.sqrt(base.shape[0]), sylvester / math.sqrt(n)


def hadamard(n: int) -> Optional[Tensor]:
    """An orthonormal Hadamard matrix (entries +-1/sqrt(n), float64) of order 2^k or 12 * 2^k,
    None for other orders."""
    factors = hadamard_factors(n)
    return None if factors is None else torch.kron(*factors)


def random_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))[None, :]


def residual_rotation(d: int, seed: int, random: bool = False) -> Tensor:
    """An orthogonal d x d matrix with Q 1 = 1 (float64): diag(random signs) H, or a random
    orthogonal matrix, followed by the Householder reflection that maps its image of 1 back to 1."""
    generator = torch.Generator().manual_seed(seed)
    h = None if random else hadamard(d)
    if h is None:
        q0 = random_orthogonal(d, generator)
    else:
        q0 = random_signs(d, generator)[:, None] * h
    ones = torch.ones(d, dtype=torch.float64)
    u = ones - q0.T @ ones  # the reflection R maps 1 to Q0^T 1, so (Q0 R) 1 = Q0 Q0^T 1 = 1
    if u.norm() < 1e-12:
        return q0
    return q0 @ (torch.eye(d, dtype=torch.float64) - 2.0 * torch.outer(u, u) / (u @ u))


def head_rotation(head_dim: int, seed: int) -> Tensor:
    """Random signs then a Hadamard matrix (a random orthogonal matrix where none exists)."""
    generator = torch.Generator().manual_seed(seed + 1)
    h = hadamard(head_dim)
    return random_signs(head_dim, generator)[:, None] * h if h is not None else random_orthogonal(head_dim, generator)


def random_signs(n: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1


class OnlineHadamard(nn.Module):
    """x -> x D H: random signs D (saved, as a buffer) then an orthonormal Hadamard matrix H
    (rebuilt from its order, in float64, so that a float64 evaluation multiplies by the exact
    matrix). The signs matter: post-GELU activations have a large common mean, which H alone
    would gather into one channel (H's first column is constant); D spreads it over all of them."""

    def __init__(self, features: int, seed: int = 0):
        super().__init__()
        factors = hadamard_factors(features)
        if factors is None:
            raise RotationError(f"no Hadamard matrix of order {features} (needs 2^k or 12 * 2^k)")
        self.features = features
        self.factors64 = factors
        self.register_buffer("signs", random_signs(features, torch.Generator().manual_seed(seed)).float())

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """D kron(A, B), the matrix forward multiplies by."""
        return (self.signs.double()[:, None] * torch.kron(*self.factors64).to(self.signs.device)).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        # x D kron(A, B) as A^T X B on x reshaped to (..., |A|, |B|): (|A| + |B|) multiply-adds per
        # value instead of |A| |B| (140 instead of 1536 for ViT-S's fc2), in plain MatMuls
        a, b = (f.to(dtype=x.dtype, device=x.device) for f in self.factors64)
        shape = x.shape
        x = (x * self.signs.to(x.dtype)).reshape(*shape[:-1], a.shape[0], b.shape[0])
        return (a.T @ (x @ b)).reshape(shape)

    def extra_repr(self) -> str:
        return f"features={self.features}"


def check_rotatable(model: nn.Module) -> None:
    """Raise RotationError (a ModelLoadError) unless rotate_model can rotate `model` exactly."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise RotationError(f"--rotate supports timm's ViT/DeiT (VisionTransformer), not "
                            f"{type(model).__name__}: Swin's patch merging changes the width between stages, "
                            "so one rotation cannot pass through it; quantize Swin without --rotate")
    if getattr(model, "attn_pool", None) is not None:
        raise RotationError("--rotate does not support an attention-pooling head (attn_pool)")
    for name in ("norm_pre",):
        if not isinstance(getattr(model, name), nn.Identity):
            raise RotationError(f"--rotate needs {name} to be absent: a LayerNorm there writes the residual stream")
    if not isinstance(getattr(model.patch_embed, "norm", nn.Identity()), nn.Identity):
        raise RotationError("--rotate needs a patch embedding without its own norm")
    for index, block in enumerate(model.blocks):
        if not (isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)):
            raise RotationError(f"--rotate needs pre-LayerNorm blocks (block {index} is not one)")
        if not isinstance(getattr(block.attn, "norm", nn.Identity()), nn.Identity):
            raise RotationError(f"--rotate needs attention without a norm before proj (block {index})")
        if not isinstance(block.mlp.norm, nn.Identity) or not isinstance(block.mlp.fc1, nn.Linear):
            raise RotationError(f"--rotate needs a plain fc1 -> act -> fc2 MLP (block {index})")
        for name in ("drop_path1", "drop_path2", "ls1", "ls2"):
            kind = type(getattr(block, name)).__name__
            if kind not in ("Identity", "LayerScale", "DropPath"):
                raise RotationError(f"--rotate does not know block {index}'s {name} ({kind})")
    norms = [m for m in (model.norm, model.fc_norm) if not isinstance(m, nn.Identity)]
    if len(norms) != 1 or not isinstance(norms[0], nn.LayerNorm):
        raise RotationError("--rotate needs exactly one final LayerNorm before the head")
    for head in _heads(model):
        if not isinstance(head, nn.Linear):
            raise RotationError("--rotate needs a linear classification head")


def _heads(model: nn.Module) -> list[nn.Module]:
    return [model.head] + ([model.head_dist] if getattr(model, "head_dist", None) is not None else [])


def _bias(linear: nn.Linear) -> Tensor:
    if linear.bias is None:
        linear.bias = nn.Parameter(linear.weight.new_zeros(linear.out_features), requires_grad=False)
    return linear.bias


def _fold_norm(norm: nn.LayerNorm, readers: list[nn.Linear]) -> None:
    """LN's gamma and beta into the linear layers that read it; the LN keeps gamma 1, beta 0."""
    gamma = norm.weight.double() if norm.weight is not None else None
    beta = norm.bias.double() if norm.bias is not None else None
    for linear in readers:
        weight = linear.weight.double()
        if beta is not None:
            _bias(linear).copy_(_bias(linear).double() + weight @ beta)
        if gamma is not None:
            linear.weight.copy_(weight * gamma[None, :])
    if norm.weight is not None:
        norm.weight.fill_(1.0)
    if norm.bias is not None:
        norm.bias.zero_()


def _fold_layer_scale(scale: nn.Module, writer: nn.Linear) -> None:
    gamma = getattr(scale, "gamma", None)
    if gamma is None:
        return
    writer.weight.copy_(writer.weight.double() * gamma.double()[:, None])
    if writer.bias is not None:
        writer.bias.copy_(writer.bias.double() * gamma.double())
    gamma.fill_(1.0)


def _write_rotated(writer: nn.Module, q: Tensor) -> None:
    """Output side: y -> y Q (W <- Q^T W over the output rows; conv weights included)."""
    shape = writer.weight.shape
    writer.weight.copy_((q.T @ writer.weight.double().reshape(shape[0], -1)).reshape(shape))
    if writer.bias is not None:
        writer.bias.copy_(writer.bias.double() @ q)


def _read_rotated(reader: nn.Linear, q: Tensor) -> None:
    """Input side: x Q in, same output (W <- W Q)."""
    reader.weight.copy_(reader.weight.double() @ q)


def _rotate_heads(attention: nn.Module, h: Tensor, qk: bool) -> None:
    """v's rows and proj's columns of each head by h; with qk, q's and k's rows too."""
    d, hd, heads = attention.proj.in_features, attention.head_dim, attention.num_heads
    qkv_weight, qkv_bias = attention.qkv.weight, attention.qkv.bias
    parts = (0, 1, 2) if qk else (2,)
    for head in range(heads):
        for part in parts:
            rows = slice(part * d + head * hd, part * d + (head + 1) * hd)
            qkv_weight[rows] = h.T @ qkv_weight[rows].double()
            if qkv_bias is not None:
                qkv_bias[rows] = qkv_bias[rows].double() @ h
        columns = slice(head * hd, (head + 1) * hd)
        attention.proj.weight[:, columns] = attention.proj.weight[:, columns].double() @ h


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int, plan: RotationPlan = RotationPlan()) -> None:
    """Rotate an FP timm VisionTransformer in place (its output unchanged up to rounding)."""
    check_rotatable(model)
    d = model.embed_dim
    for block in model.blocks if plan.residual or plan.fold_norms else ():
        _fold_norm(block.norm1, [block.attn.qkv])
        _fold_norm(block.norm2, [block.mlp.fc1])
        _fold_layer_scale(block.ls1, block.attn.proj)
        _fold_layer_scale(block.ls2, block.mlp.fc2)
    if plan.residual or plan.fold_norms:
        final_norm = model.norm if isinstance(model.norm, nn.LayerNorm) else model.fc_norm
        _fold_norm(final_norm, _heads(model))

    if plan.residual:
        q = residual_rotation(d, seed, plan.random_orthogonal)
        _write_rotated(model.patch_embed.proj, q)
        for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
            token = getattr(model, name, None)
            if token is not None:
                token.copy_(token.double() @ q)
        for block in model.blocks:
            _write_rotated(block.attn.proj, q)
            _write_rotated(block.mlp.fc2, q)
            _read_rotated(block.attn.qkv, q)
            _read_rotated(block.mlp.fc1, q)
        for head in _heads(model):
            _read_rotated(head, q)

    for index, block in enumerate(model.blocks):
        attention = block.attn
        if plan.heads:
            plain_qk = isinstance(attention.q_norm, nn.Identity) and isinstance(attention.k_norm, nn.Identity)
            _rotate_heads(attention, head_rotation(attention.head_dim, seed + index), plan.qk and plain_qk)
        if plan.online:
            block.mlp.norm = OnlineHadamard(block.mlp.fc2.in_features, seed + index)
            block.mlp.fc2.weight.copy_(block.mlp.fc2.weight.double() @ block.mlp.norm.matrix())


def online_hadamards(model: nn.Module) -> dict[str, int]:
    """Where a rotated model holds OnlineHadamard modules, and their orders (saved in checkpoints)."""
    return {name: module.features for name, module in model.named_modules() if isinstance(module, OnlineHadamard)}


def install_online_hadamards(model: nn.Module, layout: dict[str, int]) -> None:
    """Rebuild the OnlineHadamard modules of `layout` in a fresh architecture, before its state (and
    their signs) is loaded."""
    for name, features in layout.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, OnlineHadamard(features))
