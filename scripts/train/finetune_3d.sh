#!/usr/bin/env bash
# DATA=train3d.json IMAGE_DIR=vols INIT_FROM=runs/pretrain_3d GPUS=8 bash scripts/train/finetune_3d.sh
# Stage 2 for 3D (configs/train/finetune_3d.yaml): full finetune of the 3D connector + LLM on volume VQA, from the
# pretrain_3d stage's connector; the 3D encoder stays frozen.
# CPU smoke run, tiny 3D model and phantom volumes: TINY=1 INIT_FROM=runs/pretrain_3d bash scripts/train/finetune_3d.sh
# Variables (MODEL_CONFIG, DATA, IMAGE_DIR, OUTPUT_DIR, INIT_FROM, GPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# DEEPSPEED, LAUNCHER, PYTHON, TINY) are described in scripts/train/_launch.sh; extra arguments are a.b=c overrides.
STAGE=finetune_3d
CONFIG=configs/train/finetune_3d.yaml
TINY_DATA_FILE=train.json
source "$(dirname "$0")/_tiny3d.sh"
source "$(dirname "$0")/_launch.sh"
