#!/usr/bin/env bash
# MODEL=runs/finetune DATA=pvqa/test.json IMAGE_DIR=pvqa bash scripts/eval/pathvqa.sh
# PathVQA's test questions from the released qas rows written as JSON (docs/eval.md shows the one-line conversion
# of test_qa.pkl); images are read from IMAGE_DIR/images/test/<image>.jpg; yes/no questions are the closed ones.
# Variables (MODEL, DATA, LAYOUT, IMAGE_DIR, OUT, BATCH_SIZE, MAX_NEW_TOKENS, PROTOCOL, BLANK, RESUME, DEVICE, DTYPE,
# PYTHON, DRY_RUN) are described in scripts/eval/_eval.sh; extra arguments go to `medm infer`.
TASK=pathvqa
DEFAULT_LAYOUT=pathvqa
DEFAULT_MAX_NEW_TOKENS=64
source "$(dirname "$0")/_eval.sh"
