#!/usr/bin/env bash
# DATA=train.json IMAGE_DIR=images/ INIT_FROM=runs/pretrain GPUS=8 bash scripts/train/finetune.sh
# Stage 2 (configs/train/finetune.yaml): full finetune of connector + LLM from the pretrain stage's connector.
# CPU smoke run with the tiny model on synthetic data: TINY=1 INIT_FROM=runs/pretrain bash scripts/train/finetune.sh
# Variables (MODEL_CONFIG, DATA, IMAGE_DIR, OUTPUT_DIR, INIT_FROM, GPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# DEEPSPEED, LAUNCHER, PYTHON, TINY) are described in scripts/train/_launch.sh; extra arguments are a.b=c overrides.
STAGE=finetune
CONFIG=configs/train/finetune.yaml
TINY_DATA_FILE=train.json
source "$(dirname "$0")/_launch.sh"
