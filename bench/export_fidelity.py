"""How closely onnxruntime reproduces erq's evaluation, in float32 and in float64.

For a saved run, writes model.onnx and model-float64.onnx (unless present) and scores four
computations on the same val images: erq (torch, float32), onnxruntime on model.onnx, erq
--precision float64 and onnxruntime on model-float64.onnx. Prints one JSON line and appends it to
--results.

    .venv/bin/python bench/export_fidelity.py RUN_DIR DATASET [--val-limit 1000] [--label NAME]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from erq_core import load_quantized
from erq_core.data import build_transform, validation_loader
from erq_core.float64 import to_float64
from erq_core.onnx_export import EXPORT_FILES, export_onnx

RESULTS = Path(__file__).resolve().parent / "results" / "export-fidelity.jsonl"


def onnx_session(run: Path, export_format: str):
    import onnxruntime as ort

    file_name, precision = EXPORT_FILES[export_format]
    if not (run / file_name).exists():
        export_onnx(run, run / file_name, precision=precision)
    return ort.InferenceSession(str(run / file_name), providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("dataset")
    parser.add_argument("--val-limit", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--label", default=None, help="the run's name in the results (default: its folder)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    config = json.loads((args.run / "config.json").read_text())
    models = {"erq": load_quantized(args.run, "cpu").eval(), "erq_float64": to_float64(load_quantized(args.run, "cpu"))}
    sessions = {"onnxruntime": onnx_session(args.run, "onnx"),
                "onnxruntime_float64": onnx_session(args.run, "onnx-float64")}
    loader = validation_loader(args.dataset, build_transform(config["pretrained_cfg"]), args.batch_size,
                               args.val_limit)
    logits: dict[str, list] = {name: [] for name in ("erq", "onnxruntime", "erq_float64", "onnxruntime_float64")}
    seconds = dict.fromkeys(logits, 0.0)
    labels = []
    for images, y in loader:
        for name in logits:
            start = time.perf_counter()
            if name in models:
                with torch.no_grad():
                    out = models[name](images).numpy()
            else:
                out = sessions[name].run(None, {"images": images.numpy()})[0]
            seconds[name] += time.perf_counter() - start
            logits[name].append(out)
        labels.append(y.numpy())
    y = np.concatenate(labels)
    result = {"run": args.label or args.run.name, "method": config["quantization"]["method"],
              "w_bits": config["quantization"]["w_bits"], "a_bits": config["quantization"]["a_bits"],
              "images": int(len(y)), "threads": torch.get_num_threads()}
    joined = {name: np.concatenate(parts) for name, parts in logits.items()}
    for name, value in joined.items():
        result[f"top1_{name}"] = round(100 * float((value.argmax(1) == y).mean()), 2)
        result[f"ms_per_image_{name}"] = round(1000 * seconds[name] / len(y), 2)
    for erq_name, ort_name in (("erq", "onnxruntime"), ("erq_float64", "onnxruntime_float64")):
        diff = np.abs(joined[erq_name] - joined[ort_name]).max(axis=1)
        result[f"max_logit_diff_{ort_name}"] = float(diff.max())
        result[f"images_other_top1_{ort_name}"] = int((joined[erq_name].argmax(1) != joined[ort_name].argmax(1)).sum())
    print(json.dumps(result))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
