"""Speed and memory of `erq quantize` on random-init DeiT models (no evaluation).

Runs the real command in a fresh process per case, so each peak RSS is that run's own, and
prints seconds per stage. Calibration images come from the bundled fixture's train split.

    .venv/bin/python bench/speed.py [--device cpu|cuda] [--models deit_tiny deit_small] [--calib 32 128]
                                    [--methods erq erq+]

The results file is rewritten after each case, so an interrupted run keeps what finished.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "tests" / "fixtures" / "fmnist16"
# `python -m erq_cli` from the checkout: runs without the `erq` script installed (on a bare GPU host too)
ERQ = [sys.executable, "-m", "erq_cli"]


def run_case(model: str, calib: int, device: str, method: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [*ERQ, "quantize", "--model", model, "--dataset", str(DATASET), "--random-init", "--no-eval",
                   "--w-bits", "4", "--a-bits", "4", "--method", method, "--calib-size", str(calib), "--device", device,
                   "--quiet", "--out", out]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    result = {"model": model, "method": method, "calib_size": calib, "device": device, "wall_seconds": round(wall, 2),
              "stage_seconds": metrics["seconds"], "peak_rss_bytes": metrics["peak_memory_bytes"]}
    if "peak_gpu_memory_bytes" in metrics:
        result["peak_gpu_memory_bytes"] = metrics["peak_gpu_memory_bytes"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small"])
    parser.add_argument("--calib", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--methods", nargs="+", default=["erq"])
    args = parser.parse_args()
    out = ROOT / "bench" / "results" / f"speed-{args.device.split(':')[0]}.json"
    results = []
    for method in args.methods:
        for model in args.models:
            for calib in args.calib:
                r = run_case(model, calib, args.device, method)
                results.append(r)
                out.write_text(json.dumps(results, indent=2) + "\n")
                stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items() if k != "total")
                gpu = f", peak GPU {r['peak_gpu_memory_bytes'] / 2**30:.2f} GiB" if "peak_gpu_memory_bytes" in r else ""
                print(f"{method:<4} {model:<11} calib {calib:>4} {args.device}: {r['wall_seconds']:6.1f} s wall, "
                      f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB{gpu}  [{stages}]", flush=True)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
