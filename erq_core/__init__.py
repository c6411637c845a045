"""ERQ: error reduction for post-training quantization of Vision Transformers.

The light parts (configuration, model registry, errors) import without torch; the engine
(`quantize`, `run`, `load_quantized`, `evaluate_quantized`) is loaded on first use so that
the API process can share the job parameters without paying for torch.
"""
from erq_core.config import ErqConfig, QuantRecipe
from erq_core.errors import CheckpointError, ConfigError, DatasetError, ErqError, ModelLoadError

_LAZY = {
    "quantize": "erq_core.pipeline",
    "QuantizedModel": "erq_core.pipeline",
    "run": "erq_core.runner",
    "evaluate_quantized": "erq_core.runner",
    "load_quantized": "erq_core.checkpoint",
    "save_quantized": "erq_core.checkpoint",
}

__all__ = ["ErqConfig", "QuantRecipe", "ErqError", "ConfigError", "ModelLoadError", "DatasetError", "CheckpointError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'erq_core' has no attribute {name!r}")
