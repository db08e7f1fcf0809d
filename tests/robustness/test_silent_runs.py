"""Runs that used to "succeed" without doing anything (issue 26 item 5): an empty data file, or a `data.max_length`
that drops every record, trained 0 steps and exited 0; a checkpoint without its connector tensors loaded with a
random connector and answered. Each is now an error naming the cause."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from train_helpers import make_cfg

from medm.cli import main
from medm.config import ConfigError, load_yaml
from medm.data.annotations import AnnotationError, load_records
from medm.infer.predictions import run_inference
from medm.models import build_model, save_model
from medm.models.builder import load_model
from medm.models.tiny import tiny_model_config
from medm.train.trainer import run_training


def test_an_empty_data_file_is_an_error_not_a_run_of_zero_steps(tmp_path, capsys):
    empty = tmp_path / "train.json"
    empty.write_text("[]")
    run = tmp_path / "run"
    with pytest.raises(AnnotationError, match=r"train\.json holds no records"):
        run_training(make_cfg(run, empty))
    assert not (run / "model.safetensors").exists()
    # The command line says so and fails.
    cfg = {"model": tiny_model_config(), "data": {"path": str(empty)},
           "train": {"output_dir": str(run), "max_steps": 2, "report_to": [], "device": "cpu"}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "train.yaml")]) == 2
    assert "holds no records" in capsys.readouterr().err
    assert not (run / "model.safetensors").exists()


def test_every_record_dropped_by_max_length_is_an_error(tmp_path, toy_data):
    cfg = make_cfg(tmp_path / "run", toy_data)
    cfg.data["max_length"] = 8  # shorter than one image's tokens: no answer survives
    with pytest.raises(ConfigError, match=r"data\.max_length=8: every one of the 16 record\(s\).*dropped"):
        run_training(cfg)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_checkpoint_without_its_connector_does_not_load(tmp_path, toy_data):
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    save_model(*build_model(tiny_model_config()), str(ckpt))
    weights = load_file(ckpt / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("connector.")}, ckpt / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 4 weight\(s\).*connector\.mlp\.0\.weight"):
        load_model(str(ckpt))
    out = tmp_path / "preds.jsonl"
    with pytest.raises(ValueError, match="connector"):
        run_inference(str(ckpt), load_records(str(toy_data))[:2], str(out), image_dir=str(toy_data.parent),
                      device="cpu", progress=False)
    assert not out.exists() or out.read_text() == ""
    # A complete checkpoint still loads.
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_model(str(ckpt))
    assert torch.equal(model.connector.mlp[0].weight, weights["connector.mlp.0.weight"])
    assert json.loads((ckpt / "config.json").read_text())["connector"]["name"] and os.path.isdir(ckpt)


def test_a_qwen_vl_checkpoint_without_its_merger_does_not_load(tmp_path):
    torch.manual_seed(0)
    cfg = load_yaml(str(Path(__file__).resolve().parents[2] / "configs/model/tiny-qwen2.5-vl.yaml"))
    ckpt = tmp_path / "qwenvl"
    save_model(*build_model(cfg), str(ckpt))
    weights = load_file(ckpt / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".merger." not in k}, ckpt / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 5 weight\(s\).*model\.visual\.merger\.ln_q\.weight"):
        load_model(str(ckpt))
