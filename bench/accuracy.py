"""Top-1 of FP, RTN, RepQ-ViT and ERQ on the bundled Fashion-MNIST ViT at W4/A4, W3/A4, W6/A6.

    .venv/bin/python bench/accuracy.py [--val-limit N]

Prints a table and writes bench/results/accuracy.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erq_core import ErqConfig, run  # noqa: E402
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL  # noqa: E402

BITS = [(4, 4), (3, 4), (6, 6), (2, 4), (4, 3)]  # the paper's three, then two harsher settings
METHODS = ["rtn", "repq", "erq"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val-limit", type=int, default=None, help="default: the whole val split")
    parser.add_argument("--coe", type=float, default=10000.0)
    args = parser.parse_args()
    logging.getLogger("erq").setLevel(logging.WARNING)
    rows, fp = [], None
    for w_bits, a_bits in BITS:
        for method in METHODS:
            config = ErqConfig(model=FIXTURE_MODEL, dataset=str(FIXTURE_DATASET), w_bits=w_bits, a_bits=a_bits,
                               method=method, coe=args.coe, calib_size=32, val_limit=args.val_limit)
            with tempfile.TemporaryDirectory() as out:
                metrics = run(config, out, device="cpu")
            fp = metrics["fp"]
            rows.append({"w_bits": w_bits, "a_bits": a_bits, "method": method,
                         "top1": metrics["quantized"]["top1"], "top5": metrics["quantized"]["top5"],
                         "seconds": metrics["seconds"]["total"]})
            print(f"W{w_bits}/A{a_bits} {method:<5} top-1 {rows[-1]['top1']:6.2f}%  "
                  f"(FP {fp['top1']:.2f}%, {rows[-1]['seconds']:.1f} s)", flush=True)
    result = {"model": "tests/fixtures/fmnist_vit (ViT, width 128, depth 4, patch 4, 16x16 Fashion-MNIST)",
              "n_val": metrics["n_val"], "calib_size": 32, "coe": args.coe, "fp": fp, "runs": rows}
    out = ROOT / "bench" / "results" / "accuracy.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
