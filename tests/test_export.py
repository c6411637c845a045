"""Quantized checkpoints: packed codes, save / load round trip, refusing what is not a checkpoint."""
import json
import pickle
from dataclasses import dataclass
from typing import Iterable

import pytest
import torch

from erq_core import CheckpointError, ErqConfig, load_quantized, quantize, save_quantized
from erq_core.config import METHODS
from erq_core.checkpoint import pack_codes, unpack_codes
from erq_core.models import load_checkpoint

from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL
from tests.small_models import SMALL_MODELS, images, small_model


@pytest.mark.parametrize("bits", range(2, 9))
def test_packed_codes_round_trip_and_take_bits_per_code(bits):
    codes = torch.randint(0, 2**bits, (1000,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1000 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 1000), codes)


def test_a_loaded_run_scores_what_the_in_memory_model_scored(erq_w4a4_run, fixture_dataset):
    """The run evaluated its in-memory model before saving; the model loaded from the folder must give the
    same top-1 and top-5 on the same val subset (the bit-for-bit logits test below covers more models)."""
    from erq_core.runner import evaluate_quantized
    from tests.fixture_paths import FIXTURE_VAL_LIMIT

    folder, metrics = erq_w4a4_run
    config = json.loads((folder / "config.json").read_text())
    assert config["erq_config"]["w_bits"] == 4 and config["versions"]["torch"]
    loaded = evaluate_quantized(folder, fixture_dataset, val_limit=FIXTURE_VAL_LIMIT, device="cpu")
    assert (loaded["top1"], loaded["top5"]) == (metrics["quantized"]["top1"], metrics["quantized"]["top5"])
    # the weights are 4-bit codes: every weight layer has at most 16 values per (row, group)
    layer = dict(load_quantized(folder, "cpu").named_modules())["blocks.0.attn.qkv"]
    row = layer.weight[0][layer.weight_quantizer.column_group == 0]
    assert row.unique().numel() <= 16


def test_truncated_checkpoint_is_refused(erq_w4a4_run, tmp_path):
    folder, _ = erq_w4a4_run
    for name in ("config.json", "metrics.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    data = (folder / "quantized.safetensors").read_bytes()
    (tmp_path / "quantized.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_quantized(tmp_path, "cpu")


def test_pickled_checkpoints_are_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "weights.pth"
    path.write_bytes(pickle.dumps({"weight": Trap()}))
    with pytest.raises(CheckpointError, match="pickled checkpoints are refused"):
        load_checkpoint(torch.nn.Linear(2, 2), path)
    disguised = tmp_path / "weights.safetensors"
    disguised.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(torch.nn.Linear(2, 2), disguised)
    assert not marker.exists()


SMALL_SWIN_ARGS = dict(SMALL_MODELS["swin"][1], num_classes=10)


@dataclass
class RoundTripCase:
    model: torch.nn.Module
    calibration: Iterable
    config: ErqConfig
    source: dict
    pretrained_cfg: dict
    images: torch.Tensor
    max_size_ratio: float  # the checkpoint's size against the FP model's float32 parameters


def fixture_vit(method: str) -> RoundTripCase:
    from erq_core.data import build_transform, calibration_loader, validation_loader
    from erq_core.models import load_model

    config = ErqConfig(model=FIXTURE_MODEL, dataset=str(FIXTURE_DATASET), method=method, w_bits=3, calib_size=16)
    loaded = load_model(config)
    transform = build_transform(loaded.pretrained_cfg)
    images, _ = next(iter(validation_loader(FIXTURE_DATASET, transform, 32)))
    return RoundTripCase(loaded.model, calibration_loader(FIXTURE_DATASET, transform, 16, 16, 0), config,
                         loaded.source, loaded.pretrained_cfg, images, 0.25)  # ~3-bit codes, not float weights


def small_swin(method: str) -> RoundTripCase:
    source = {"spec": "swin_tiny_patch4_window7_224", "architecture": "swin_tiny_patch4_window7_224",
              "model_args": SMALL_SWIN_ARGS, "num_classes": 10}
    config = ErqConfig(model=source["spec"], dataset="unused", method=method, calib_size=8, random_init=True)
    return RoundTripCase(small_model("swin"), [images("swin", 8, seed=2)], config, source, {},
                         images("swin", 4, seed=3), 0.5)  # relative position tables stay in float


@pytest.mark.parametrize("make_case", [fixture_vit, small_swin])
@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_reproduces_the_quantized_models_logits_bit_for_bit(make_case, method, tmp_path):
    case = make_case(method)
    fp_bytes = 4 * sum(p.numel() for p in case.model.parameters())
    quantized = quantize(case.model, case.calibration, case.config)
    save_quantized(quantized, tmp_path, case.source, case.pretrained_cfg)
    with torch.no_grad():
        expected = quantized.model(case.images)
        got = load_quantized(tmp_path, "cpu")(case.images)
    assert torch.equal(got, expected)
    assert (tmp_path / "quantized.safetensors").stat().st_size < case.max_size_ratio * fp_bytes
