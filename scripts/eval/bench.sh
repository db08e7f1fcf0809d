#!/usr/bin/env bash
# SUITE=radiology-vqa MODEL=runs/finetune bash scripts/eval/bench.sh
# Runs a benchmark suite (configs/bench/$SUITE.yaml) with one model: infer + eval per task, then one table
# (OUT/bench.md, OUT/bench.csv) of each task's headline figure and 95% interval. Running it again resumes.
# Compare two models: COMPARE=runs/bench/radiology-vqa/base SUITE=... MODEL=... bash scripts/eval/bench.sh
#
# Variables:
#   SUITE       suite name or YAML path (required)       MODEL      checkpoint directory (required)
#   OUT         bench folder (default runs/bench/<suite>/<model folder name>)
#   COMPARE     another model's bench folder for the same suite: adds paired differences and p-values
#   DATA_ROOT   where the suite's relative data paths start (default $MEDM_DATA_DIR)
#   BOOTSTRAP   resamples (default 1000)   SEED   bootstrap seed (default 0)   LIMIT   questions per task
#   DEVICE      auto (default), cuda, cpu  DTYPE  bfloat16, float16, float32   PYTHON  interpreter (default python)
#   DRY_RUN=1   print the command instead of running it
# Extra arguments are passed on to `medm bench`.
set -euo pipefail
: "${SUITE:?set SUITE to a suite name (configs/bench/NAME.yaml) or a YAML file}"
: "${MODEL:?set MODEL to a checkpoint directory}"
_abs() { case "$1" in /* | "") printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
for _v in MODEL OUT COMPARE DATA_ROOT; do
  [ -n "${!_v:-}" ] && printf -v "$_v" '%s' "$(_abs "${!_v}")"
done
case "$SUITE" in *.yaml | *.yml) SUITE=$(_abs "$SUITE") ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

CMD=("${PYTHON:-python}" -m medm.cli bench --suite "$SUITE" --model "$MODEL" --bootstrap "${BOOTSTRAP:-1000}"
     --seed "${SEED:-0}" --device "${DEVICE:-auto}")
[ -n "${OUT:-}" ] && CMD+=(--out "$OUT")
[ -n "${COMPARE:-}" ] && CMD+=(--compare "$COMPARE")
[ -n "${DATA_ROOT:-}" ] && CMD+=(--data-root "$DATA_ROOT")
[ -n "${LIMIT:-}" ] && CMD+=(--limit "$LIMIT")
[ -n "${DTYPE:-}" ] && CMD+=(--dtype "$DTYPE")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${CMD[@]}" "$@"; echo; else "${CMD[@]}" "$@"; fi
