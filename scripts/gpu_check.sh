#!/usr/bin/env bash
# bash scripts/gpu_check.sh [OUT_DIR]
# Runs every GPU-only path of medm once with tiny models on this CUDA machine (all its GPUs) and prints one line per
# path: `ok <path> (<seconds> s)` or `failed <path>: <last error line>` (full logs in OUT_DIR/<path>.log; default
# a temporary directory). About 3-5 minutes on one GPU; each path is cut off after PATH_TIMEOUT seconds (default 120).
#
# Paths: bf16 training; flash-attention 2 with packed rows (varlen); QLoRA (4-bit NF4 at load) on the medm kind and
# the qwen-vl kind; ZeRO-2 and ZeRO-3 over every GPU (torchrun) on mixed image + text-only data; generation on the
# GPU. Needs the `gpu` extras (pip install -e '.[gpu]': flash-attn, bitsandbytes) and deepspeed.
# Variables: PYTHON (default python), PATH_TIMEOUT (seconds per path).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
PATH_TIMEOUT=${PATH_TIMEOUT:-120}
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "failed setup: no CUDA GPU visible" && exit 1
fi
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
FAILED=0

check() {  # check NAME COMMAND...: run, print ok / failed with the last error line
  local name=$1 start=$SECONDS
  shift
  if timeout "$PATH_TIMEOUT" "$@" >"$OUT/$name.log" 2>&1; then
    echo "ok $name ($((SECONDS - start)) s)"
  else
    FAILED=$((FAILED + 1))
    echo "failed $name: $(grep -E 'Error|error|failed' "$OUT/$name.log" | tail -1 | cut -c1-300)"
  fi
}

# Data and pretrained tiny models (QLoRA quantizes weights as they load, so it needs checkpoints on disk).
"$PYTHON" - "$OUT" <<'EOF' >"$OUT/setup.log" 2>&1 || { echo "failed setup: see $OUT/setup.log"; exit 1; }
import json, sys
from pathlib import Path
import torch
from medm.config import load_yaml
from medm.data.builders.phantoms import build_phantoms
from medm.models import build_model
from medm.models.tiny import tiny_model_config
out = Path(sys.argv[1])
paths = build_phantoms(str(out / "data"), n_train=16, n_test=0, size=32)
records = json.loads(Path(paths["train"]).read_text())[:32]
mixed = []
for i, r in enumerate(records):  # image and text-only records alternate: ranks see both kinds in one step
    mixed.append(r)
    mixed.append({"id": f"text{i}", "conversations": [{"from": "human", "value": f"Is {i} even?"},
                                                      {"from": "gpt", "value": "yes" if i % 2 == 0 else "no"}]})
(out / "data" / "mixed.json").write_text(json.dumps(mixed))
torch.manual_seed(0)
model, tok = build_model(tiny_model_config())
model.llm.save_pretrained(out / "tiny-llm")
qwen, processor = build_model(load_yaml("configs/model/tiny-qwen2.5-vl.yaml"))
qwen.save_pretrained(out / "tiny-qwen")
processor.save_pretrained(out / "tiny-qwen")
EOF

TRAIN=("$PYTHON" -m medm.cli train configs/train/finetune.yaml model=configs/model/tiny.yaml
       "data.path=$OUT/data/mixed.json" "data.image_dir=$OUT/data" data.max_length=256 stage.init_from=null
       train.device=cuda train.max_steps=4 train.per_device_train_batch_size=4 train.logging_steps=1
       train.save_strategy=no train.report_to=[] train.dataloader_num_workers=0 train.deepspeed=null)
QWEN=("$PYTHON" -m medm.cli train configs/train/finetune_qwenvl.yaml "model=configs/model/tiny-qwen2.5-vl.yaml"
      "data.path=$OUT/data/mixed.json" "data.image_dir=$OUT/data" stage.init_from=null train.device=cuda
      train.max_steps=4 train.per_device_train_batch_size=4 train.save_strategy=no train.report_to=[]
      train.dataloader_num_workers=0 train.deepspeed=null)
DIST=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NGPU" --master_addr 127.0.0.1 --master_port 29531
      -m "${TRAIN[@]:2}")

check bf16 "${TRAIN[@]}" train.bf16=true "train.output_dir=$OUT/bf16"
check flash_attention_2_packed "${TRAIN[@]}" train.bf16=true model.llm.attn_implementation=flash_attention_2 \
  data.packing=true "train.output_dir=$OUT/fa2"
check qlora_medm "${TRAIN[@]}" train.bf16=true stage.llm=qlora "model.llm.path=$OUT/tiny-llm" model.llm.config=null \
  "train.output_dir=$OUT/qlora_medm"
check qlora_qwenvl "${QWEN[@]}" train.bf16=true stage.llm=qlora "model.qwenvl.path=$OUT/tiny-qwen" \
  model.qwenvl.config=null model.qwenvl.tiny_processor=false "train.output_dir=$OUT/qlora_qwenvl"
check zero2_mixed_all_gpus "${DIST[@]}" train.bf16=true train.deepspeed=configs/deepspeed/zero2.json \
  train.train_sampling_strategy=random "train.output_dir=$OUT/zero2"
check zero3_mixed_all_gpus "${DIST[@]}" train.bf16=true train.deepspeed=configs/deepspeed/zero3.json \
  train.train_sampling_strategy=random train.gradient_checkpointing=true "train.output_dir=$OUT/zero3"
check generate "$PYTHON" -c "
import torch
from medm.models.tiny import tiny_model_config
from medm.models import build_model
model, tok = build_model(tiny_model_config())
model = model.to('cuda', torch.bfloat16).eval()
ids = tok('<image>' * model.num_image_tokens + 'Is there a lesion?', return_tensors='pt').input_ids.cuda()
out = model.generate(input_ids=ids, pixel_values=torch.zeros(1, 3, 32, 32, device='cuda', dtype=torch.bfloat16),
                     max_new_tokens=8, do_sample=False)
assert out.shape[1] > ids.shape[1], out.shape
print('generated', out.shape)
"
echo "$FAILED failed of 7 paths on $NGPU GPU(s); logs in $OUT"
[ "$FAILED" = 0 ]
