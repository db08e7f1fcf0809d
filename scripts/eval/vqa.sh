#!/usr/bin/env bash
# MODEL=runs/finetune DATA=data/test.json IMAGE_DIR=data/images bash scripts/eval/vqa.sh
# Closed / open VQA on any medm records file with answers (`medm eval --task vqa`): predictions, metrics.json and
# report.md (by answer type, and question type / organ where the records have them) in OUT (runs/eval/vqa).
# Image reliance: BLANK=1 MODEL=... DATA=... bash scripts/eval/vqa.sh
# Variables (MODEL, DATA, LAYOUT, IMAGE_DIR, OUT, BATCH_SIZE, MAX_NEW_TOKENS, PROTOCOL, BLANK, RESUME, DEVICE, DTYPE,
# PYTHON, DRY_RUN) are described in scripts/eval/_eval.sh; extra arguments go to `medm infer`.
TASK=vqa
DEFAULT_LAYOUT=records
DEFAULT_MAX_NEW_TOKENS=64
source "$(dirname "$0")/_eval.sh"
