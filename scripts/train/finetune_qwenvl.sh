#!/usr/bin/env bash
# DATA=train.json IMAGE_DIR=images/ GPUS=8 bash scripts/train/finetune_qwenvl.sh
# Qwen-VL fine-tuning (configs/train/finetune_qwenvl.yaml): LoRA on Qwen2.5-VL-3B's language model, tower frozen.
# Qwen2-VL-2B instead: MODEL_CONFIG=configs/model/qwen2-vl-2b.yaml bash scripts/train/finetune_qwenvl.sh
# CPU smoke run with the tiny Qwen2.5-VL on synthetic data: TINY=1 bash scripts/train/finetune_qwenvl.sh
# Merge afterwards: medm export --merge runs/finetune_qwenvl runs/finetune_qwenvl_merged
# Variables (MODEL_CONFIG, DATA, IMAGE_DIR, OUTPUT_DIR, INIT_FROM, GPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# DEEPSPEED, LAUNCHER, PYTHON, TINY) are described in scripts/train/_launch.sh; extra arguments are a.b=c overrides.
STAGE=finetune_qwenvl
CONFIG=configs/train/finetune_qwenvl.yaml
TINY_DATA_FILE=train.json
if [ "${TINY:-0}" = 1 ] && [ -z "${MODEL_CONFIG:-}" ]; then
  # The tiny twin of this stage's model kind (_launch.sh's own tiny default is a medm-kind model).
  MODEL_CONFIG="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/configs/model/tiny-qwen2.5-vl.yaml"
fi
source "$(dirname "$0")/_launch.sh"
