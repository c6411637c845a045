"""How much of the seed-to-seed spread of a method is the evaluation's own noise?

    .venv/bin/python bench/seed_noise.py [--method erq+] [--bits 4/4] [--seeds 0 1 2] [--device cpu]

Quantizes the realistic fixture once per calibration seed, keeps which val images each result
classifies correctly, and for every pair of seeds prints the images on which exactly one of the
two is right. If two models were equally accurate on the whole image distribution, their top-1 on
these n val images would still differ, by sqrt(disagreements) / n in standard deviation (a
paired sign test): that is the spread that 1,000 val images cannot resolve. Results go to
bench/results/seed-noise-<method>-W<w>A<a>.json.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.accuracy import config_for, fixture  # noqa: E402
from erq_core.data import build_transform, calibration_loader, validation_loader  # noqa: E402
from erq_core.models import load_model  # noqa: E402
from erq_core.config import ErqConfig  # noqa: E402
from erq_core.pipeline import quantize  # noqa: E402


@torch.no_grad()
def correct_images(model: torch.nn.Module, loader, device: str) -> torch.Tensor:
    """One bool per val image: is its top-1 prediction right?"""
    model.eval()
    return torch.cat([model(images.to(device)).argmax(dim=-1).cpu() == labels for images, labels in loader])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="erq+", choices=["rtn", "repq", "erq", "erq+", "erq+R"])
    parser.add_argument("--bits", default="4/4")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    w_bits, a_bits = (int(b) for b in args.bits.split("/"))
    model_spec, dataset, _ = fixture("realistic")
    base = load_model(ErqConfig(model=model_spec, dataset=dataset), args.device)
    transform = build_transform(base.pretrained_cfg)
    validation = validation_loader(dataset, transform, 100)
    correct = {}
    for seed in args.seeds:
        config = config_for(args.method, model_spec, dataset, w_bits, a_bits, seed, None)
        model = copy.deepcopy(base.model)
        torch.manual_seed(seed)
        quantize(model, calibration_loader(dataset, transform, config.images_needed, config.batch_size, seed), config)
        correct[seed] = correct_images(model, validation, args.device)
        print(f"seed {seed}: top-1 {100 * correct[seed].float().mean():.1f}%", flush=True)
    n = len(next(iter(correct.values())))
    pairs = []
    for a, b in itertools.combinations(args.seeds, 2):
        only_a, only_b = int((correct[a] & ~correct[b]).sum()), int((correct[b] & ~correct[a]).sum())
        pairs.append({"seeds": [a, b], "only_first_right": only_a, "only_second_right": only_b,
                      "difference_points": round(100 * (only_a - only_b) / n, 2),
                      "evaluation_noise_std_points": round(100 * math.sqrt(only_a + only_b) / n, 2)})
        print(f"seeds {a} and {b}: {only_a} images right only with {a}, {only_b} only with {b}: top-1 differs by "
              f"{pairs[-1]['difference_points']:+.1f} points; evaluation noise alone: std "
              f"{pairs[-1]['evaluation_noise_std_points']:.1f} points", flush=True)
    result = {"method": args.method, "bits": args.bits, "val_images": n, "device": args.device,
              "top1": {seed: round(100 * float(c.float().mean()), 2) for seed, c in correct.items()}, "pairs": pairs}
    out = ROOT / "bench" / "results" / f"seed-noise-{args.method}-W{w_bits}A{a_bits}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
