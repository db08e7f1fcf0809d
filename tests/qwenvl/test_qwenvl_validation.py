"""Validation during training on the qwen-vl kind: val_size split, eval_loss logged, best checkpoint restored, VQA
accuracy of generated answers (train.eval_task)."""

import json
import re
from pathlib import Path

import pytest
import torch
from test_qwenvl_train import _answer_loss, _cfg

from medm.infer import GenerationSettings, Predictor
from medm.train.metrics import read_metrics
from medm.train.trainer import build_validation_data, run_training


def test_qwenvl_validation_loss_and_best_checkpoint(phantoms, tmp_path):
    # greater_is_better on a falling loss makes the first evaluation the best: restoring it is visible.
    cfg = _cfg(tmp_path, phantoms, "qwen2_5_vl", "data.val_size=6", "train.max_steps=4", "train.eval_steps=2",
               "train.save_strategy=steps", "train.save_steps=2", "train.load_best_model_at_end=true",
               "train.greater_is_better=true", "train.per_device_eval_batch_size=8")
    trainer = run_training(cfg)
    rows = [r for r in read_metrics(str(tmp_path)) if "eval_loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    val = build_validation_data(cfg, trainer.model.get_base_model(), trainer.processing_class)
    assert len({val.record(i).id for i in range(len(val))}) == 6
    assert not {val.record(i).id for i in range(len(val))} & {
        trainer.train_dataset.record(i).id for i in range(len(trainer.train_dataset))}
    best = max(rows, key=lambda r: r["eval_loss"])
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best['step']}")
    with torch.no_grad():
        assert _answer_loss(trainer.model, val) == pytest.approx(best["eval_loss"], rel=1e-4)


def test_qwenvl_vqa_accuracy_during_training(phantoms, tmp_path):
    """train.eval_task on the qwen-vl kind (LoRA): accuracy logged with eval_loss, as its checkpoints answer."""
    # Every answer "y" (one token): within a few steps the tiny model learns to say it, so the accuracy moves.
    records = json.loads(Path(phantoms["train"]).read_text())
    for r in records:
        r["answer"] = r["conversations"][-1]["value"] = "y"
    (tmp_path / "y.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    cfg = _cfg(out, {**phantoms, "train": str(tmp_path / "y.json")}, "qwen2_5_vl", "data.val_size=6",
               "train.max_steps=10", "train.eval_steps=5", "train.save_strategy=steps", "train.save_steps=5",
               "train.save_total_limit=null", "train.per_device_eval_batch_size=8", "train.eval_task=vqa",
               "train.eval_max_samples=5", "train.eval_max_new_tokens=4")
    trainer = run_training(cfg)
    rows = [r for r in read_metrics(str(out)) if "eval_loss" in r]
    assert [r["step"] for r in rows] == [5, 10] and all(r["eval_n"] == 5 for r in rows)
    val = build_validation_data(cfg, trainer.model.get_base_model(), trainer.processing_class)
    val_records = [val.record(i) for i in range(5)]
    for row in rows:
        predictor = Predictor.from_pretrained(str(out / f"checkpoint-{row['step']}"), image_dir=phantoms["image_dir"])
        preds = [p for _, p in predictor.predict(val_records, settings=GenerationSettings(max_new_tokens=4))]
        plain = [" ".join(re.findall(r"[a-z0-9]+", p.lower())) == "y" for p in preds]
        assert row["eval_exact_match"] == pytest.approx(100 * sum(plain) / len(plain))
    assert rows[0]["eval_exact_match"] < rows[-1]["eval_exact_match"]  # the figures follow what it learns
