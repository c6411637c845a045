"""Speed and memory of `erq quantize` on random-init DeiT models (no evaluation).

Runs the real command in a fresh process per case and prints, for each run, the seconds per
stage, the whole command's wall and CPU seconds and its peak RSS (ru_maxrss of the child).
Calibration images come from the bundled fixture's train split.

    .venv/bin/python bench/speed.py [--device cpu|cuda] [--models deit_tiny deit_small] [--calib 32 128]
                                    [--methods erq erq+] [--repeats N]

Before and after: `--baseline-checkout DIR` runs the same cases with the code of another checkout
(for example `git worktree add /tmp/base main`), alternating baseline and this checkout run by run
(A B A B ...), and prints the medians and their ratio; on a shared machine only figures measured
side by side compare. `--baseline FILE` instead prints a results file written earlier beside
these runs (a figure from the same session, not from another day).

The results file is rewritten after each run, so an interrupted run keeps what finished.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "tests" / "fixtures" / "fmnist16"


def run_case(model: str, calib: int, device: str, method: str, checkout: Path = ROOT) -> dict:
    """One `erq quantize` in a fresh process, with the code of `checkout` (`python -m erq_cli` from
    its root imports its erq_core: it runs without the `erq` script installed, on a bare GPU host too)."""
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryFile() as stderr:
        command = [sys.executable, "-m", "erq_cli", "quantize", "--model", model, "--dataset", str(DATASET),
                   "--random-init", "--no-eval", "--w-bits", "4", "--a-bits", "4", "--method", method,
                   "--calib-size", str(calib), "--device", device, "--quiet", "--out", out]
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=checkout, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage: CPU seconds and peak RSS
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed in {checkout}:\n{stderr.read().decode()[-3000:]}")
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    result = {"checkout": str(checkout), "model": model, "method": method, "calib_size": calib, "device": device,
              "wall_seconds": round(wall, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
              "stage_seconds": metrics["seconds"],
              "peak_rss_bytes": usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)}
    if "peak_gpu_memory_bytes" in metrics:
        result["peak_gpu_memory_bytes"] = metrics["peak_gpu_memory_bytes"]
    return result


def describe(label: str, r: dict) -> str:
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items() if k != "total")
    gpu = f", peak GPU {r['peak_gpu_memory_bytes'] / 2**30:.2f} GiB" if "peak_gpu_memory_bytes" in r else ""
    return (f"{label:<8} {r['method']:<4} {r['model']:<11} calib {r['calib_size']:>4} {r['device']}: "
            f"{r['wall_seconds']:6.1f} s wall, {r['cpu_seconds']:6.1f} s CPU, "
            f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB{gpu}  [{stages}]")


def same_case(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("model", "method", "calib_size", "device"))


def summarize(runs: list[dict]) -> list[dict]:
    """Per case: medians of baseline and current runs and current / baseline."""
    summary = []
    for case in [r for r in runs if r["label"] == "current"]:
        if any(same_case(case, s) for s in summary):
            continue
        row = {k: case[k] for k in ("model", "method", "calib_size", "device")}
        for label in ("baseline", "current"):
            mine = [r for r in runs if r["label"] == label and same_case(r, case)]
            if not mine:
                continue
            row[label] = {"runs": len(mine),
                          "wall_seconds": statistics.median(r["wall_seconds"] for r in mine),
                          "cpu_seconds": statistics.median(r["cpu_seconds"] for r in mine),
                          "peak_rss_bytes": int(statistics.median(r["peak_rss_bytes"] for r in mine)),
                          "stage_seconds": {k: round(statistics.median(r["stage_seconds"].get(k, 0.0) for r in mine), 3)
                                            for k in mine[0]["stage_seconds"]}}
        if "baseline" in row:
            row["ratio"] = {k: round(row["current"][k] / row["baseline"][k], 3)
                            for k in ("wall_seconds", "cpu_seconds", "peak_rss_bytes")}
        summary.append(row)
    return summary


def print_summary(summary: list[dict]) -> None:
    for row in summary:
        print(f"\n{row['method']} {row['model']} calib {row['calib_size']} {row['device']}: medians")
        for label in ("baseline", "current"):
            if label in row:
                m = row[label]
                stages = ", ".join(f"{k} {v:.1f}" for k, v in m["stage_seconds"].items() if k != "total")
                print(f"  {label:<8} ({m['runs']} runs) {m['wall_seconds']:6.1f} s wall, {m['cpu_seconds']:6.1f} s CPU, "
                      f"peak RSS {m['peak_rss_bytes'] / 2**30:.2f} GiB  [{stages}]")
        if "ratio" in row:
            r = row["ratio"]
            print(f"  current / baseline: wall {r['wall_seconds']:.2f}, CPU {r['cpu_seconds']:.2f}, "
                  f"peak RSS {r['peak_rss_bytes']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small"])
    parser.add_argument("--calib", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--methods", nargs="+", default=["erq"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of each case (default 1; 3 with a baseline checkout)")
    parser.add_argument("--baseline-checkout", type=Path, help="another checkout to run alternately with this one")
    parser.add_argument("--baseline", type=Path, help="a results file of this script to compare with")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/speed-DEVICE.json)")
    args = parser.parse_args()
    out = args.out or ROOT / "bench" / "results" / f"speed-{args.device.split(':')[0]}.json"
    repeats = args.repeats or (3 if args.baseline_checkout else 1)
    runs: list[dict] = []
    if args.baseline:
        runs += [dict(r, label="baseline") for r in json.loads(args.baseline.read_text())["runs"]]
    sides = [("baseline", args.baseline_checkout.resolve()), ("current", ROOT)] if args.baseline_checkout else \
        [("current", ROOT)]
    header = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "threads": os.environ.get("OMP_NUM_THREADS"),
              "command": " ".join(sys.argv[1:])}
    for method in args.methods:
        for model in args.models:
            for calib in args.calib:
                for _ in range(repeats):
                    for label, checkout in sides:  # A B A B ...: both see the same load
                        r = dict(run_case(model, calib, args.device, method, checkout), label=label)
                        runs.append(r)
                        out.write_text(json.dumps({**header, "runs": runs, "summary": summarize(runs)}, indent=2) + "\n")
                        print(describe(label, r), flush=True)
    print_summary(summarize(runs))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
