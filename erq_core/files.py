"""The files a run writes into its folder, named once: the engine writes them, the service publishes
and serves them, the client downloads them (no torch here: the API imports this)."""
from __future__ import annotations

WEIGHTS_FILE = "quantized.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
# --export FORMAT writes this file into the run folder
EXPORT_FILE_NAMES = {"onnx": "model.onnx", "onnx-float64": "model-float64.onnx", "onnx-int8": "model-int8.onnx",
                     "onnx-w4": "model-w4.onnx"}
RESULT_FOLDER = (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE)  # what erq_core.load_quantized reads
