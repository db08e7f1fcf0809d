#!/usr/bin/env bash
# MODEL=runs/finetune DATA=vqa_rad/split/testset.json IMAGE_DIR=vqa_rad/images bash scripts/eval/vqa_rad.sh
# VQA-RAD's 451 test questions from the published split file (or LAYOUT=records DATA=data/vqa_rad/test.json, the
# records `medm data build vqa-rad` writes): closed accuracy, open recall, by answer type, question type and organ.
# PROTOCOL=llava-med compares with LLaVA-Med-style published numbers; BLANK=1 adds the blank-image comparison.
# Variables (MODEL, DATA, LAYOUT, IMAGE_DIR, OUT, BATCH_SIZE, MAX_NEW_TOKENS, PROTOCOL, BLANK, RESUME, DEVICE, DTYPE,
# PYTHON, DRY_RUN) are described in scripts/eval/_eval.sh; extra arguments go to `medm infer`.
TASK=vqa-rad
DEFAULT_LAYOUT=vqa-rad
DEFAULT_MAX_NEW_TOKENS=64
source "$(dirname "$0")/_eval.sh"
