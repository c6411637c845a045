"""Tiny random timm models of each supported family, with non-trivial LayerNorms (for tests)."""
from __future__ import annotations

import timm
import torch

SMALL_MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)),
    "vit_layerscale_qknorm_registers": ("vit_tiny_patch16_224", dict(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, init_values=0.1, qk_norm=True, reg_tokens=2)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                                num_heads=2)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=32, depths=(2, 2), num_heads=(2, 4))),
}


def small_model(kind: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    name, args = SMALL_MODELS[kind]
    model = timm.create_model(name, pretrained=False, num_classes=10, **{**args, **overrides}).eval()
    with torch.no_grad():  # give LayerNorms non-trivial affine parameters, as trained models have
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                if module.weight is not None:
                    module.weight.uniform_(0.5, 2.0)
                if module.bias is not None:
                    module.bias.uniform_(-0.5, 0.5)
    return model


def blocks(kind: str) -> int:
    """How many transformer blocks (each with one attention) the small model has."""
    args = SMALL_MODELS[kind][1]
    return sum(args["depths"]) if "depths" in args else args["depth"]


def images(kind: str, n: int = 4, seed: int = 1) -> torch.Tensor:
    size = SMALL_MODELS[kind][1]["img_size"]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def saved_quantized(kind: str, folder, **config_fields) -> None:
    """ERQ W4/A4 (or what `config_fields` say) of the small model, calibrated on 8 random images,
    saved as a run folder."""
    from erq_core import ErqConfig, quantize, save_quantized

    name, args = SMALL_MODELS[kind]
    source = {"spec": name, "architecture": name, "model_args": dict(args, num_classes=10), "num_classes": 10}
    config = ErqConfig(model=name, dataset="unused", **{"calib_size": 8, "random_init": True, **config_fields})
    quantized = quantize(small_model(kind), [images(kind, 8, seed=2)], config)
    save_quantized(quantized, folder, source, {"input_size": [3, args["img_size"], args["img_size"]]})
