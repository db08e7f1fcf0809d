"""Validation during training on the qwen-vl kind: val_size split, eval_loss logged, best checkpoint restored."""

import pytest
import torch
from test_qwenvl_train import _answer_loss, _cfg

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
