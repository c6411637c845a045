"""`erq quantize` and `erq evaluate`: the paper's test_quant.py as a command.

    erq quantize --model deit_small --dataset /imagenet --w-bits 4 --a-bits 4 --coe 10000 \
                 --calib-size 32 --out runs/deit_small_w4a4

Errors a user can fix print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import NoReturn, Optional

from erq_core.config import DEFAULT_INT8_WEIGHTS, EXPORT_FORMATS, INT8_WEIGHTS, PRECISIONS, ErqConfig
from erq_core.config import fields as config_fields
from erq_core.errors import ErqError
from erq_core.options import add_config_options

USAGE_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _device_arg(value: str) -> str:
    if value not in ("cpu", "cuda") and not value.startswith("cuda:"):
        raise argparse.ArgumentTypeError(f"device must be cpu or cuda, got {value!r}")
    return value


def quantize_parser() -> argparse.ArgumentParser:
    """`erq quantize`'s options, generated from ErqConfig's fields (one home for names and bounds)."""
    p = OneLineParser(prog="erq quantize", description="Quantize a timm ViT / DeiT / Swin with ERQ.")
    add_config_options(p, [spec for spec in config_fields() if spec.option.cli], with_defaults=True)
    p.add_argument("--device", type=_device_arg, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="erq evaluate", description="Evaluate a saved quantized model folder.")
    p.add_argument("folder", help="output folder of erq quantize")
    p.add_argument("--dataset", required=True, help="ImageFolder root with val/")
    p.add_argument("--val-limit", "--val_limit", dest="val_limit", type=int, default=None)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=32)
    p.add_argument("--device", type=_device_arg, default=None)
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="float64: compute as the onnx-float64 export does, which onnxruntime then matches "
                        "image for image (default float32)")
    return p


def export_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="erq export", description="Write a saved quantized model in a standard format.")
    p.add_argument("folder", help="output folder of erq quantize")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="onnx: a model onnxruntime runs; onnx-float64: the same computed in float64, which "
                        "gives what erq evaluate --precision float64 gives, image for image; onnx-int8: integer "
                        "kernels (8-bit activations); onnx-w4: 4-bit weight kernels (8-bit linear inputs "
                        "quantized as erq does, other activations float)")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (21 or later: 4-bit tensors); default 21")
    p.add_argument("--int8-weights", choices=INT8_WEIGHTS, default=DEFAULT_INT8_WEIGHTS,
                   help="onnx-int8's 8-bit weights: signed (default) puts them on onnxruntime's u8s8 kernel, exact "
                        "on CPUs with VNNI and on ARM, and on other x86 CPUs when the session sets "
                        "session.x64quantprecision=1 (erq's own sessions do); exact keeps them on the u8u8 "
                        "kernel, exact on every CPU without that entry and about half as fast")
    p.add_argument("--out", default=None,
                   help="the file to write (default FOLDER/model.onnx, FOLDER/model-float64.onnx, "
                        "FOLDER/model-int8.onnx, FOLDER/model-w4.onnx)")
    return p


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("erq")
    if not quiet and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("erq: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _check_device(device: Optional[str]) -> None:
    import torch

    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise ErqError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")


def quantize_main(argv: list[str]) -> int:
    args = quantize_parser().parse_args(argv)
    options = vars(args).copy()
    out, device, quiet = options.pop("out"), options.pop("device"), options.pop("quiet")
    try:
        config = ErqConfig.from_dict({k: v for k, v in options.items() if v is not None}).validate()
        _setup_logging(quiet)
        from erq_core.progress import TqdmProgress
        from erq_core.runner import run

        _check_device(device)
        bars = TqdmProgress(enabled=None if not quiet else False)
        try:
            metrics = run(config, out, device=device, progress=bars)
        finally:
            bars.close()
    except ErqError as exc:
        return _fail("erq quantize", str(exc))
    summary = {k: metrics[k] for k in ("fp", "quantized", "n_val")}
    summary["seconds"] = metrics["seconds"]["total"]
    summary["out"] = str(out)
    print(json.dumps(summary))
    return 0


def evaluate_main(argv: list[str]) -> int:
    args = evaluate_parser().parse_args(argv)
    try:
        _setup_logging(False)
        from erq_core.progress import TqdmProgress
        from erq_core.runner import evaluate_quantized

        _check_device(args.device)
        bars = TqdmProgress()
        try:
            result = evaluate_quantized(args.folder, args.dataset, val_limit=args.val_limit,
                                        batch_size=args.batch_size, device=args.device, progress=bars,
                                        precision=args.precision)
        finally:
            bars.close()
    except ErqError as exc:
        return _fail("erq evaluate", str(exc))
    print(json.dumps(result))
    return 0


def export_main(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    try:
        from erq_core.onnx_export import export_format

        result = export_format(args.folder, args.format, args.out, opset=args.opset, int8_weights=args.int8_weights)
    except ErqError as exc:
        return _fail("erq export", str(exc))
    print(json.dumps({"out": str(result.path), "bytes": result.bytes, "opset": result.opset,
                      "weight_layers": result.weight_layers, "activation_quantizers": result.activation_quantizers,
                      "weight_code_types": result.weight_code_types}))
    return 0
