"""scripts/train/{pretrain_3d,finetune_3d}.sh run end to end with TINY=1: tiny 3D model, phantom volumes, torchrun."""

import subprocess

import pytest
from train_helpers import REPO, free_port, run_env

from medm.config import load_yaml
from medm.models import parse_model_args
from medm.registry import CONNECTOR
from medm.train.args import load_train_config
from medm.train.checkpoint import load_trained, read_meta

SCRIPTS = REPO / "scripts" / "train"


def _script(name: str, cwd, **env) -> None:
    proc = subprocess.run(["bash", str(SCRIPTS / name)], env=run_env(TINY="1", MASTER_PORT=str(free_port()), **env),
                          capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
def test_3d_scripts_run_pretrain_then_finetune_tiny(tmp_path):
    # Relative OUTPUT_DIR / INIT_FROM are relative to where the script is run, as with the 2D scripts.
    _script("pretrain_3d.sh", tmp_path, OUTPUT_DIR="runs/pretrain_3d")
    pre = tmp_path / "runs" / "pretrain_3d"
    assert read_meta(str(pre))["format"] == "components"  # only the 3D connector trained
    assert (pre / "data" / "captions.json").is_file() and len(list((pre / "data" / "volumes").glob("*.npy"))) == 8
    _script("finetune_3d.sh", tmp_path, OUTPUT_DIR="runs/finetune_3d", INIT_FROM="runs/pretrain_3d")
    fin = tmp_path / "runs" / "finetune_3d"
    assert read_meta(str(fin))["format"] == "full"
    assert (fin / "metrics.jsonl").is_file() and (fin / "checkpoint-3").is_dir()
    assert (fin / "data" / "train.json").is_file()
    model, _ = load_trained(str(fin))
    assert model.vision is None and model.config.vision3d["name"] == "vit3d"
    assert model.num_image3d_tokens == 8  # tiny-3d.yaml: a 4x4x4 grid pooled by 2


def test_3d_stage_yamls_plan_the_3d_components():
    """The shipped 3D stages parse, train the 3D parts as documented, and default to the M3D-CLIP + 3B model."""
    pre = load_train_config(str(REPO / "configs/train/pretrain_3d.yaml"))
    fin = load_train_config(str(REPO / "configs/train/finetune_3d.yaml"))
    assert (pre.stage.vision3d, pre.stage.connector3d, pre.stage.llm) == ("frozen", "full", "frozen")
    assert (fin.stage.vision3d, fin.stage.connector3d, fin.stage.llm) == ("frozen", "full", "full")
    assert fin.stage.init_from == pre.train.output_dir == "runs/pretrain_3d"
    assert pre.data["template"] == "pretrain"
    model = parse_model_args(load_yaml(str(REPO / "configs/model/m3d-vit3d-qwen2.5-3b.yaml")))
    assert model.vision is None and model.vision3d["image_size"] == [32, 256, 256]
    grid = tuple(s // p for s, p in zip(model.vision3d["image_size"], model.vision3d["patch_size"]))
    assert grid == (8, 16, 16)
    settings = {k: v for k, v in model.connector3d.items() if k != "name"}
    connector = CONNECTOR.get(model.connector3d["name"])(in_dim=768, out_dim=32, grid=grid, **settings)
    assert connector.num_tokens == 256
