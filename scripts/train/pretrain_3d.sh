#!/usr/bin/env bash
# DATA=captions3d.json IMAGE_DIR=vols GPUS=8 bash scripts/train/pretrain_3d.sh
# Stage 1 for 3D (configs/train/pretrain_3d.yaml): train the 3D connector on volume-caption pairs; 3D encoder and LLM
# frozen. Records name their volumes in `image3d` (NIfTI, .npy or DICOM series folders).
# CPU smoke run with the tiny 3D model on synthetic phantom volumes: TINY=1 bash scripts/train/pretrain_3d.sh
# Variables (MODEL_CONFIG, DATA, IMAGE_DIR, OUTPUT_DIR, GPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, DEEPSPEED,
# LAUNCHER, PYTHON, TINY) are described in scripts/train/_launch.sh; extra arguments are a.b=c overrides.
STAGE=pretrain_3d
CONFIG=configs/train/pretrain_3d.yaml
TINY_DATA_FILE=captions.json
source "$(dirname "$0")/_tiny3d.sh"
source "$(dirname "$0")/_launch.sh"
