#!/usr/bin/env bash
# MODEL=runs/finetune DATA=data/reports_test.json IMAGE_DIR=data/images bash scripts/eval/report.sh
# Report generation: records whose reference report is their `answer` (or final gpt turn); ROUGE-1/2/L and
# BLEU-1..4 in OUT (runs/eval/report). Answers are long, so MAX_NEW_TOKENS defaults to 256.
# Variables (MODEL, DATA, LAYOUT, IMAGE_DIR, OUT, BATCH_SIZE, MAX_NEW_TOKENS, PROTOCOL, BLANK, RESUME, DEVICE, DTYPE,
# PYTHON, DRY_RUN) are described in scripts/eval/_eval.sh; extra arguments go to `medm infer`.
TASK=report
DEFAULT_LAYOUT=records
DEFAULT_MAX_NEW_TOKENS=256
source "$(dirname "$0")/_eval.sh"
