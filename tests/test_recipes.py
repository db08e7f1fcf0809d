"""Recipes (configs/recipes/<name>/): every stage parses as written, holds the settings docs/recipes.md promises, and
trains one step end to end on its model's tiny twin, stage after stage through `stage.init_from`; the recipe script
runs the stages in order."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers.training_args import OptimizerNames

from medm.config import apply_overrides, from_dict, load_yaml, resolve_relative
from medm.data.dataset import DataArgs
from medm.data.mixture import parse_mixture
from medm.models.tiny import tiny_overrides
from medm.registry import CONNECTOR
from medm.train.args import TrainConfig, load_train_config, parse_train_config
from medm.train.checkpoint import load_trained, read_meta

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
NAMES = sorted(p.name for p in RECIPES.iterdir() if p.is_dir())
STAGE_FILES = sorted(p for p in RECIPES.glob("*/*.yaml") if p.name != "model.yaml")
# The hardware the YAMLs are written for (docs/recipes.md): one node of 8 GPUs.
REFERENCE_GPUS = 8


def _id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def _stages(name: str) -> list[Path]:
    """The default chain (numbered files, in order), then the variants."""
    files = [p for p in STAGE_FILES if p.parent.name == name]
    return [p for p in files if p.name[0].isdigit()] + [p for p in files if not p.name[0].isdigit()]


# What the issue asks of each recipe, as dotted keys of the parsed stage (model.*: the model section).
EXPECTED = {
    "medm-vl-2d-3b/1_pretrain": {
        "model.vision.name": "siglip", "model.vision.path": "google/siglip-base-patch16-256",
        "model.connector.type": "mlp2x_gelu", "model.llm.path": "Qwen/Qwen2.5-3B-Instruct",
        "stage.vision": "frozen", "stage.connector": "full", "stage.llm": "frozen", "train.learning_rate": 1e-3,
        "global_batch": 128, "train.lr_scheduler_type": "cosine", "train.warmup_steps": 0.03, "train.bf16": True,
        "zero": 2, "data.max_length": 2048},
    "medm-vl-2d-3b/2_finetune": {
        "stage.vision": "full", "stage.connector": "full", "stage.llm": "full", "train.learning_rate": 2e-5,
        "global_batch": 128, "train.lr_scheduler_type": "cosine", "train.warmup_steps": 0.03, "train.bf16": True,
        "zero": 2, "data.max_length": 2048},
    "medm-vl-2d-3b/finetune_lora": {
        "stage.vision": "frozen", "stage.connector": "full", "stage.llm": "lora", "stage.lora.r": 128,
        "stage.lora.alpha": 256, "stage.lora.dropout": 0.05, "train.learning_rate": 2e-4, "global_batch": 128,
        "train.lr_scheduler_type": "cosine", "train.warmup_steps": 0.03, "train.bf16": True, "zero": 2,
        "data.max_length": 2048},
    "medm-vl-ct-chest-3b/1_pretrain": {
        "model.llm.path": "Qwen/Qwen2.5-3B-Instruct", "model.vision3d.name": "slices",
        "model.vision3d.num_slices": 32, "model.vision3d.encoder.name": "siglip",
        "model.connector3d.name": "attention_pool", "model.connector3d.num_queries": 256, "global_batch": 16,
        "train.num_train_epochs": 1, "stage.llm": "frozen", "stage.connector3d": "full"},
    "medm-vl-ct-chest-3b/2_finetune": {"global_batch": 16, "train.num_train_epochs": 1, "stage.llm": "full"},
    "m3d-style-3d/1_pretrain": {
        "model.vision3d.name": "vit3d", "model.vision3d.image_size": [32, 256, 256],
        "model.vision3d.patch_size": [4, 16, 16], "model.connector3d.name": "spatial_pool",
        "model.llm.path": "Qwen/Qwen2.5-3B-Instruct", "stage.llm": "frozen"},
    "m3d-style-3d/2_finetune": {"stage.llm": "full", "stage.connector3d": "full"},
    "qwen2.5-vl-3b-lora-vqa-rad/1_finetune": {
        "model.kind": "qwen-vl", "model.qwenvl.model_type": "qwen2_5_vl", "stage.llm": "lora", "stage.lora.r": 16,
        "stage.lora.alpha": 32, "stage.lora.target_modules": ["all-linear"], "train.learning_rate": 2e-4,
        "train.optim": "adamw_bnb_8bit"},
    "qwen2-vl-2b-lora-medtrinity/1_finetune": {
        "model.kind": "qwen-vl", "model.qwenvl.model_type": "qwen2_vl", "stage.llm": "lora", "stage.lora.r": 8,
        "stage.lora.alpha": 16, "train.learning_rate": 5e-5, "train.num_train_epochs": 3},
}


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def test_the_issue_recipes_ship():
    assert set(NAMES) == {"medm-vl-2d-3b", "medm-vl-ct-chest-3b", "m3d-style-3d", "qwen2.5-vl-3b-lora-vqa-rad",
                          "qwen2-vl-2b-lora-medtrinity"}
    assert set(EXPECTED) == {_id(p) for p in STAGE_FILES}
    for name in NAMES:  # numbered stages run by default: 1, 2, ... without gaps
        numbers = [int(p.name.split("_")[0]) for p in _stages(name) if p.name[0].isdigit()]
        assert numbers == list(range(1, len(numbers) + 1)), name


@pytest.mark.parametrize("path", STAGE_FILES, ids=[_id(p) for p in STAGE_FILES])
def test_every_stage_parses_as_written_with_the_promised_settings(path, monkeypatch):
    monkeypatch.chdir(REPO)
    name, rel = path.parent.name, path.relative_to(REPO).as_posix()
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# Recipe {name}") and lines[1] == f"# Run: medm train {rel}", lines[:2]
    cfg = load_train_config(rel)  # its model file and every key validate
    data = from_dict(DataArgs, cfg.data, f"{rel}: data")
    parse_mixture(data.path, data.image_dir)  # a mixture's entries are well formed
    OptimizerNames(cfg.train.optim)  # a name transformers knows
    assert cfg.train.output_dir == f"runs/{name}/{path.stem.split('_', 1)[-1] if path.name[0].isdigit() else path.stem}"
    if cfg.train.deepspeed:
        ds = json.loads((REPO / cfg.train.deepspeed).read_text())
    # init_from is the output of an earlier numbered stage of the same recipe
    earlier = [p for p in _stages(name) if p.name[0].isdigit() and p.name < path.name]
    if cfg.stage.init_from is not None:
        assert cfg.stage.init_from in [load_yaml(str(p))["train"]["output_dir"] for p in earlier]
    global_batch = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps * REFERENCE_GPUS
    view = {"model": cfg.model, "stage": cfg.stage, "train": cfg.train, "data": cfg.data,
            "global_batch": global_batch, "zero": ds["zero_optimization"]["stage"] if cfg.train.deepspeed else None}
    for key, want in EXPECTED[_id(path)].items():
        assert _get(view, key) == want, f"{rel}: {key}"


def test_m3d_recipe_pools_to_256_tokens():
    cfg = load_train_config(str(RECIPES / "m3d-style-3d" / "1_pretrain.yaml"))
    v3d = cfg.model.vision3d
    grid = tuple(s // p for s, p in zip(v3d["image_size"], v3d["patch_size"]))
    settings = {k: v for k, v in cfg.model.connector3d.items() if k != "name"}
    assert CONNECTOR.get("spatial_pool")(in_dim=768, out_dim=32, grid=grid, **settings).num_tokens == 256


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Tiny synthetic 2D and 3D data in the record format: captions (pretrain) and VQA (finetune)."""
    from medm.data.builders.phantoms import build_phantoms
    from medm.data.builders.phantoms3d import build_phantoms3d

    root = tmp_path_factory.mktemp("phantoms")
    files2d = build_phantoms(str(root / "2d"), n_train=2, n_test=0, size=32)
    files3d = build_phantoms3d(str(root / "3d"), n_train=2, n_test=0, shape=(16, 32, 32))
    return {"2d": {**files2d, "dir": str(root / "2d")}, "3d": {**files3d, "dir": str(root / "3d")}}


def _tiny_stage(path: Path, out: Path, data: dict) -> TrainConfig:
    """The stage as written, on its model's tiny twin, the tiny data, one CPU step, outputs under `out`."""
    raw = load_yaml(str(path))
    model = raw["model"]
    raw["model"] = tiny_overrides(load_yaml(resolve_relative(model, str(path))) if isinstance(model, str) else model)
    kind = "3d" if raw["model"].get("vision3d") else "2d"
    init = raw["stage"].get("init_from")
    apply_overrides(raw, [
        f"data.path={data[kind]['captions' if raw['data'].get('template') == 'pretrain' else 'train']}",
        f"data.image_dir={data[kind]['dir']}", f"train.output_dir={out / raw['train']['output_dir']}",
        f"stage.init_from={out / init if init else 'null'}", "stage.lora.r=4", "stage.lora.alpha=8",
        "train.max_steps=1", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
        "train.warmup_steps=0", "train.device=cpu", "train.bf16=false", "train.deepspeed=null",
        "train.optim=adamw_torch",  # adamw_bnb_8bit needs bitsandbytes and CUDA
        "train.report_to=[]", "train.save_strategy='no'", "train.dataloader_num_workers=0",
        "train.disable_tqdm=true", "train.plot_loss=false"])
    return parse_train_config(raw, where=str(path))


# Checkpoint format of each stage: the LLM frozen saves the connector only, LoRA an adapter, else the full model.
FORMAT = {"frozen": "components", "lora": "lora", "full": "full"}


@pytest.mark.parametrize("name", NAMES)
def test_recipe_trains_one_step_per_stage_on_its_tiny_twin(name, phantoms, tmp_path, monkeypatch):
    from medm.train.trainer import run_training

    monkeypatch.chdir(REPO)
    torch.manual_seed(0)
    for path in _stages(name):
        cfg = _tiny_stage(path, tmp_path, phantoms)
        trainer = run_training(cfg)
        loss = trainer.state.log_history[-1]["train_loss"]
        assert loss == loss and loss > 0, f"{_id(path)}: loss {loss}"
        out = cfg.train.output_dir
        assert read_meta(out)["format"] == FORMAT[cfg.stage.llm], _id(path)
        if cfg.stage.lora is not None and cfg.stage.llm == "lora" and cfg.stage.lora.target_modules == ["all-linear"]:
            # "all linear layers of the language model": every projection of every LLM block, nothing else
            targets = json.loads(Path(out, "adapter_config.json").read_text())["target_modules"]
            targets = sorted(targets) if isinstance(targets, list) else targets
            assert {t.rsplit(".", 1)[-1] for t in targets} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"}, targets
            assert not any("visual" in t or "lm_head" in t for t in targets), targets
    model, _ = load_trained(out)  # the last stage reopens from its checkpoint alone
    assert model is not None


def _dry_run(*args: str, **env) -> list[str]:
    proc = subprocess.run(["bash", str(REPO / "scripts/train/recipe.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", **env}, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_recipe_script_runs_the_numbered_stages_in_order():
    lines = _dry_run("medm-vl-2d-3b", GPUS="8")
    assert [line.split()[-1] for line in lines] == ["configs/recipes/medm-vl-2d-3b/1_pretrain.yaml",
                                                     "configs/recipes/medm-vl-2d-3b/2_finetune.yaml"]
    assert all("torch.distributed.run" in line and "--nproc_per_node 8" in line and "-m medm.cli train" in line
               for line in lines)


def test_recipe_script_overrides_variants_and_nodes():
    lines = _dry_run("medm-vl-2d-3b", "1_pretrain", "finetune_lora", "train.gradient_accumulation_steps=1",
                     "finetune_lora:stage.lora.r=64", GPUS="8", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    pre, lora = (line.split() for line in lines)
    assert pre[-2:] == ["configs/recipes/medm-vl-2d-3b/1_pretrain.yaml", "train.gradient_accumulation_steps=1"]
    assert lora[-3:] == ["configs/recipes/medm-vl-2d-3b/finetune_lora.yaml", "train.gradient_accumulation_steps=1",
                         "stage.lora.r=64"]
    for flag, value in (("--nnodes", "2"), ("--node_rank", "1"), ("--master_addr", "10.0.0.1")):
        assert pre[pre.index(flag) + 1] == value
    ds = _dry_run("m3d-style-3d", LAUNCHER="deepspeed", GPUS="8", NNODES="2", NODE_RANK="1")
    assert len(ds) == 2 and all("deepspeed.launcher.runner" in x and "--no_ssh --node_rank 1" in x for x in ds)


@pytest.mark.parametrize("args,message", [
    (["nope"], "recipe 'nope' not found; recipes: m3d-style-3d"),
    (["medm-vl-2d-3b", "3_finetune"], "has no stage '3_finetune'; stages: 1_pretrain 2_finetune finetune_lora"),
    (["medm-vl-2d-3b", "2_fintune:train.max_steps=1"], "has no stage '2_fintune'"),
    (["medm-vl-ct-chest-3b", "model"], "has no stage 'model'"),
])
def test_recipe_script_names_a_bad_recipe_or_stage(args, message):
    proc = subprocess.run(["bash", str(REPO / "scripts/train/recipe.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1"})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_docs_give_each_recipe_its_commands_and_memory():
    """docs/recipes.md: per recipe, the 1-GPU, 8-GPU and 2-node commands and a memory row for every stage."""
    text = (REPO / "docs" / "recipes.md").read_text()
    for name in NAMES:
        section = text.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        commands = [line for line in section.splitlines() if f"bash scripts/train/recipe.sh {name}" in line]
        assert any(line.startswith("bash ") for line in commands), name  # 1 GPU
        assert any(line.startswith("GPUS=8 bash ") for line in commands), name
        assert any(line.startswith("NNODES=2 NODE_RANK=0 ") for line in commands), name
        for path in _stages(name):
            row = next((line for line in section.splitlines() if line.startswith(f"| `{path.stem}` |")), None)
            assert row is not None and len(row.split("|")) == 8, _id(path)  # stage, params, batches, 3 memory cells
