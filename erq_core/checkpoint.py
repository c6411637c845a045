"""Quantized checkpoints: save a QuantizedModel to a folder, load it back as a runnable model.

The folder holds `quantized.safetensors` (packed integer weight codes with per-channel scales and
zero points, activation-quantizer parameters, and the parameters that stay in full precision)
and `config.json` (the ErqConfig, the model source, the quantized layout and package versions).
Every file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from erq_core.errors import CheckpointError
from erq_core.files import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE
from erq_core.precision import apply_precision, model_precision
from erq_core.qmodules import activation_quantizers, convert_model, set_quant_state, weight_layers
from erq_core.rotation import install_online_hadamards, online_hadamards

FORMAT = "erq-quantized/1"
CODES_SUFFIX = ".weight_codes"


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) packed into a little-endian bit stream of bytes."""
    flat = codes.reshape(-1).cpu().numpy().astype(np.uint8)
    bit_planes = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(bit_planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    stream = np.unpackbits(packed.cpu().numpy(), bitorder="little")[: count * bits]
    planes = stream.reshape(count, bits).astype(np.int64)
    return torch.from_numpy((planes << np.arange(bits)).sum(axis=1))


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full or failing volume leaves no partial file behind
        raise


def write_json(path: Path, payload: Any) -> None:
    write_atomic(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("erq", "torch", "torchvision", "timm", "safetensors", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def quantized_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors to save (weights as packed codes) and each weight layer's layout."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.endswith(".calibrated")}
    layout = {}
    for name, layer in weight_layers(model):
        quantizer = layer.weight_quantizer
        codes = quantizer.codes(layer.weight.detach())
        del state[f"{name}.weight"]
        state[f"{name}{CODES_SUFFIX}"] = pack_codes(codes, quantizer.bits)
        layout[name] = {"shape": list(layer.weight.shape), "bits": quantizer.bits, "groups": quantizer.groups,
                        "has_bias": layer.bias is not None}
    return state, layout


def save_quantized(quantized, out_dir: str | Path, source: dict, pretrained_cfg: dict,
                   metrics: Optional[dict] = None) -> Path:
    """Write quantized.safetensors, config.json (and metrics.json when given) into out_dir."""
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, layout = quantized_state(quantized.model)
    config = quantized.config
    write_atomic(out / WEIGHTS_FILE, save(state, metadata={"format": FORMAT}))
    write_json(out / CONFIG_FILE, {
        "format": FORMAT,
        "erq_config": config.to_dict(),
        "model_source": source,
        "pretrained_cfg": pretrained_cfg,
        "quantization": {
            "w_bits": config.w_bits,
            "a_bits": config.a_bits,
            "method": config.method,
            "log_sqrt2_softmax": config.method_spec.reparameterized,
            "act_granularity": config.act_granularity,
            "norm_linear_pairs": quantized.norm_linear_pairs,
            "two_part_layers": quantized.two_part_layers,
            "layers": layout,
            # every layer's bit widths: a --max-drop run keeps some at 8 bits
            "precision": model_precision(quantized.model),
            # --rotate's online Hadamard modules (the rest of the rotation is in the saved weights)
            "online_hadamard": online_hadamards(quantized.model),
        },
        "versions": package_versions(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    if metrics is not None:
        write_json(out / METRICS_FILE, metrics)
    return out


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a quantized model folder: {CONFIG_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {config.get('format')!r} (expected {FORMAT!r})")
    return config


def load_quantized(folder: str | Path, device: Optional[str | torch.device] = None) -> nn.Module:
    """Rebuild the runnable quantized model saved in `folder` (eval mode, quantization on)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from erq_core.models import build_architecture

    config = read_config(folder)
    q = config["quantization"]
    model = build_architecture(config["model_source"])
    install_online_hadamards(model, q.get("online_hadamard", {}))
    convert_model(model, q["a_bits"], q["w_bits"], set(), set(q["two_part_layers"]), q["log_sqrt2_softmax"],
                  q.get("act_granularity", "tensor"))  # older folders: per-tensor
    apply_precision(model, q.get("precision", []))  # older folders hold one bit width for all
    try:
        state = load_file(str(Path(folder) / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{Path(folder) / WEIGHTS_FILE} is not a valid safetensors file ({exc})") from None
    modules = dict(model.named_modules())
    expected = {k for k in model.state_dict() if not k.endswith(".calibrated")}
    expected = {k for k in expected if not (k.endswith(".weight") and k[: -len(".weight")] in q["layers"])}
    expected |= {f"{name}{CODES_SUFFIX}" for name in q["layers"]}
    expected |= {f"{name}.bias" for name, info in q["layers"].items() if info["has_bias"]}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(f"{WEIGHTS_FILE} does not match the architecture in {CONFIG_FILE}: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, info in q["layers"].items():
            layer = modules[name]
            if info["has_bias"] and layer.bias is None:  # the reparameterization gave it one
                layer.ensure_bias()
            quantizer = layer.weight_quantizer
            for key in ("scale", "zero_point", "column_group"):
                setattr(quantizer, key, state.pop(f"{name}.weight_quantizer.{key}"))
            count = int(np.prod(info["shape"]))
            codes = unpack_codes(state.pop(f"{name}{CODES_SUFFIX}"), info["bits"], count)
            layer.weight.copy_(quantizer.dequantize(codes.reshape(info["shape"][0], -1)).reshape(info["shape"]))
        for quantizer in activation_quantizers(model):
            quantizer.calibrated.fill_(True)
        for name, tensor in state.items():  # per-tensor activation scales may differ in shape from a fresh module
            owner, _, attr = name.rpartition(".")
            target = modules[owner]
            if attr in target._buffers:
                target._buffers[attr] = tensor
            else:
                target._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    set_quant_state(model, activations=True, weights=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()
