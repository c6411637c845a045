#!/usr/bin/env bash
# Reproduce the paper's ImageNet table (ERQ_ALGORITHM.md section 4) for a user who has ImageNet.
#
#   IMAGENET=/data/imagenet bash bench/imagenet.sh [models...]
#
# IMAGENET is an ImageFolder root with train/ and val/ (the standard 1000-class layout).
# Weights: timm downloads them from the Hugging Face Hub, or finds them in its cache
# (~/.cache/huggingface). Without network, put a safetensors state dict per model in
# $CHECKPOINTS/<timm_name>.safetensors and set CHECKPOINTS.
# Results go to bench/results/imagenet/<model>_w<W>a<A>_<method>/metrics.json and a summary table
# to bench/results/imagenet.tsv. Settings follow the paper: 32 calibration images, coe 10000.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${IMAGENET:?set IMAGENET to an ImageFolder root with train/ and val/}"
ERQ="${ERQ:-.venv/bin/erq}"
DEVICE="${DEVICE:-cuda}"
if [[ $# -gt 0 ]]; then MODELS=("$@"); else MODELS=(vit_small vit_base deit_tiny deit_small deit_base swin_small swin_base); fi
OUT=bench/results/imagenet
mkdir -p "$OUT"
printf 'model\tw_bits\ta_bits\tmethod\tfp_top1\ttop1\n' > bench/results/imagenet.tsv

for model in "${MODELS[@]}"; do
  for bits in "4 4" "3 4" "6 6"; do
    read -r w a <<< "$bits"
    for method in repq erq; do
      dir="$OUT/${model}_w${w}a${a}_${method}"
      extra=()
      if [[ -n "${CHECKPOINTS:-}" ]]; then
        timm_name=$(.venv/bin/python -c "from erq_core.registry import resolve_alias; print(resolve_alias('$model')[0])")
        extra=(--checkpoint "$CHECKPOINTS/$timm_name.safetensors")
      fi
      "$ERQ" quantize --model "$model" --dataset "$IMAGENET" --w-bits "$w" --a-bits "$a" \
        --coe 10000 --calib-size 32 --method "$method" --device "$DEVICE" --batch-size 64 \
        "${extra[@]}" --out "$dir"
      .venv/bin/python - "$dir/metrics.json" "$model" "$w" "$a" "$method" >> bench/results/imagenet.tsv <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print("\t".join(sys.argv[2:6] + [str(m["fp"]["top1"]), str(m["quantized"]["top1"])]))
PY
    done
  done
done
column -t bench/results/imagenet.tsv
