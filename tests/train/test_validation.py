"""Validation during training: a reproducible split by record id, the validation loss logged at eval_steps, the
best checkpoint restored at the end, early stopping."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import answer_loss, make_cfg

from medm.config import ConfigError
from medm.data.validation import split_validation
from medm.models import build_model
from medm.train.metrics import read_metrics
from medm.train.trainer import build_training_inputs, build_validation_data, run_training


def _eval_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r]


def test_val_size_split_is_disjoint_by_record_id_and_reproducible(tmp_path, toy_data):
    cfg = make_cfg(tmp_path / "run", toy_data, data_args={"val_size": 0.25, "val_seed": 3})
    model, tokenizer = build_model(cfg.model)
    train, _, _ = build_training_inputs(cfg, model, tokenizer)
    val = build_validation_data(cfg, model, tokenizer)
    train_ids = {train.record(i).id for i in range(len(train))}
    val_ids = {val.record(i).id for i in range(len(val))}
    assert len(val_ids) == 4 and len(train_ids) == 12 and not train_ids & val_ids
    again = build_validation_data(cfg, model, tokenizer)
    assert [again.record(i).id for i in range(len(again))] == [val.record(i).id for i in range(len(val))]
    other = make_cfg(tmp_path / "run", toy_data, data_args={"val_size": 0.25, "val_seed": 4})
    other_val = build_validation_data(other, model, tokenizer)
    assert {other_val.record(i).id for i in range(len(other_val))} != val_ids  # the seed picks the records
    count = make_cfg(tmp_path / "run", toy_data, data_args={"val_size": 5})
    assert len(build_validation_data(count, model, tokenizer)) == 5


def test_split_keeps_every_sample_of_an_id_on_one_side():
    samples = [SimpleNamespace(record=SimpleNamespace(id=f"r{i // 2}")) for i in range(20)]  # two samples per id
    ds = SimpleNamespace(samples=samples, bad_samples=SimpleNamespace(max_bad_samples=None))
    train, val = split_validation(ds, 0.3, seed=0)
    val_ids = {s.record.id for s in val.samples}
    assert len(val_ids) == 3 and len(val.samples) == 6 and len(train.samples) == 14
    assert not val_ids & {s.record.id for s in train.samples}
    with pytest.raises(ConfigError, match="leaves no training records"):
        split_validation(ds, 10, seed=0)


def test_validation_loss_is_logged_at_eval_steps(tmp_path, toy_data):
    out = tmp_path / "run"
    cfg = make_cfg(out, toy_data, max_steps=6, eval_steps=2, per_device_eval_batch_size=8,
                   data_args={"val_size": 4})
    trainer = run_training(cfg)
    rows = _eval_rows(out)
    assert [r["step"] for r in rows] == [2, 4, 6]
    # The last one is the loss of the final weights on the validation records, recomputed here in one batch.
    val = build_validation_data(cfg, trainer.model, trainer.processing_class)
    expected = answer_loss(trainer.model, val, trainer.data_collator)
    assert rows[-1]["eval_loss"] == pytest.approx(expected, rel=1e-4)
    # What loss.png and the model card read: every evaluation, the last one too (it shares its step with the
    # run's summary line).
    assert [r["step"] for r in read_metrics(str(out)) if "eval_loss" in r] == [2, 4, 6]
    assert (out / "loss.png").is_file()


def test_val_path_records_are_the_validation_set(tmp_path, toy_data):
    records = json.loads(toy_data.read_text())
    (tmp_path / "train.json").write_text(json.dumps(records[:12]))
    (tmp_path / "val.json").write_text(json.dumps(records[12:]))
    (tmp_path / "images").symlink_to(toy_data.parent / "images")
    out = tmp_path / "run"
    cfg = make_cfg(out, tmp_path / "train.json", max_steps=2, eval_steps=1, per_device_eval_batch_size=8,
                   data_args={"val_path": str(tmp_path / "val.json")})
    trainer = run_training(cfg)
    val = build_validation_data(cfg, trainer.model, trainer.processing_class)
    assert [val.record(i).id for i in range(len(val))] == [r["id"] for r in records[12:]]
    assert len(trainer.train_dataset) == 12
    rows = _eval_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["eval_loss"] == pytest.approx(answer_loss(trainer.model, val, trainer.data_collator), rel=1e-4)


@pytest.mark.parametrize("stage", [{}, {"llm": "frozen"}, {"llm": "lora"}], ids=["full", "components", "lora"])
def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path, toy_data, stage):
    out = tmp_path / "run"
    # greater_is_better on a falling loss makes the first evaluation the best: restoring it is visible.
    cfg = make_cfg(out, toy_data, stage, max_steps=6, eval_steps=2, save_strategy="steps", save_steps=2,
                   per_device_eval_batch_size=8, load_best_model_at_end=True, greater_is_better=True,
                   data_args={"val_size": 4})
    trainer = run_training(cfg)
    rows = _eval_rows(out)
    best = max(rows, key=lambda r: r["eval_loss"])
    assert best["step"] != rows[-1]["step"]
    assert trainer.state.best_model_checkpoint == str(out / f"checkpoint-{best['step']}")
    if not stage:
        saved = load_file(f"{trainer.state.best_model_checkpoint}/model.safetensors")
        state = trainer.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items())
    val = build_validation_data(cfg, trainer.model, trainer.processing_class)
    assert answer_loss(trainer.model, val, trainer.data_collator) == pytest.approx(best["eval_loss"], rel=1e-4)


def test_early_stopping_stops_before_max_steps(tmp_path, toy_data):
    out = tmp_path / "run"
    # No change is larger than the threshold: every evaluation after the first counts as no improvement.
    cfg = make_cfg(out, toy_data, max_steps=20, eval_steps=2, save_strategy="steps", save_steps=2,
                   load_best_model_at_end=True, early_stopping_patience=2, early_stopping_threshold=100.0,
                   data_args={"val_size": 4})
    trainer = run_training(cfg)
    assert trainer.state.global_step == 6 < 20
    assert [r["step"] for r in _eval_rows(out)] == [2, 4, 6]


@pytest.mark.parametrize("train, data, message", [
    ({"eval_strategy": "steps"}, {}, "needs validation data"),
    ({"early_stopping_patience": 2}, {"val_size": 2}, "needs train.load_best_model_at_end"),
    ({"load_best_model_at_end": True, "save_strategy": "no"}, {"val_size": 2}, "save_strategy"),
    ({"load_best_model_at_end": True, "save_strategy": "steps", "save_steps": 5, "eval_steps": 2}, {"val_size": 2},
     "multiple of train.eval_steps"),
    ({}, {"val_size": 2, "val_path": "x.json"}, "val_path and data.val_size"),
    ({}, {"val_size": 2.5}, "neither a fraction"),
])
def test_validation_settings_that_cannot_work_fail_when_read(tmp_path, toy_data, train, data, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(tmp_path / "run", toy_data, data_args=data, **train)
