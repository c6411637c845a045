"""Real per-layer statistics of the fixture model, as the pipeline gathers them (for tests)."""
from __future__ import annotations

import torch

from erq_core import ErqConfig
from erq_core.data import build_transform, calibration_loader
from erq_core.models import load_model
from erq_core.pipeline import ACTIVATION_CALIBRATION_IMAGES, collect_statistics, first_images
from erq_core.qmodules import convert_model, set_quant_state, weight_layers
from erq_core.reparam import find_norm_linear_pairs, reparameterize

from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL


@torch.no_grad()
def fixture_statistics(w_bits: int = 4, a_bits: int = 4):
    """(model with calibrated activation quantizers after reparameterization, {layer: LayerStats})."""
    config = ErqConfig(model=FIXTURE_MODEL, dataset=str(FIXTURE_DATASET), w_bits=w_bits, a_bits=a_bits)
    loaded = load_model(config)
    model = loaded.model
    loader = calibration_loader(FIXTURE_DATASET, build_transform(loaded.pretrained_cfg), 32, 32, 0)
    init = first_images(loader, ACTIVATION_CALIBRATION_IMAGES, torch.device("cpu"))
    pairs = find_norm_linear_pairs(model, init[:1])
    convert_model(model, a_bits, w_bits, set(pairs), set(pairs), True)
    set_quant_state(model, activations=True, weights=False)
    model(init)
    reparameterize(model, pairs)
    stats = collect_statistics(model, loader, lambda *args: None)
    return model, dict(weight_layers(model)), stats
