#!/usr/bin/env bash
# DATA=captions.json IMAGE_DIR=images/ MODEL_CONFIG=configs/model/qwen2.5-0.5b.yaml GPUS=8 bash scripts/train/pretrain.sh
# Stage 1 (configs/train/pretrain.yaml): train the connector on image-caption pairs; vision encoder and LLM frozen.
# CPU smoke run with the tiny model on synthetic data: TINY=1 bash scripts/train/pretrain.sh
# Variables (MODEL_CONFIG, DATA, IMAGE_DIR, OUTPUT_DIR, GPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, DEEPSPEED,
# LAUNCHER, PYTHON, TINY) are described in scripts/train/_launch.sh; extra arguments are a.b=c overrides.
STAGE=pretrain
CONFIG=configs/train/pretrain.yaml
TINY_DATA_FILE=captions.json
source "$(dirname "$0")/_launch.sh"
