# Sourced by scripts/train/{pretrain,finetune,finetune_lora}.sh (not run on its own): launches `medm train`.
#
# Variables (all optional):
#   MODEL_CONFIG  configs/model/*.yaml (default: the one in the stage YAML)
#   DATA          annotation file (default: the stage YAML's data.path)
#   IMAGE_DIR     directory relative image paths start from (default: the stage YAML's)
#   OUTPUT_DIR    run directory (default: runs/<stage>)
#   INIT_FROM     earlier stage's checkpoint to start from (finetune scripts; "" for none)
#   DEEPSPEED     DeepSpeed JSON (default: the stage YAML's; "" for plain DDP)
#   LAUNCHER      torchrun (default) or deepspeed
#   GPUS          processes per node (default 1)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (defaults 1, 0, 127.0.0.1, 29500)
#   PYTHON        interpreter with medm installed (default: python)
#   TINY=1        CPU smoke run: tiny offline model, a few steps, GPUS processes over gloo (either launcher), no
#                 ZeRO config unless DEEPSPEED is given; writes tiny synthetic phantom data to OUTPUT_DIR/data unless
#                 DATA is given
# Extra arguments are passed on as a.b=c overrides.
set -euo pipefail
# Paths you pass are relative to where you run the script; the stage YAMLs' own paths are relative to the repo root.
_abs() { case "$1" in /* | "") printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
for _v in MODEL_CONFIG DATA IMAGE_DIR OUTPUT_DIR INIT_FROM DEEPSPEED; do
  [ -n "${!_v:-}" ] && printf -v "$_v" '%s' "$(_abs "${!_v}")"
done
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PYTHON=${PYTHON:-python}
LAUNCHER=${LAUNCHER:-torchrun}
GPUS=${GPUS:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
OUTPUT_DIR=${OUTPUT_DIR:-runs/$STAGE}

ARGS=("train.output_dir=$OUTPUT_DIR")
if [ "${TINY:-0}" = 1 ]; then
  MODEL_CONFIG=${MODEL_CONFIG:-configs/model/tiny.yaml}
  # No ZeRO config unless DEEPSPEED is given; GPUS processes (default 1) on the CPU.
  DEEPSPEED=${DEEPSPEED-}
  NNODES=1
  if [ -z "${DATA:-}" ]; then
    # Tiny synthetic phantom VQA (32 px images) from the library's builder.
    "$PYTHON" -c "from medm.data.builders.phantoms import build_phantoms; build_phantoms('$OUTPUT_DIR/data', n_train=8, n_test=0, size=32)"
    DATA=$OUTPUT_DIR/data/$TINY_DATA_FILE
    IMAGE_DIR=$OUTPUT_DIR/data
  fi
  ARGS+=(train.device=cpu train.bf16=false train.max_steps=3 train.per_device_train_batch_size=4
         train.save_steps=3 train.logging_steps=1 train.dataloader_num_workers=0 train.report_to=[] data.max_length=256)
fi
[ -n "${MODEL_CONFIG:-}" ] && ARGS+=("model=$MODEL_CONFIG")
[ -n "${DATA:-}" ] && ARGS+=("data.path=$DATA")
[ -n "${IMAGE_DIR:-}" ] && ARGS+=("data.image_dir=$IMAGE_DIR")
[ -n "${INIT_FROM+x}" ] && ARGS+=("stage.init_from=${INIT_FROM:-null}")
[ -n "${DEEPSPEED+x}" ] && ARGS+=("train.deepspeed=${DEEPSPEED:-null}")

if [ "$LAUNCHER" = deepspeed ]; then
  # One launcher per node (--no_ssh); ranks read LOCAL_RANK from the environment (--no_local_rank).
  MULTI=()
  [ "$NNODES" -gt 1 ] && MULTI=(--no_ssh --node_rank "$NODE_RANK")
  exec "$PYTHON" -m deepspeed.launcher.runner --num_nodes "$NNODES" --num_gpus "$GPUS" "${MULTI[@]}" --no_local_rank \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module medm.cli train "$CONFIG" "${ARGS[@]}" "$@"
elif [ "$LAUNCHER" = torchrun ]; then
  exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m medm.cli train "$CONFIG" "${ARGS[@]}" "$@"
else
  echo "LAUNCHER must be torchrun or deepspeed, got '$LAUNCHER'" >&2
  exit 2
fi
