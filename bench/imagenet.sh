#!/usr/bin/env bash
# Reproduce the paper's ImageNet table (docs/algorithm.md) for a user who has ImageNet, and run
# erq+ beside it.
#
#   IMAGENET=/data/imagenet [METHODS="repq erq erq+"] bash bench/imagenet.sh [models...]
#
# IMAGENET is an ImageFolder root with train/ and val/ (the standard 1000-class layout).
# Weights: timm downloads them from the Hugging Face Hub, or finds them in its cache
# (~/.cache/huggingface). Without network, put a safetensors state dict per model in
# $CHECKPOINTS/<timm_name>.safetensors and set CHECKPOINTS.
# Results go to bench/results/imagenet/<model>_w<W>a<A>_<method>/metrics.json and a summary table
# to bench/results/imagenet.tsv (with the seconds of quantization). repq and erq follow the paper:
# 32 calibration images, coe 10000; erq+ takes its own defaults (192 images, automatic lambda).
# erq+ costs a few times erq's time (README, "Accuracy"). On one H200, quantizing DeiT-S (random init,
# W4/A4) took 3.1-3.6 s with erq and 7.5-7.7 s with erq+ at 32-128 images, besides about 5 s of model
# load and CUDA start (bench/results/speed-cuda.json); the evaluation of ImageNet's 50,000 val images
# comes on top.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${IMAGENET:?set IMAGENET to an ImageFolder root with train/ and val/}"
ERQ="${ERQ:-.venv/bin/erq}"
DEVICE="${DEVICE:-cuda}"
if [[ $# -gt 0 ]]; then MODELS=("$@"); else MODELS=(vit_small vit_base deit_tiny deit_small deit_base swin_small swin_base); fi
OUT=bench/results/imagenet
mkdir -p "$OUT"
read -r -a METHOD_LIST <<< "${METHODS:-repq erq erq+}"
printf 'model\tw_bits\ta_bits\tmethod\tfp_top1\ttop1\tseconds\n' > bench/results/imagenet.tsv

for model in "${MODELS[@]}"; do
  for bits in "4 4" "3 4" "6 6"; do
    read -r w a <<< "$bits"
    for method in "${METHOD_LIST[@]}"; do
      dir="$OUT/${model}_w${w}a${a}_${method}"
      extra=()
      if [[ "$method" != "erq+" ]]; then extra+=(--coe 10000 --calib-size 32); fi
      if [[ -n "${CHECKPOINTS:-}" ]]; then
        timm_name=$(.venv/bin/python -c "from erq_core.registry import resolve_alias; print(resolve_alias('$model')[0])")
        extra+=(--checkpoint "$CHECKPOINTS/$timm_name.safetensors")
      fi
      "$ERQ" quantize --model "$model" --dataset "$IMAGENET" --w-bits "$w" --a-bits "$a" \
        --method "$method" --device "$DEVICE" --batch-size 64 \
        "${extra[@]}" --out "$dir"
      .venv/bin/python - "$dir/metrics.json" "$model" "$w" "$a" "$method" >> bench/results/imagenet.tsv <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
seconds = sum(v for k, v in m["seconds"].items() if k not in ("evaluate_fp", "evaluate", "load_model", "save", "total"))
print("\t".join(sys.argv[2:6] + [str(m["fp"]["top1"]), str(m["quantized"]["top1"]), f"{seconds:.0f}"]))
PY
    done
  done
done
column -t bench/results/imagenet.tsv
