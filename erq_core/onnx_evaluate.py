"""An exported ONNX file scored by onnxruntime (CPU provider) on the same val images as erq itself."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor


class OnnxRuntimeModel:
    """Calls an ONNX model like a torch module (images in, logits out), for erq_core.evaluate.accuracy."""

    def __init__(self, path: str | Path, threads: Optional[int] = None):
        import onnxruntime as ort

        from erq_core.onnx_session import session_options

        self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def eval(self) -> "OnnxRuntimeModel":
        return self

    def __call__(self, images: Tensor) -> Tensor:
        images = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: images})[0])


def onnx_accuracy(path: str | Path, loader, progress=None, threads: Optional[int] = None) -> dict:
    """{"top1", "top5", "n"} of the ONNX model at `path` on `loader`'s (images, labels)."""
    from erq_core.evaluate import accuracy

    return accuracy(OnnxRuntimeModel(path, threads), loader, "cpu", progress, "evaluate_onnx")
