"""Size and onnxruntime latency of `erq export --format onnx` against the FP32 ONNX model.

For each case: `erq quantize --export onnx` (W4/A4 ERQ, 32 calibration images) in a fresh process,
the same full-precision model exported by torch.onnx.export, then both files' sizes and their
onnxruntime (CPU execution provider) latency at batch 1 and 32. On the fixtures (real weights and
data) also onnxruntime's top-1 against erq's and the largest logit difference.

    .venv/bin/python bench/export.py [--models deit_tiny deit_small] [--no-fixture]
                                     [--realistic bench/data/realistic] [--threads 2]
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ERQ = Path(sys.executable).parent / "erq"
FIXTURE_MODEL, FIXTURE_DATA = ROOT / "tests" / "fixtures" / "fmnist_vit", ROOT / "tests" / "fixtures" / "fmnist16"
VAL_LIMIT = 500


def quantize(model: str, dataset: Path, out: Path, evaluate: bool) -> dict:
    command = [str(ERQ), "quantize", "--model", model, "--dataset", str(dataset), "--w-bits", "4", "--a-bits", "4",
               "--calib-size", "32", "--device", "cpu", "--quiet", "--export", "onnx", "--out", str(out)]
    command += ["--val-limit", str(VAL_LIMIT)] if evaluate else ["--random-init", "--no-eval"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads((out / "metrics.json").read_text())


def fp32_onnx(model_spec: str, dataset: Path, random_init: bool, path: Path) -> None:
    """The full-precision model as torch.onnx.export writes it (same seed, so the same weights)."""
    from erq_core import ErqConfig
    from erq_core.models import load_model

    torch.manual_seed(0)
    loaded = load_model(ErqConfig(model=model_spec, dataset=str(dataset), random_init=random_init))
    size = loaded.pretrained_cfg.get("input_size") or [3, 224, 224]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(loaded.model, (torch.zeros(1, *size),), buffer, dynamo=False, opset_version=20,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    path.write_bytes(buffer.getvalue())


def session(path: Path, threads: int, fold_weights: bool = False):
    """`fold_weights`: onnxruntime dequantizes the constant weights once at load (its QDQ handling off)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if fold_weights:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ms(sess, shape: tuple[int, ...], batch: int) -> float:
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    runs = 20 if batch == 1 else 5
    for _ in range(2):
        sess.run(None, {"images": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {"images": x})
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 2)


def fidelity(folder: Path, dataset: Path, sess) -> dict:
    """onnxruntime's top-1 on the run's validation subset, and how far its logits are from erq's."""
    from erq_core import load_quantized
    from erq_core.data import build_transform, validation_loader

    config = json.loads((folder / "config.json").read_text())
    model = load_quantized(folder, "cpu")
    loader = validation_loader(dataset, build_transform(config["pretrained_cfg"]), 50, VAL_LIMIT)
    correct, seen, diffs = 0, 0, []
    for images, labels in loader:
        logits = sess.run(None, {"images": images.numpy()})[0]
        with torch.no_grad():
            expected = model(images).numpy()
        correct += int((logits.argmax(1) == labels.numpy()).sum())
        seen += len(labels)
        diffs.append(np.abs(logits - expected).max(axis=1))
    per_image = np.concatenate(diffs)
    return {"onnxruntime_top1": round(100 * correct / seen, 4), "max_logit_diff": float(per_image.max()),
            "images_above_1e-4": int((per_image >= 1e-4).sum()), "images": seen}


def run_case(name: str, model_spec: str, dataset: Path, random_init: bool, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        metrics = quantize(model_spec, dataset, folder, evaluate=not random_init)
        fp_path = Path(tmp) / "fp32.onnx"
        fp32_onnx(model_spec, dataset, random_init, fp_path)
        q_path = folder / "model.onnx"
        shape = tuple(json.loads((folder / "config.json").read_text())["pretrained_cfg"]["input_size"])
        result = {"case": name, "w_bits": 4, "a_bits": 4, "fp32_bytes": fp_path.stat().st_size,
                  "w4_bytes": q_path.stat().st_size, "export_seconds": metrics["seconds"].get("export_onnx")}
        result["size_ratio"] = round(result["w4_bytes"] / result["fp32_bytes"], 4)
        fp_sess, q_sess = session(fp_path, threads), session(q_path, threads)
        folded = session(q_path, threads, fold_weights=True)
        for batch in (1, 32):
            result[f"fp32_ms_batch{batch}"] = latency_ms(fp_sess, shape, batch)
            result[f"w4_ms_batch{batch}"] = latency_ms(q_sess, shape, batch)
            result[f"w4_folded_ms_batch{batch}"] = latency_ms(folded, shape, batch)
        if not random_init:
            result["erq_top1"] = metrics["quantized"]["top1"]
            result["fp_top1"] = metrics["fp"]["top1"]
            result.update(fidelity(folder, dataset, q_sess))
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["deit_tiny", "deit_small"])
    parser.add_argument("--no-fixture", action="store_true", help="skip the bundled fixture")
    parser.add_argument("--realistic", type=Path, default=None,
                        help="a built bench/realistic_fixture.py folder (model/ and data/)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "export.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run_case(m, m, FIXTURE_DATA, True, args.threads) for m in args.models]
    if not args.no_fixture:
        results.append(run_case("fixture", f"local-dir:{FIXTURE_MODEL}", FIXTURE_DATA, False, args.threads))
    if args.realistic:
        results.append(run_case("realistic fixture", f"local-dir:{args.realistic / 'model'}",
                                args.realistic / "data", False, args.threads))
    import onnxruntime

    report = {"machine": f"{platform.machine()}, {args.threads} onnxruntime threads",
              "onnxruntime": onnxruntime.__version__, "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| case | FP32 .onnx | W4 .onnx | ratio | FP32 ms b1 / b32 | W4 ms b1 / b32 | W4 folded ms b1 / b32 |")
    for r in results:
        print(f"| {r['case']} | {r['fp32_bytes'] / 2**20:.1f} MiB | {r['w4_bytes'] / 2**20:.2f} MiB | "
              f"1/{1 / r['size_ratio']:.1f} | {r['fp32_ms_batch1']} / {r['fp32_ms_batch32']} | "
              f"{r['w4_ms_batch1']} / {r['w4_ms_batch32']} | "
              f"{r['w4_folded_ms_batch1']} / {r['w4_folded_ms_batch32']} |")


if __name__ == "__main__":
    main()
