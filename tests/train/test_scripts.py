"""scripts/train/*.sh run end to end with TINY=1: tiny model, synthetic phantoms, CPU, through torchrun."""

import subprocess

import pytest
from train_helpers import REPO, free_port, run_env

from medm.train.checkpoint import load_trained, read_meta

pytestmark = pytest.mark.slow
SCRIPTS = REPO / "scripts" / "train"


def _script(name: str, **env) -> None:
    proc = subprocess.run(["bash", str(SCRIPTS / name)], env=run_env(TINY="1", MASTER_PORT=str(free_port()), **env),
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_scripts_run_the_three_stages_tiny(tmp_path):
    runs = tmp_path / "runs"
    _script("pretrain.sh", OUTPUT_DIR=str(runs / "pretrain"))
    assert read_meta(str(runs / "pretrain"))["format"] == "components"
    assert (runs / "pretrain" / "data" / "captions.json").is_file()  # the synthetic data the script made
    for stage, fmt in (("finetune", "full"), ("finetune_lora", "lora")):
        _script(f"{stage}.sh", OUTPUT_DIR=str(runs / stage), INIT_FROM=str(runs / "pretrain"))
        assert read_meta(str(runs / stage))["format"] == fmt
        assert (runs / stage / "metrics.jsonl").is_file() and (runs / stage / "checkpoint-3").is_dir()
        model, _ = load_trained(str(runs / stage))
        assert model.num_image_tokens == 16


def test_every_script_header_starts_with_its_command():
    for path in sorted(SCRIPTS.glob("*.sh")):
        if path.name.startswith("_"):
            continue
        second = path.read_text().splitlines()[1]
        assert second.startswith("# ") and f"bash scripts/train/{path.name}" in second, path.name
