"""README.md model cards: written by `run_training` (output_dir and every checkpoint-N), by `medm export --merge`,
by `medm export --to llava-hf` and by `medm import llava-hf`; the whole cycle import -> train -> export runs here."""

import json
import re

import pytest
from interop_helpers import tiny_model, write_bright_dark
from transformers import AutoModelForImageTextToText

from medm.cli import main
from medm.config import load_yaml
from medm.interop.model_card import NOT_CLINICAL, SECTIONS, read_card_metadata, write_model_card
from medm.models import load_model, save_model
from medm.train.args import parse_train_config
from medm.train.metrics import read_metrics
from medm.train.trainer import run_training


def _card(path):
    text = (path / "README.md").read_text()
    # Every section, in order, and the clinical-use warning in full.
    at = [text.index(s + "\n") for s in SECTIONS]
    assert at == sorted(at), "sections out of order"
    assert NOT_CLINICAL in text
    return text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA stage trained (2 steps, a checkpoint each step) from an imported llava-hf checkpoint."""
    root = tmp_path_factory.mktemp("card")
    model, tok = tiny_model()
    save_model(model, tok, str(root / "medm"))
    assert main(["export", "--to", "llava-hf", str(root / "medm"), str(root / "llava")]) == 0
    assert main(["import", "llava-hf", str(root / "llava"), str(root / "imported")]) == 0
    data = write_bright_dark(root / "data")
    cfg = parse_train_config({
        "model": load_yaml(str(root / "imported" / "model.yaml")),
        "stage": {"llm": "lora", "init_from": str(root / "imported"), "lora": {"r": 4, "alpha": 8}},
        "data": {"path": str(data), "image_dir": str(data.parent), "max_length": 128},
        "train": {"output_dir": str(root / "run"), "max_steps": 2, "per_device_train_batch_size": 4,
                  "learning_rate": 1e-3, "warmup_steps": 0, "logging_steps": 1, "save_strategy": "steps",
                  "save_steps": 1, "report_to": [], "disable_tqdm": True, "device": "cpu", "plot_loss": False}})
    run_training(cfg)
    return root, data


def test_training_writes_cards_with_data_plan_and_figures(trained):
    root, data = trained
    run = root / "run"
    text = _card(run)
    meta = read_card_metadata(str(run))
    assert meta["format"] == "lora"
    assert meta["data"]["path"] == str(data) and f"- `{data}`" in text
    # The plan with its defaults filled in; PEFT's generic card (saved with the final adapter) is replaced by ours.
    assert "| vision | frozen |\n| connector | full |\n| llm | lora |" in text
    assert re.search(r"^library_name: medm$", text, re.M) and "Framework versions" not in text
    assert meta["stage"]["init_from"] == str(root / "imported")
    losses = [r["loss"] for r in read_metrics(str(run)) if "loss" in r]
    assert meta["training"]["steps"] == 2
    assert meta["training"]["final_loss"] == pytest.approx(losses[-1])
    assert f"| Final training loss (last logged step) | {losses[-1]:.4f} |" in text
    assert "Predictor.from_pretrained" in text and "medm export --merge" in text
    assert meta["components"]["connector"] == "mlp (type=mlp2x_gelu)"
    for step in (1, 2):
        ckpt_meta = read_card_metadata(str(run / f"checkpoint-{step}"))
        _card(run / f"checkpoint-{step}")
        assert ckpt_meta["training"]["steps"] == step and ckpt_meta["format"] == "lora"


def test_merge_and_llava_exports_carry_the_card_forward(trained, tmp_path):
    root, data = trained
    run_meta = read_card_metadata(str(root / "run"))
    assert main(["export", "--merge", str(root / "run"), str(tmp_path / "merged")]) == 0
    merged = read_card_metadata(str(tmp_path / "merged"))
    _card(tmp_path / "merged")
    assert merged["format"] == "full" and merged["source"] == str(root / "run")
    assert merged["data"] == run_meta["data"] and merged["stage"] == run_meta["stage"]
    assert merged["training"]["final_loss"] == run_meta["training"]["final_loss"]
    load_model(str(tmp_path / "merged"))

    metrics = tmp_path / "eval" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"task": "vqa-rad", "protocol": "strict", "closed_accuracy": 61.5, "n": 40,
                                   "breakdown": {"answer_type": {}}}))
    assert main(["export", "--to", "llava-hf", str(root / "run"), str(tmp_path / "llava"),
                 "--eval-metrics", str(metrics)]) == 0
    text = _card(tmp_path / "llava")
    meta = read_card_metadata(str(tmp_path / "llava"))
    assert re.search(r"^library_name: transformers$", text, re.M)
    assert meta["format"] == "llava-hf" and meta["evaluation"] == {"vqa-rad (strict)": {"closed_accuracy": 61.5,
                                                                                        "n": 40}}
    assert "| closed_accuracy | 61.50 |" in text and f"- `{data}`" in text
    assert "AutoModelForImageTextToText.from_pretrained" in text
    AutoModelForImageTextToText.from_pretrained(tmp_path / "llava")


def test_import_card_names_its_source(trained):
    root, _ = trained
    text = _card(root / "imported")
    meta = read_card_metadata(str(root / "imported"))
    assert meta["format"] == "full" and meta["source"] == str(root / "llava")
    assert "medm import llava-hf" in text and "model.yaml" in text


def test_card_without_training_says_not_recorded(tmp_path):
    model, tok = tiny_model()
    save_model(model, tok, str(tmp_path))
    (tmp_path / "metrics.json").write_text(json.dumps({"task": "slake", "protocol": "lenient", "accuracy": 12.0}))
    write_model_card(str(tmp_path))
    text = _card(tmp_path)
    assert text.count("Not recorded") == 3  # data, procedure, results
    assert "| accuracy | 12.00 |" in text
    assert "| Parameters stored here |" in text
