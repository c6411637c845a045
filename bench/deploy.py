"""Deployment formats against the peers, side by side: top-1, latency, file size (bench/results/deploy.json).

For the realistic fixture (a real DINOv2 ViT-S/14 at 112 px, Fashion-MNIST) and deit_small (random
init: speed and size only), in one run on one machine, onnxruntime's CPU provider:
- FP32: the full-precision model as torch.onnx.export writes it;
- erq: `erq export --format onnx-int8` of erq+ W8/A8 and W4/A8 runs (the W8/A8 one also with
  `--int8-weights exact`: 8-bit weights on the u8u8 kernel), `--format onnx-w4` of erq+ W4/A8 and W4/A4
  runs (the runs are made by `erq quantize` into --work if they are not there);
- the peers, on the same FP32 ONNX: onnxruntime.quantization.quantize_static (QDQ, per-channel INT8
  weights, UINT8 activations, MinMax and Percentile calibration on erq+'s own 192 calibration
  images), onnxruntime's MatMulNBits 4-bit weight-only quantizer (block 32, asymmetric, accuracy
  level 4: the settings of erq's onnx-w4; and at its own defaults: block 128, float compute; both
  need `pip install -e '.[bench]'`) and, when `nncf` and `openvino` import (a bench-only optional
  peer, not a dependency of erq: `pip install nncf openvino`), NNCF's INT8 post-training
  quantization (transformer preset) run by OpenVINO's CPU plugin.
Per row: top-1 on the 1,000 val images (every seed found in --work for erq's rows), latency at batch
1 and 32 (median of --repeats runs after a warm-up; the models take turns run by run, so a load on
the shared machine falls on all of them alike) and the file size, with ratios to FP32.
erq's seed 0 runs are made in --work when missing (`erq quantize`, as ERQ_ROWS say); further seeds
(WORK/realistic_w8a8_s1, ...) are scored when they are there.

    .venv/bin/python bench/deploy.py --realistic /work/fixtures/realistic --work /tmp/deploy [--threads 2]
    [--cases realistic --rows "erq+ W8/A8 onnx-int8" "quantize_static Percentile" --out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.export import fp32_onnx  # noqa: E402

ERQ = Path(sys.executable).parent / "erq"
CALIB_SEED = 0
ERQ_ROWS = (("erq+ W8/A8 onnx-int8", 8, 8, "onnx-int8"),
            ("erq+ W8/A8 onnx-int8 --int8-weights exact", 8, 8, "onnx-int8-exact"),
            ("erq+ W4/A8 onnx-int8", 4, 8, "onnx-int8"),
            ("erq+ W4/A8 onnx-w4", 4, 8, "onnx-w4"), ("erq+ W4/A4 onnx-w4", 4, 4, "onnx-w4"))
# the exact row: `erq export --format onnx-int8 --int8-weights exact` (8-bit weights UINT8, the u8u8 kernel)
# onnxruntime's 4-bit weight-only quantizer (its RTN grid per block): row name -> its settings
NBITS_ROWS = {
    "MatMulNBits 4-bit weight-only": {"block_size": 32, "accuracy_level": 4},  # its most accurate common block
    "MatMulNBits 4-bit weight-only (block 128, int8 compute: onnx-w4's kernel)": {"block_size": 128,
                                                                                 "accuracy_level": 4},
    "MatMulNBits 4-bit weight-only (its defaults: block 128, float compute)": {},
}
FILES = {"onnx-int8": "model-int8.onnx", "onnx-int8-exact": "model-int8-exact.onnx", "onnx-w4": "model-w4.onnx"}


# ---------------------------------------------------------------- the models


def erq_run(work: Path, case: str, model: str, dataset: Path, w_bits: int, a_bits: int, seed: int,
            random_init: bool) -> Path:
    """The erq+ run folder (made with `erq quantize` when missing)."""
    folder = work / f"{case}_w{w_bits}a{a_bits}_s{seed}"
    if not (folder / "config.json").exists():
        command = [str(ERQ), "quantize", "--model", model, "--dataset", str(dataset), "--method", "erq+",
                   "--w-bits", str(w_bits), "--a-bits", str(a_bits), "--seed", str(seed), "--device", "cpu",
                   "--quiet", "--out", str(folder)]
        command += ["--random-init", "--no-eval", "--calib-size", "8"] if random_init else []
        subprocess.run(command, check=True, capture_output=True, text=True)
    return folder


def erq_file(folder: Path, fmt: str) -> Path:
    from erq_core.onnx_export import export_format

    path = folder / FILES[fmt]
    if not path.exists():
        exact = fmt == "onnx-int8-exact"
        export_format(folder, "onnx-int8" if exact else fmt, path, int8_weights="exact" if exact else "signed")
    return path


def calibration_images(dataset: Path, pretrained_cfg: dict, count: int) -> np.ndarray:
    """The images erq+ calibrates on (its default 192, seed 0), for the peers' calibration."""
    from erq_core.data import build_transform, calibration_loader

    loader = calibration_loader(dataset, build_transform(pretrained_cfg), count, 32, CALIB_SEED, 0)
    return torch.cat([batch[0] if isinstance(batch, (list, tuple)) else batch for batch in loader]).numpy()


def quantize_static_peer(fp32: Path, out: Path, images: np.ndarray, method: str) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": images[i:i + 16]} for i in range(0, len(images), 16)])

        def get_next(self):
            return next(self.batches, None)

    if not out.exists():
        quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
    return out


def nbits_peer(fp32: Path, out: Path, settings: dict) -> Path:
    """onnxruntime's 4-bit weight-only model of the FP32 file, at `settings` (its defaults when empty)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if not out.exists():
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), is_symmetric=False, **settings)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def nncf_peer(fp32: Path, out: Path, images: np.ndarray) -> Optional[Path]:
    """NNCF INT8 (transformer preset) of the FP32 ONNX model, or None when nncf/openvino are absent."""
    try:
        import nncf
        import onnx
        import openvino  # noqa: F401
    except ImportError:
        return None
    if not out.exists():
        dataset = nncf.Dataset([{"images": images[i:i + 1]} for i in range(len(images))])
        quantized = nncf.quantize(onnx.load(str(fp32)), dataset, model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(images))
        onnx.save(quantized, str(out))
    return out


# ---------------------------------------------------------------- running them


def onnxruntime_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """Every file in erq's session: full optimisation, and exact int8 products on x86 CPUs without VNNI
    (the peers' INT8 weights too: on such a CPU every row's products are exact, at the u8u8 kernel's speed)."""
    import onnxruntime as ort

    from erq_core.onnx_session import session_options

    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x})[0]


def openvino_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})
    return lambda x: compiled(x)[0]


def val_logits(run: Callable[[np.ndarray], np.ndarray], dataset: Path, pretrained_cfg: dict
               ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) over the val images."""
    from erq_core.data import build_transform, validation_loader

    logits, labels = [], []
    for images, batch_labels in validation_loader(dataset, build_transform(pretrained_cfg), 50):
        logits.append(run(images.numpy()))
        labels.append(batch_labels.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def scores(logits: np.ndarray, labels: np.ndarray, fp_logits: np.ndarray) -> dict[str, float]:
    """top-1, and two finer measures of how far a file is from FP32 on the same images: the mean
    KL(FP32 || file) of the class distributions, and the share of images whose top class is FP32's.
    top-1 on 1,000 images moves by about 0.4 points with float rounding alone (docs/accuracy.md)."""
    fp_log = torch.from_numpy(fp_logits).double().log_softmax(-1)
    log = torch.from_numpy(logits).double().log_softmax(-1)
    kl = float((fp_log.exp() * (fp_log - log)).sum(-1).mean())
    return {"top1": round(100 * float((logits.argmax(1) == labels).mean()), 2),
            "kl_to_fp": round(kl, 5),
            "agree_fp": round(100 * float((logits.argmax(1) == fp_logits.argmax(1)).mean()), 2)}


def latencies(runners: dict[str, Callable], shape: tuple[int, ...], batch: int, repeats: int) -> dict[str, float]:
    """Median ms per model; the models take turns run by run (a load on the machine falls on all)."""
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    for run in runners.values():
        run(x)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
    return {name: round(1000 * statistics.median(t), 2) for name, t in times.items()}


def bench_case(case: str, model: str, dataset: Path, random_init: bool, work: Path, threads: int,
               repeats: int, seeds: int, only: Optional[list[str]] = None) -> list[dict]:
    """The rows of one model (`only`: those named, FP32 always; None: all)."""
    from erq_core.checkpoint import read_config

    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / f"{case}_fp32.onnx"
    if not fp32.exists():
        fp32_onnx(model, dataset, random_init, fp32)
    # seed 0 is made when missing; the further seeds (up to `seeds`) are scored when their runs are there
    def wanted(row: str) -> bool:
        return only is None or row in only

    runs = {(w, a): [erq_run(work, case, model, dataset, w, a, 0, random_init)]
            + [work / f"{case}_w{w}a{a}_s{seed}" for seed in range(1, seeds)
               if (work / f"{case}_w{w}a{a}_s{seed}" / "metrics.json").exists()]
            for w, a in sorted({(w, a) for name, w, a, _ in ERQ_ROWS if wanted(name)} | {(8, 8)})
            if not (random_init and a == 4)}
    pretrained_cfg = read_config(runs[(8, 8)][0])["pretrained_cfg"]
    shape = tuple(pretrained_cfg["input_size"])
    images = calibration_images(dataset, pretrained_cfg, 192 if not random_init else 8)
    rows: dict[str, dict] = {"FP32": {"path": fp32, "runtime": "onnxruntime"}}
    for name, w, a, fmt in ERQ_ROWS:
        if random_init and (w, a, fmt) == (4, 4, "onnx-w4"):  # the W4/A8 row's graph: activations are float
            continue
        if not wanted(name):
            continue
        rows[name] = {"path": erq_file(runs[(w, a)][0], fmt), "runtime": "onnxruntime",
                      "seed_paths": [erq_file(folder, fmt) for folder in runs[(w, a)]],
                      "erq_top1": [json.loads((f / "metrics.json").read_text())["quantized"]["top1"]
                                   for f in runs[(w, a)] if not random_init]}
    for method in ("MinMax", "Percentile"):
        if wanted(f"quantize_static {method}"):
            rows[f"quantize_static {method}"] = {
                "path": quantize_static_peer(fp32, work / f"{case}_qdq_{method.lower()}.onnx", images, method),
                "runtime": "onnxruntime"}
    for name, settings in NBITS_ROWS.items():
        if wanted(name):
            tag = "_".join(f"{k}{v}" for k, v in settings.items()) or "defaults"
            path = nbits_peer(fp32, work / f"{case}_nbits_{tag}.onnx", settings)
            rows[name] = {"path": path, "runtime": "onnxruntime"}
    nncf_path = nncf_peer(fp32, work / f"{case}_nncf_int8.onnx", images) if wanted("NNCF INT8 (OpenVINO)") else None
    if nncf_path is not None:
        rows["NNCF INT8 (OpenVINO)"] = {"path": nncf_path, "runtime": "openvino"}
    runner = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner}
    results = []
    fp_logits: Optional[np.ndarray] = None
    for name, row in rows.items():
        result = {"case": case, "row": name, "runtime": row["runtime"], "bytes": row["path"].stat().st_size}
        if not random_init:
            paths = row.get("seed_paths") or [row["path"]]
            per_seed = []
            for path in paths:
                logits, labels = val_logits(runner[row["runtime"]](path, threads), dataset, pretrained_cfg)
                fp_logits = logits if fp_logits is None else fp_logits  # the FP32 row comes first
                per_seed.append(scores(logits, labels, fp_logits))
            for key in ("top1", "kl_to_fp", "agree_fp"):
                result[f"{key}_per_seed"] = [seed[key] for seed in per_seed]
                result[key] = round(statistics.mean(result[f"{key}_per_seed"]), 5 if key == "kl_to_fp" else 2)
            if row.get("erq_top1"):
                result["erq_top1_per_seed"] = row["erq_top1"]
        print(json.dumps(result), flush=True)
        results.append(result)
    runners = {name: runner[row["runtime"]](row["path"], threads) for name, row in rows.items()}
    for batch in (1, 32):
        for name, ms in latencies(runners, shape, batch, repeats).items():
            next(r for r in results if r["row"] == name)[f"ms_batch{batch}"] = ms
    fp = results[0]
    for result in results:
        result["size_ratio"] = round(result["bytes"] / fp["bytes"], 4)
        for batch in (1, 32):
            result[f"speedup_batch{batch}"] = round(fp[f"ms_batch{batch}"] / result[f"ms_batch{batch}"], 3)
    return results


def table(results: list[dict]) -> str:
    lines = ["| model | row | top-1 (mean of seeds) | KL to FP32 / same top class | ms batch 1 | ms batch 32 | "
             "speed vs FP32 b1 / b32 | size | size vs FP32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        seeds = r.get("top1_per_seed", [])
        acc = "-" if "top1" not in r else (f"{r['top1']}" + (f" ({' / '.join(map(str, seeds))})" if len(seeds) > 1
                                                              else ""))
        closeness = "-" if "kl_to_fp" not in r else f"{r['kl_to_fp']:.4f} / {r['agree_fp']:.1f}%"
        lines.append(f"| {r['case']} | {r['row']} | {acc} | {closeness} | {r['ms_batch1']} | {r['ms_batch32']} | "
                     f"{r['speedup_batch1']:.2f}x / {r['speedup_batch32']:.2f}x | {r['bytes'] / 2**20:.1f} MiB | "
                     f"1/{1 / r['size_ratio']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--realistic", type=Path, required=True, help="the realistic fixture (model/ and data/)")
    parser.add_argument("--work", type=Path, required=True, help="runs, exports and peers' files (kept)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of each runtime")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model and batch size")
    parser.add_argument("--seeds", type=int, default=3, help="erq+ seeds scored on the realistic fixture "
                                                             "(seed 0 is made; others are used when in --work)")
    parser.add_argument("--cases", nargs="*", default=["realistic", "deit_small"], choices=["realistic", "deit_small"],
                        help="which models (the results of the others already in --out are kept)")
    parser.add_argument("--rows", nargs="*", default=None,
                        help="only these rows (names as in the table; FP32 always), e.g. to re-time erq's "
                             "int8 rows against FP32 and a peer; --out then gets these rows alone")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "deploy.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = json.loads(args.out.read_text())["results"] if args.out.exists() and args.rows is None else []
    results = [r for r in kept if r["case"] not in args.cases]
    if "realistic" in args.cases:
        results += bench_case("realistic", f"local-dir:{args.realistic / 'model'}", args.realistic / "data", False,
                              args.work, args.threads, args.repeats, args.seeds, args.rows)
    if "deit_small" in args.cases:
        results += bench_case("deit_small", "deit_small", args.realistic / "data", True, args.work, args.threads,
                              args.repeats, 1, args.rows)
    results.sort(key=lambda r: r["case"] != "realistic")
    import onnxruntime

    from erq_core.onnx_session import EXACT_INT8_ENTRY, VNNI_FLAGS, cpu_flags, needs_exact_int8_entry

    vnni = sorted((cpu_flags() or frozenset()) & VNNI_FLAGS) or ["no VNNI"]
    machine = (f"{platform.machine()}, {platform.processor() or 'cpu'} ({', '.join(vnni)}), {os.cpu_count()} cores; "
               f"{args.threads} threads per runtime")
    report = {"machine": machine, "onnxruntime": onnxruntime.__version__,
              "session_entries": {EXACT_INT8_ENTRY: "1"} if needs_exact_int8_entry() else {},
              "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
