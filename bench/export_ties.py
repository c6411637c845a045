"""How much of the difference between onnxruntime and erq is last-bit rounding.

On the images of a run's validation subset, erq's fake-quantized model is compared with
(a) itself computing round(x / s) as QuantizeLinear does instead of torch's fused x * (1/s),
(b) itself with one-ulp noise on the input of every per-tensor activation quantizer, and
(c) onnxruntime running the run's model.onnx.

    .venv/bin/python bench/export_ties.py RUN_DIR DATASET [--val-limit 500]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import erq_core.quantizers as quantizers
from erq_core import load_quantized
from erq_core.data import build_transform, validation_loader

FUSED = quantizers.fake_quantize


def divided(x, scale, zero_point, bits):
    top = 2**bits - 1
    return (torch.clamp(torch.round(x / scale) + zero_point, 0, top) - zero_point) * scale


def ulp_noise(generator: torch.Generator):
    def noisy(x, scale, zero_point, bits):
        if scale.numel() == 1:  # per-tensor activation quantizers (weights are per channel)
            x = x * (1 + 2.0**-23 * torch.randn(x.shape, generator=generator))
        return FUSED(x, scale, zero_point, bits)
    return noisy


def logits_with(model, images: torch.Tensor, fake_quantize) -> np.ndarray:
    quantizers.fake_quantize = fake_quantize
    for module in model.modules():  # cached fake-quantized weights
        if hasattr(module, "_cache"):
            module._cache = None
    try:
        with torch.no_grad():
            return model(images).numpy()
    finally:
        quantizers.fake_quantize = FUSED


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("dataset")
    parser.add_argument("--val-limit", type=int, default=500)
    args = parser.parse_args()
    config = json.load(open(f"{args.run}/config.json"))
    model = load_quantized(args.run, "cpu")
    session = ort.InferenceSession(f"{args.run}/model.onnx", providers=["CPUExecutionProvider"])
    loader = validation_loader(args.dataset, build_transform(config["pretrained_cfg"]), 50, args.val_limit)
    noise = ulp_noise(torch.Generator().manual_seed(0))
    runs: dict[str, list] = {"erq": [], "erq_divided": [], "erq_ulp_noise": [], "onnxruntime": []}
    labels = []
    for images, y in loader:
        runs["erq"].append(logits_with(model, images, FUSED))
        runs["erq_divided"].append(logits_with(model, images, divided))
        runs["erq_ulp_noise"].append(logits_with(model, images, noise))
        runs["onnxruntime"].append(session.run(None, {"images": images.numpy()})[0])
        labels.append(y.numpy())
    y = np.concatenate(labels)
    logits = {name: np.concatenate(parts) for name, parts in runs.items()}
    reference = logits["erq"]
    for name, value in logits.items():
        diff = np.abs(value - reference).max(axis=1)
        print(json.dumps({"run": name, "top1": round(100 * float((value.argmax(1) == y).mean()), 2),
                          "max_logit_diff": float(diff.max()), "images_above_1e-4": int((diff >= 1e-4).sum())}))


if __name__ == "__main__":
    main()
