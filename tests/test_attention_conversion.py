"""Attention's two matmuls are quantized in every block, and an attention we do not know is refused."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from erq_core import ModelLoadError
from erq_core.qmodules import QuantMatMul, convert_model, set_quant_state

from tests.small_models import SMALL_MODELS, blocks, images, small_model


def quantized_matmul_calls(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How often each QuantMatMul of `model` runs during one forward pass."""
    calls: dict[str, int] = {}
    hooks = [module.register_forward_hook(lambda m, i, o, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
             for name, module in model.named_modules() if isinstance(module, QuantMatMul)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def convert(model: nn.Module) -> None:
    convert_model(model, 4, 4, set(), set(), log_sqrt2_softmax=True)


@pytest.mark.parametrize("kind", list(SMALL_MODELS))
def test_every_block_runs_its_two_quantized_attention_matmuls(kind):
    model = small_model(kind)
    x = images(kind, 2)
    with torch.no_grad():
        fp = model(x)
    convert(model)
    calls = quantized_matmul_calls(model, x)
    assert len(calls) == 2 * blocks(kind)  # q @ k^T and attn @ v of each block
    assert set(calls.values()) == {1}
    assert sum(name.endswith("matmul_qk") for name in calls) == blocks(kind)
    with torch.no_grad():  # with quantization off, the explicit forward is timm's fused one
        set_quant_state(model, activations=False, weights=False)
        assert torch.allclose(model(x), fp, rtol=1e-4, atol=1e-5)


class SelfAttention(nn.Module):
    """An attention kind erq does not know: what a renamed or new timm class looks like to it."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, **kwargs):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def _attention_with_its_own_forward():
    from timm.layers.attention import Attention

    class GatedAttention(Attention):  # a subclass that changes the computation
        def forward(self, x, attn_mask=None, **kwargs):
            return super().forward(x, attn_mask=attn_mask) * 0.5

    return GatedAttention


@pytest.mark.parametrize("attn_layer", [SelfAttention, "subclass"], ids=["renamed", "subclass_with_own_forward"])
def test_an_attention_kind_that_is_not_supported_is_refused_with_the_module_named(attn_layer):
    layer = _attention_with_its_own_forward() if attn_layer == "subclass" else attn_layer
    model = small_model("vit", attn_layer=layer)
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(ModelLoadError, match=r"blocks\.0\.attn .*full precision") as raised:
        convert(model)
    assert layer.__name__ in str(raised.value)
    assert {name: type(module) for name, module in model.named_modules()} == before  # nothing half-converted


def test_a_subclass_that_keeps_timms_attention_forward_is_converted():
    from timm.layers.attention import Attention

    class NamedAttention(Attention):
        pass

    model = small_model("vit", attn_layer=NamedAttention)
    convert(model)
    assert len(quantized_matmul_calls(model, images("vit", 2))) == 2 * blocks("vit")
