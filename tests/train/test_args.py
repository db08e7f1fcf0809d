"""Train YAMLs: every shipped one parses (and builds its stage on the tiny model); bad keys and settings are named."""

from pathlib import Path

import pytest
import torch
from train_helpers import REPO

from medm.config import ConfigError
from medm.models import build_model
from medm.train.args import TrainArgs, load_train_config, parse_train_config
from medm.train.stages import apply_plan, checkpoint_format, resolve_plan
from medm.train.trainer import resolve_device

TRAIN_YAMLS = sorted((REPO / "configs" / "train").glob("*.yaml"))
EXPECTED_FORMAT = {"pretrain": "components", "finetune": "full", "finetune_lora": "lora"}


def test_the_three_stage_yamls_ship():
    assert {p.stem for p in TRAIN_YAMLS} >= set(EXPECTED_FORMAT)


@pytest.mark.parametrize("path", TRAIN_YAMLS, ids=[p.stem for p in TRAIN_YAMLS])
def test_every_train_yaml_parses_and_plans_on_the_tiny_model(path, monkeypatch):
    monkeypatch.chdir(REPO)
    text = path.read_text()
    head = text.splitlines()[:4]
    assert text.startswith("# ") and any(f"medm train configs/train/{path.name}" in line for line in head)
    cfg = load_train_config(str(path))  # as written: its model file and every key validate
    assert cfg.train.output_dir and cfg.data["path"]
    if cfg.train.deepspeed:
        assert (REPO / cfg.train.deepspeed).is_file()
    tiny_model = "configs/model/tiny-3d.yaml" if cfg.model.vision3d else "configs/model/tiny.yaml"
    tiny = load_train_config(str(path), [f"model={tiny_model}", "stage.lora.r=4", "train.bf16=false"])
    assert tiny.model.llm.config["hidden_size"] == 64 and tiny.stage.lora.r == 4 and tiny.train.bf16 is False
    model, _ = build_model(tiny.model)
    modes = resolve_plan(model, tiny.stage)
    if path.stem in EXPECTED_FORMAT:
        assert checkpoint_format(modes) == EXPECTED_FORMAT[path.stem]
    trained = apply_plan(model, tiny.stage)
    assert any(p.requires_grad for p in trained.parameters())


def test_overrides_edit_inside_a_model_file(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_train_config(str(REPO / "configs/train/finetune.yaml"),
                            ["model=configs/model/tiny.yaml", "model.llm.dtype=bfloat16", "train.max_steps=7"])
    assert cfg.model.llm.dtype == "bfloat16" and cfg.model.vision["name"] == "clip" and cfg.train.max_steps == 7


def test_shipped_configs_read_from_any_working_directory(tmp_path, monkeypatch):
    """`model: configs/model/tiny-demo.yaml` is relative to the repository root: found from elsewhere too (medm demo
    run outside the checkout), as is a `model=` override naming a shipped file."""
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(str(REPO / "configs/demo/pretrain.yaml"))
    assert cfg.model.llm.config["hidden_size"] == 128
    cfg = load_train_config(str(REPO / "configs/train/finetune.yaml"), ["model=configs/model/tiny.yaml",
                                                                        "model.llm.dtype=float32"])
    assert cfg.model.llm.config["hidden_size"] == 64 and cfg.model.llm.dtype == "float32"


@pytest.mark.parametrize("cfg,message", [
    ({"model": {}, "train": {"output_dir": "x"}, "trian": {}},
     r"train config: trian: unknown section; did you mean train\?"),
    ({"model": {}, "train": {"output_dir": "x", "lr": 1}}, r"train.lr: unknown key; valid keys: output_dir"),
    ({"model": {}, "stage": {"llm": "lora", "lora": {"rank": 4}}, "train": {"output_dir": "x"}},
     r"stage.lora.rank: unknown key; valid keys: r, alpha"),
    ({"model": {}, "train": {}}, r"train.output_dir is required"),
    ({"train": {"output_dir": "x"}}, r"`model` is required"),
    ({"model": "nowhere.yaml", "train": {"output_dir": "x"}}, r"model file 'nowhere.yaml' not found"),
])
def test_bad_train_configs_are_named(cfg, message):
    with pytest.raises(ConfigError, match=message):
        parse_train_config(cfg)


def test_device_and_precision_checks():
    assert resolve_device(TrainArgs(device="cpu", bf16=True)) == "cpu"  # CPU autocast supports bfloat16
    with pytest.raises(ConfigError, match="bf16 and fp16 are both on"):
        resolve_device(TrainArgs(bf16=True, fp16=True))
    with pytest.raises(ConfigError, match="train.device: 'tpu'"):
        resolve_device(TrainArgs(device="tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device: cuda, but no CUDA device is visible"):
            resolve_device(TrainArgs(device="cuda"))
        with pytest.raises(ConfigError, match="train.fp16: float16 mixed precision needs a CUDA GPU"):
            resolve_device(TrainArgs(fp16=True))


def test_deepspeed_configs_leave_sizes_to_the_trainer():
    import json

    for path in sorted((REPO / "configs" / "deepspeed").glob("*.json")):
        ds = json.loads(Path(path).read_text())
        assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_accumulation_steps"] == "auto"
        assert ds["zero_optimization"]["stage"] in (2, 3)
        if ds["zero_optimization"]["stage"] == 3:
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_scheduler_settings_reach_the_trainer(tmp_path):
    """`train.lr_scheduler_kwargs` shapes the schedule: warmup_stable_decay holds the peak until its decay steps."""
    from transformers.optimization import get_scheduler

    from medm.train.trainer import training_arguments

    train = TrainArgs(output_dir=str(tmp_path), max_steps=100, learning_rate=1e-3, warmup_steps=10,
                      lr_scheduler_type="warmup_stable_decay", lr_scheduler_kwargs={"num_decay_steps": 20})
    args = training_arguments(train, "cpu")
    assert args.lr_scheduler_kwargs == {"num_decay_steps": 20}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=10, num_training_steps=100,
                          scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[10] == lrs[79] == pytest.approx(1e-3)  # stable from the end of warmup to the decay
    assert lrs[99] < 1e-4
    assert training_arguments(TrainArgs(output_dir=str(tmp_path)), "cpu").lr_scheduler_kwargs == {}
