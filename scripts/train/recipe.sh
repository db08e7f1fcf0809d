#!/usr/bin/env bash
# GPUS=8 bash scripts/train/recipe.sh NAME [STAGE ...] [key=value ...] [STAGE:key=value ...]
# Runs a recipe (configs/recipes/NAME/, docs/recipes.md): its stages one after another, each a `medm train` launched
# by torchrun (or LAUNCHER=deepspeed) with GPUS processes per node. A stage that fails stops the recipe.
#
#   STAGE              a stage file of the recipe without `.yaml` (1_pretrain, finetune_lora, ...). Default: the
#                      numbered stages (1_*.yaml, 2_*.yaml, ...) in order; variants (unnumbered files) run when named.
#   key=value          an override for every stage run (train.gradient_accumulation_steps=16)
#   STAGE:key=value    an override for that stage only (1_pretrain:data.path=/data/captions.json)
#
# Variables (all optional): GPUS (processes per node, default 1); NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
# (multi-node rendezvous: run the same command on every node with its NODE_RANK; defaults 1, 0, 127.0.0.1, 29500);
# LAUNCHER (torchrun or deepspeed); PYTHON (interpreter with medm installed, default python); DRY_RUN=1 prints each
# stage's command instead of running it.
# The stages run in the repository root: relative paths in the YAMLs and in overrides start there.
set -euo pipefail
usage="usage: bash scripts/train/recipe.sh NAME [STAGE ...] [key=value ...] [STAGE:key=value ...]"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

NAME=${1:?$usage}
shift
DIR=configs/recipes/$NAME
if [ ! -d "$DIR" ]; then
  echo "recipe '$NAME' not found; recipes: $(cd configs/recipes && echo *)" >&2
  exit 2
fi

STAGES=()
COMMON=()
PER_STAGE=()
for arg in "$@"; do
  case "$arg" in
    *=*)
      key=${arg%%=*}
      if [[ "$key" == *:* ]]; then PER_STAGE+=("$arg"); else COMMON+=("$arg"); fi ;;
    *) STAGES+=("$arg") ;;
  esac
done
if [ ${#STAGES[@]} -eq 0 ]; then
  for f in "$DIR"/[0-9]*.yaml; do
    [ -e "$f" ] && STAGES+=("$(basename "$f" .yaml)")
  done
fi
# Every stage named (as an argument or in a STAGE:key=value override) must be a stage file of this recipe.
for s in "${STAGES[@]}" "${PER_STAGE[@]%%:*}"; do
  if [ -z "$s" ] || [ "$s" = model ] || [ ! -f "$DIR/$s.yaml" ]; then
    known=$(cd "$DIR" && ls -- *.yaml | grep -vx model.yaml | sed 's/\.yaml$//' | tr '\n' ' ')
    echo "recipe $NAME has no stage '$s'; stages: $known" >&2
    exit 2
  fi
done

PYTHON=${PYTHON:-python}
LAUNCHER=${LAUNCHER:-torchrun}
GPUS=${GPUS:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

for stage in "${STAGES[@]}"; do
  ARGS=("${COMMON[@]}")
  for o in "${PER_STAGE[@]}"; do
    [ "${o%%:*}" = "$stage" ] && ARGS+=("${o#*:}")
  done
  CONFIG=$DIR/$stage.yaml
  if [ "$LAUNCHER" = deepspeed ]; then
    # One launcher per node (--no_ssh); ranks read LOCAL_RANK from the environment (--no_local_rank).
    MULTI=()
    [ "$NNODES" -gt 1 ] && MULTI=(--no_ssh --node_rank "$NODE_RANK")
    CMD=("$PYTHON" -m deepspeed.launcher.runner --num_nodes "$NNODES" --num_gpus "$GPUS" "${MULTI[@]}"
         --no_local_rank --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module medm.cli train "$CONFIG")
  elif [ "$LAUNCHER" = torchrun ]; then
    CMD=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS"
         --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m medm.cli train "$CONFIG")
  else
    echo "LAUNCHER must be torchrun or deepspeed, got '$LAUNCHER'" >&2
    exit 2
  fi
  CMD+=("${ARGS[@]}")
  echo "== recipe $NAME: stage $stage" >&2
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${CMD[@]}"
    echo
  else
    "${CMD[@]}"
  fi
done
