# Sourced by scripts/train/{pretrain_3d,finetune_3d}.sh before _launch.sh (not run on its own).
# With TINY=1, _launch.sh's own tiny defaults are 2D (configs/model/tiny.yaml, phantom images); a 3D stage needs the
# tiny 3D model and volumes, so this picks configs/model/tiny-3d.yaml and, unless DATA is given, writes tiny
# synthetic phantom volumes (medm data build phantoms3d, 16x32x32 .npy) to OUTPUT_DIR/data.
if [ "${TINY:-0}" = 1 ]; then
  _repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  MODEL_CONFIG=${MODEL_CONFIG:-$_repo/configs/model/tiny-3d.yaml}
  if [ -z "${DATA:-}" ]; then
    # _launch.sh's default OUTPUT_DIR (runs/<stage> in the repo), spelled out because the data go inside it.
    OUTPUT_DIR=${OUTPUT_DIR:-$_repo/runs/$STAGE}
    PYTHONPATH="$_repo${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" -m medm.cli data build phantoms3d \
      --out "$OUTPUT_DIR/data" --n-train 8 --n-test 0 --shape "[16, 32, 32]" >/dev/null || exit 1
    DATA=$OUTPUT_DIR/data/$TINY_DATA_FILE
    IMAGE_DIR=$OUTPUT_DIR/data
  fi
fi
