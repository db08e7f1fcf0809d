#!/usr/bin/env bash
# DATA=train.json IMAGE_DIR=images/ INIT_FROM=runs/pretrain GPUS=8 bash scripts/train/finetune_lora.sh
# Stage 2 with LoRA (configs/train/finetune_lora.yaml): adapters on the LLM, connector trained, from pretrain.
# CPU smoke run with the tiny model on synthetic data: TINY=1 INIT_FROM=runs/pretrain bash scripts/train/finetune_lora.sh
# Merge afterwards: medm export --merge runs/finetune_lora runs/finetune_lora_merged
# Variables (MODEL_CONFIG, DATA, IMAGE_DIR, OUTPUT_DIR, INIT_FROM, GPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# DEEPSPEED, LAUNCHER, PYTHON, TINY) are described in scripts/train/_launch.sh; extra arguments are a.b=c overrides.
STAGE=finetune_lora
CONFIG=configs/train/finetune_lora.yaml
TINY_DATA_FILE=train.json
source "$(dirname "$0")/_launch.sh"
