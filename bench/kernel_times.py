"""onnxruntime's own account of where an ONNX model's time goes: the sum of its kernel times per run
(the session profiler), at batch 1 and 32, for several files side by side, with each file's ratio
to the first. It leaves out what wall-clock latency adds between kernels (dispatch, thread
hand-offs), which on a small virtual machine moves batch-1 medians by tens of percent from minute
to minute; kernel times themselves still move 10-20% between runs (docs/export.md).

    .venv/bin/python bench/kernel_times.py FP32.onnx erq.onnx peer.onnx [--threads 2] [--runs 10]
        [--out bench/results/kernel-times.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def kernel_times(path: Path, batch: int, threads: int, runs: int) -> dict:
    """Mean milliseconds per run summed over every node's kernel (the first run, which allocates, left
    out), and the five operator types with the most of it."""
    import onnxruntime as ort

    from erq_core.onnx_session import session_options

    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = f"/tmp/erq-kernel-times-{os.getpid()}"
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal((batch, *feed.shape[1:]), dtype=np.float32)
    for _ in range(runs + 1):
        session.run(None, {feed.name: x})
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    warm_up_end = min(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    by_op: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] > warm_up_end:
            by_op[event["args"]["op_name"]] += event["dur"]
    return {"kernel_ms": round(sum(by_op.values()) / runs / 1000, 2),
            "largest": {op: round(us / runs / 1000, 2) for op, us in by_op.most_common(5)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="ONNX files; ratios are to the first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = []
    for path in args.files:
        row = {"file": str(path)}
        for batch in (1, 32):
            measured = kernel_times(path, batch, args.threads, args.runs)
            row[f"kernel_ms_batch{batch}"] = measured["kernel_ms"]
            row[f"largest_batch{batch}"] = measured["largest"]
        results.append(row)
    for row in results:
        for batch in (1, 32):
            ratio = results[0][f"kernel_ms_batch{batch}"] / row[f"kernel_ms_batch{batch}"]
            row[f"speedup_batch{batch}"] = round(ratio, 3)
        print(f"{row['file']}: {row['kernel_ms_batch1']} ms / {row['kernel_ms_batch32']} ms "
              f"({row['speedup_batch1']}x / {row['speedup_batch32']}x)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "runs": args.runs, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
