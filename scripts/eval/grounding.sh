#!/usr/bin/env bash
# MODEL=runs/finetune DATA=data/grounding_test.json IMAGE_DIR=data/images bash scripts/eval/grounding.sh
# Grounding: records whose answer is a box [x1, y1, x2, y2] in pixels; the model answers <box>(x1,y1),(x2,y2)</box>
# on the 0-1000 grid (or Qwen2.5-VL bbox_2d JSON). Mean IoU and Acc@0.5 in OUT (runs/eval/grounding); image sizes
# come from the records' `image_size` or the image files under IMAGE_DIR.
# Variables (MODEL, DATA, LAYOUT, IMAGE_DIR, OUT, BATCH_SIZE, MAX_NEW_TOKENS, PROTOCOL, BLANK, RESUME, DEVICE, DTYPE,
# PYTHON, DRY_RUN) are described in scripts/eval/_eval.sh; extra arguments go to `medm infer`.
TASK=grounding
DEFAULT_LAYOUT=records
DEFAULT_MAX_NEW_TOKENS=64
source "$(dirname "$0")/_eval.sh"
