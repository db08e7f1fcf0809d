#!/usr/bin/env bash
# MODEL=runs/finetune DATA=Slake1.0/test.json IMAGE_DIR=Slake1.0/imgs bash scripts/eval/slake.sh
# SLAKE's English test questions from the published test.json (both languages: LAYOUT=records with the records of
# `medm data build slake --lang all`); broken down by content type, modality and location. PROTOCOL=llava-med
# compares with LLaVA-Med-style numbers.
# Variables (MODEL, DATA, LAYOUT, IMAGE_DIR, OUT, BATCH_SIZE, MAX_NEW_TOKENS, PROTOCOL, BLANK, RESUME, DEVICE, DTYPE,
# PYTHON, DRY_RUN) are described in scripts/eval/_eval.sh; extra arguments go to `medm infer`.
TASK=slake
DEFAULT_LAYOUT=slake
DEFAULT_MAX_NEW_TOKENS=64
source "$(dirname "$0")/_eval.sh"
