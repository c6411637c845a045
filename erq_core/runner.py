"""One whole run, as the CLI and the worker do it: load, quantize, evaluate, save.

`run(config, out_dir)` writes quantized.safetensors, config.json and metrics.json into out_dir
and returns the metrics. Running it twice with the same config and folder gives the same files.
"""
from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from erq_core.config import ErqConfig
from erq_core.data import build_transform, calibration_loader, check_dataset, validation_loader
from erq_core.evaluate import accuracy
from erq_core.checkpoint import METRICS_FILE, read_config, save_quantized, load_quantized, write_json
from erq_core.float64 import to_float64, with_precision
from erq_core.models import load_model
from erq_core.pipeline import Progress, quantize
from erq_core.precision import model_precision
from erq_core.report import write_report

log = logging.getLogger("erq")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _loader_workers(device: str) -> int:
    # On a GPU, decoding must keep up with the model; on CPU the model is the bottleneck.
    return 4 if device.startswith("cuda") else 0


def peak_memory_bytes(device: str) -> dict[str, int]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peaks = {"peak_memory_bytes": rss if sys.platform == "darwin" else rss * 1024}
    if device.startswith("cuda"):
        peaks["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    return peaks


def run(config: ErqConfig, out_dir: str | Path, *, device: Optional[str] = None,
        progress: Optional[Progress] = None, loader_workers: Optional[int] = None) -> dict:
    """Quantize (and evaluate) as `config` says; write the result folder; return the metrics.
    `loader_workers`: data-loader processes (default: 4 on a GPU, none on the CPU)."""
    config.validate()
    device = device or default_device()
    progress = progress or (lambda stage, done, total: None)
    seconds: dict[str, float] = {}
    torch.manual_seed(config.seed)
    check_dataset(config.dataset)

    start = time.perf_counter()
    progress("load_model", 0, 1)
    loaded = load_model(config, device)
    progress("load_model", 1, 1)
    seconds["load_model"] = round(time.perf_counter() - start, 3)
    log.info("model %s (%s) on %s", config.model, loaded.source["architecture"], device)
    if config.rotate:  # refuse a model --rotate cannot rotate now, not after evaluating FP
        from erq_core.rotation import check_rotatable

        check_rotatable(loaded.model)

    transform = build_transform(loaded.pretrained_cfg)
    workers = _loader_workers(device) if loader_workers is None else loader_workers
    calibration = calibration_loader(config.dataset, transform, config.images_needed, config.batch_size,
                                     config.seed, workers)
    validation = (validation_loader(config.dataset, transform, config.batch_size, config.val_limit, workers)
                  if config.evaluate else None)

    fp = {"top1": None, "top5": None}
    n_val = None
    if validation is not None:
        start = time.perf_counter()
        result = accuracy(loaded.model, validation, device, progress, "evaluate_fp")
        fp, n_val = {"top1": result["top1"], "top5": result["top5"]}, result["n"]
        seconds["evaluate_fp"] = round(time.perf_counter() - start, 3)
        log.info("full precision: top-1 %.2f%%, top-5 %.2f%% on %d images", fp["top1"], fp["top5"], n_val)

    if config.max_drop is None:
        quantized = quantize(loaded.model, calibration, config, progress)
    else:
        from erq_core.budget import heldout_batches, quantize_with_budget

        heldout = heldout_batches(config.dataset, transform, config.images_needed, config.seed, config.batch_size)
        quantized = quantize_with_budget(loaded.model, calibration, heldout, config, progress)
    seconds.update(quantized.seconds)

    quant = {"top1": None, "top5": None}
    if validation is not None:
        start = time.perf_counter()
        result = accuracy(quantized.model, validation, device, progress, "evaluate")
        quant = {"top1": result["top1"], "top5": result["top5"]}
        seconds["evaluate"] = round(time.perf_counter() - start, 3)
        log.info("W%d/A%d %s: top-1 %.2f%%, top-5 %.2f%%", config.w_bits, config.a_bits, config.method,
                 quant["top1"], quant["top5"])

    start = time.perf_counter()
    progress("save", 0, 1)
    metrics = {"fp": fp, "quantized": quant, "n_val": n_val, "seconds": seconds, **peak_memory_bytes(device),
               "device": device, "layers": quantized.layers, "precision": model_precision(quantized.model),
               "act_granularity": config.act_granularity}
    if quantized.budget is not None:
        metrics["budget"] = quantized.budget
    save_quantized(quantized, out_dir, loaded.source, loaded.pretrained_cfg)
    seconds["save"] = round(time.perf_counter() - start, 3)
    progress("save", 1, 1)
    if "onnx-float64" in config.export and validation is not None:
        start = time.perf_counter()
        metrics["quantized_float64"] = _evaluate_float64(out_dir, validation, device, progress)
        seconds["evaluate_float64"] = round(time.perf_counter() - start, 3)
    for export_format in config.export:
        start = time.perf_counter()
        progress("export", 0, 1)
        path = _export(out_dir, export_format, config.int8_weights)
        seconds[f"export_{export_format.replace('-', '_')}"] = round(time.perf_counter() - start, 3)
        progress("export", 1, 1)
        if validation is not None:
            start = time.perf_counter()
            metrics.setdefault("onnxruntime", {})[export_format] = _evaluate_onnx(path, validation, progress)
            seconds[f"evaluate_{export_format.replace('-', '_')}"] = round(time.perf_counter() - start, 3)
    metrics["seconds"]["total"] = round(sum(v for k, v in seconds.items() if k != "total"), 3)
    write_json(Path(out_dir) / METRICS_FILE, metrics)
    write_report(out_dir)
    return metrics


def _evaluate_float64(out_dir: str | Path, validation, device: str, progress: Progress) -> dict:
    """Top-1 / top-5 in float64: the numbers model-float64.onnx reproduces. From the saved folder,
    as a user evaluates it."""
    result = accuracy(to_float64(load_quantized(out_dir, device)), validation, device, progress, "evaluate_float64")
    log.info("in float64: top-1 %.2f%%, top-5 %.2f%%", result["top1"], result["top5"])
    return {"top1": result["top1"], "top5": result["top5"]}


def _export(out_dir: str | Path, export_format: str, int8_weights: str) -> Path:
    from erq_core.onnx_export import export_format as write

    return write(out_dir, export_format, int8_weights=int8_weights).path


def _evaluate_onnx(path: Path, validation, progress: Progress) -> dict:
    """The exported file's own top-1 / top-5: onnxruntime (CPU provider) on the val images."""
    from erq_core.onnx_evaluate import onnx_accuracy

    result = onnx_accuracy(path, validation, progress)
    log.info("%s in onnxruntime: top-1 %.2f%%, top-5 %.2f%%", path.name, result["top1"], result["top5"])
    return {"top1": result["top1"], "top5": result["top5"]}


def evaluate_quantized(folder: str | Path, dataset: str | Path, *, val_limit: Optional[int] = None,
                       batch_size: int = 32, device: Optional[str] = None,
                       progress: Optional[Progress] = None, precision: str = "float32") -> dict:
    """Top-1 / top-5 of a saved quantized model on ROOT/val (the same val_limit subset as `run`).
    precision "float64": as the float64 ONNX export computes it (erq_core.float64)."""
    device = device or default_device()
    config = read_config(folder)
    model = with_precision(load_quantized(folder, device), precision)
    transform = build_transform(config["pretrained_cfg"])
    loader = validation_loader(dataset, transform, batch_size, val_limit, _loader_workers(device))
    return accuracy(model, loader, device, progress, "evaluate")
