"""Run an ONNX model with onnxruntime alone, as a user who has neither erq nor torch would.

    python -I tests/onnx_runner.py MODEL.onnx INPUTS.npz OUTPUT.npz

INPUTS.npz holds `images` (N, 3, H, W float32); OUTPUT.npz gets `logits`. The tests start it
in a separate, isolated process (-I: no PYTHONPATH, no current folder on the path) with imports of
torch, timm and erq refused, so a model that needed them could not run.
"""
import importlib.abc
import sys

REFUSED = ("torch", "torchvision", "timm", "erq_core", "erq_cli", "service", "worker", "storage", "safetensors")


class RefuseImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in REFUSED:
            raise ImportError(f"{name} is refused: the ONNX model must run without it")
        return None


def main(model: str, inputs: str, output: str, batch_size: int = 64) -> None:
    sys.meta_path.insert(0, RefuseImports())
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    images = np.load(inputs)["images"].astype(np.float32)
    name = session.get_inputs()[0].name
    logits = [session.run(None, {name: images[i:i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in REFUSED)
    assert not loaded, f"loaded without being asked: {loaded}"
    np.savez(output, logits=np.concatenate(logits), modules=np.array(sorted(sys.modules)))


if __name__ == "__main__":
    main(*sys.argv[1:4])
