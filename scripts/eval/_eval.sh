# Sourced by scripts/eval/{vqa,vqa_rad,slake,pathvqa,report,grounding}.sh (not run on its own): `medm infer` on
# DATA, then `medm eval --task $TASK`; writes OUT/preds.jsonl, OUT/metrics.json, OUT/report.md.
#
# Variables:
#   MODEL           checkpoint directory (required): a training run's output_dir, a checkpoint-N, an export
#   DATA            question file (required): medm records, or the benchmark's published file (see LAYOUT)
#   LAYOUT          how DATA is laid out: records (medm / LLaVA / ShareGPT), or the task's published layout
#                   (default: the script's; vqa_rad.sh, slake.sh, pathvqa.sh read the published files)
#   IMAGE_DIR       directory relative image paths start from
#   OUT             output directory (default: runs/eval/<task>)
#   BATCH_SIZE      questions per generate call (default 8)
#   MAX_NEW_TOKENS  longest answer in tokens (default: the script's, 64 for VQA)
#   PROTOCOL        scoring protocol (default: the task's; VQA: strict, or llava-med to compare with papers)
#   BLANK=1         also answer with blank images (OUT/preds_blank.jsonl) and report accuracy with and without them
#   RESUME=1        finish an interrupted run (keep OUT's predictions) instead of starting over
#   DEVICE          auto (default), cuda, cpu;   DTYPE   bfloat16, float16, float32 (default: the checkpoint's)
#   PYTHON          interpreter with medm installed (default: python)
#   DRY_RUN=1       print the commands instead of running them
# Extra arguments are passed on to `medm infer` (e.g. --limit 20 --system-prompt "Answer briefly.").
set -euo pipefail
: "${MODEL:?set MODEL to a checkpoint directory}"
: "${DATA:?set DATA to the question file}"
# Paths you pass are relative to where you run the script; it runs from the repo root.
_abs() { case "$1" in /* | "") printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
for _v in MODEL DATA IMAGE_DIR OUT; do
  [ -n "${!_v:-}" ] && printf -v "$_v" '%s' "$(_abs "${!_v}")"
done
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/eval/$TASK}
LAYOUT=${LAYOUT:-$DEFAULT_LAYOUT}
_run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

INFER=("$PYTHON" -m medm.cli infer --model "$MODEL" --data "$DATA" --layout "$LAYOUT"
       --batch-size "${BATCH_SIZE:-8}" --max-new-tokens "${MAX_NEW_TOKENS:-$DEFAULT_MAX_NEW_TOKENS}"
       --device "${DEVICE:-auto}")
[ -n "${IMAGE_DIR:-}" ] && INFER+=(--image-dir "$IMAGE_DIR")
[ -n "${DTYPE:-}" ] && INFER+=(--dtype "$DTYPE")
if [ "${RESUME:-0}" = 1 ]; then INFER+=(--resume); else INFER+=(--overwrite); fi
EVAL=("$PYTHON" -m medm.cli eval --task "$TASK" --pred "$OUT/preds.jsonl" --out "$OUT")
[ -n "${PROTOCOL:-}" ] && EVAL+=(--protocol "$PROTOCOL")
[ -n "${IMAGE_DIR:-}" ] && EVAL+=(--image-dir "$IMAGE_DIR")

_run mkdir -p "$OUT"
_run "${INFER[@]}" --out "$OUT/preds.jsonl" "$@"
if [ "${BLANK:-0}" = 1 ]; then
  _run "${INFER[@]}" --out "$OUT/preds_blank.jsonl" --blank-images "$@"
  EVAL+=(--blank "$OUT/preds_blank.jsonl")
fi
_run "${EVAL[@]}"
