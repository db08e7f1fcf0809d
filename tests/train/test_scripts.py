"""scripts/train/*.sh run end to end with TINY=1: tiny model, synthetic phantoms, CPU, through torchrun."""

import json
import os
import subprocess

import pytest
import torch
from train_helpers import REPO, free_port, run_env

from medm.train.checkpoint import load_trained, read_meta

pytestmark = pytest.mark.slow
SCRIPTS = REPO / "scripts" / "train"


def _script(name: str, **env) -> str:
    proc = subprocess.run(["bash", str(SCRIPTS / name)], env=run_env(TINY="1", MASTER_PORT=str(free_port()), **env),
                          capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


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


def _ranks(run, data_file: str) -> int:
    """Processes a finished TINY run trained on: each step takes 4 samples per rank of the records it wrote."""
    first = json.loads((run / "trainer_state.json").read_text())["log_history"][0]
    samples = len(json.loads((run / "data" / data_file).read_text()))
    return round(first["epoch"] * samples / 4)


def test_deepspeed_launcher_runs_a_script_on_two_cpu_ranks(tmp_path):
    """LAUNCHER=deepspeed GPUS=2 TINY=1: DeepSpeed's launcher starts two CPU ranks (gloo) of `medm train`."""
    run = tmp_path / "finetune_lora"
    _script("finetune_lora.sh", LAUNCHER="deepspeed", GPUS="2", OUTPUT_DIR=str(run), INIT_FROM="")
    assert _ranks(run, "train.json") == 2 and read_meta(str(run))["format"] == "lora"


# script -> checkpoint format
DEEPSPEED_SCRIPTS = {"pretrain.sh": "components", "finetune.sh": "full", "pretrain_3d.sh": "components",
                     "finetune_3d.sh": "full", "finetune_qwenvl.sh": "lora"}


@pytest.mark.skipif(os.environ.get("MEDM_DIST_SLOW") != "1", reason="~40 s a script on 2 cores; MEDM_DIST_SLOW=1 "
                    "runs every script under the DeepSpeed launcher")
@pytest.mark.parametrize("name", list(DEEPSPEED_SCRIPTS))
def test_deepspeed_launcher_runs_every_script_on_two_cpu_ranks(name, tmp_path):
    run = tmp_path / "run"
    log = _script(name, LAUNCHER="deepspeed", GPUS="2", OUTPUT_DIR=str(run), INIT_FROM="")
    assert "dist_world_size=2" in log and log.count("exits successfully") == 2  # the launcher's two ranks
    assert read_meta(str(run))["format"] == DEEPSPEED_SCRIPTS[name]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_gpu_check_says_it_needs_cuda():
    """scripts/gpu_check.sh runs the GPU-only paths on a CUDA machine; here it must stop at once, saying why."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=run_env(), capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1 and proc.stdout.strip() == "failed setup: no CUDA GPU visible"
