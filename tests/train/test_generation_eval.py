"""Generation scored during training (`train.eval_task`): VQA accuracy of the model being trained logged with the
validation loss, recomputed here from the saved checkpoints; best-checkpoint selection and early stopping by it; the
best checkpoint in results.json and the model card."""

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_helpers import REPO, free_port, make_cfg, run_env
from transformers import TrainerState

from medm.config import ConfigError
from medm.infer import GenerationSettings, Predictor
from medm.interop.model_card import read_card_metadata
from medm.models import build_model
from medm.train._generation_eval import GenerationEval, validation_records
from medm.train.metrics import plot_loss, write_results
from medm.train.trainer import build_validation_data, run_training


def _eval_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r]


def _closed_accuracy(predictions, answers) -> float:
    """Percent of yes/no questions whose prediction's first yes / no word is the answer (written out here)."""
    hits = []
    for pred, answer in zip(predictions, answers):
        said = [w for w in re.findall(r"[a-z]+", pred.lower()) if w in ("yes", "no")]
        hits.append(bool(said) and said[0] == answer)
    return 100.0 * sum(hits) / len(hits)


def _val_records(cfg, trainer, limit):
    val = build_validation_data(cfg, trainer.model, trainer.processing_class)
    ids = list(dict.fromkeys(val.record(i).id for i in range(len(val))))[:limit]
    return [next(val.record(i) for i in range(len(val)) if val.record(i).id == rid) for rid in ids]


def test_vqa_accuracy_is_logged_and_picks_the_best_checkpoint(tmp_path, toy_data):
    out = tmp_path / "run"
    cfg = make_cfg(out, toy_data, max_steps=8, learning_rate=1e-2, eval_steps=2, save_strategy="steps",
                   save_steps=2, per_device_eval_batch_size=8, data_args={"val_size": 4}, eval_task="vqa",
                   eval_max_samples=3, eval_max_new_tokens=4, load_best_model_at_end=True,
                   metric_for_best_model="eval_closed_accuracy", report_to=["tensorboard"])
    trainer = run_training(cfg)
    rows = _eval_rows(out)
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    # Accuracy and loss in one log entry; on the first 3 of the 4 validation records.
    assert all({"eval_loss", "eval_closed_accuracy", "eval_overall"} <= set(r) and r["eval_n"] == 3 for r in rows)
    records = _val_records(cfg, trainer, 3)
    answers = [r.conversations[-1]["value"] for r in records]
    for row in rows:
        # What the checkpoint of that step answers, greedily, scored by the rule written above.
        predictor = Predictor.from_pretrained(str(out / f"checkpoint-{row['step']}"), image_dir=str(toy_data.parent))
        preds = [p for _, p in predictor.predict(records, settings=trainer.generation_eval.settings)]
        assert row["eval_closed_accuracy"] == pytest.approx(_closed_accuracy(preds, answers))
        written = [json.loads(line) for line in (out / "eval_predictions" / f"step-{row['step']}.jsonl")
                   .read_text().splitlines()]
        assert [w["prediction"] for w in written] == preds and [w["id"] for w in written] == [r.id for r in records]
    assert len({r["eval_closed_accuracy"] for r in rows}) > 1  # training changed the answers: the choice is real
    # The first evaluation with the highest accuracy is the best one, and the final weights are its.
    best = max(rows, key=lambda r: r["eval_closed_accuracy"])
    best_dir = str(out / f"checkpoint-{best['step']}")
    assert trainer.state.best_model_checkpoint == best_dir
    final = Predictor.from_pretrained(str(out), image_dir=str(toy_data.parent))
    preds = [p for _, p in final.predict(records, settings=trainer.generation_eval.settings)]
    assert _closed_accuracy(preds, answers) == pytest.approx(best["eval_closed_accuracy"])
    # results.json and the model card name that checkpoint and its figures.
    results = json.loads((out / "results.json").read_text())
    assert (results["best_checkpoint"], results["best_step"]) == (best_dir, best["step"])
    assert results["metric"] == "eval_closed_accuracy" and results["final_weights"] == "best"
    assert results["best"]["eval_closed_accuracy"] == best["eval_closed_accuracy"]
    assert [p["step"] for p in results["curve"]] == [2, 4, 6, 8]
    card = read_card_metadata(str(out))["validation"]
    assert (card["best_checkpoint"], card["best_step"]) == (best_dir, best["step"])
    assert card["best"]["eval_loss"] == pytest.approx(best["eval_loss"])
    text = (out / "README.md").read_text()
    assert f"Best by eval_closed_accuracy: step {best['step']}" in text and f"those of `{best_dir}`" in text
    # TensorBoard gets the same figures.
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("eval/closed_accuracy")]
    assert logged == [(r["step"], pytest.approx(r["eval_closed_accuracy"])) for r in rows]


def test_early_stopping_when_accuracy_stops_improving(tmp_path, toy_data):
    out = tmp_path / "run"
    # Learning rate 0: the answers never change, so every evaluation after the first is no improvement.
    cfg = make_cfg(out, toy_data, max_steps=20, learning_rate=0.0, eval_steps=2, save_strategy="steps",
                   save_steps=2, data_args={"val_size": 4}, eval_task="vqa", eval_max_new_tokens=2,
                   load_best_model_at_end=True, metric_for_best_model="eval_closed_accuracy",
                   early_stopping_patience=2)
    trainer = run_training(cfg)
    rows = _eval_rows(out)
    assert trainer.state.global_step == 6 < 20
    assert [r["step"] for r in rows] == [2, 4, 6] and len({r["eval_closed_accuracy"] for r in rows}) == 1
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-2")
    assert json.loads((out / "results.json").read_text())["best_step"] == 2


def test_loss_plot_draws_the_accuracy_curve(tmp_path):
    lines = [{"step": s, "loss": 3.0 / s} for s in (1, 2, 3, 4)]
    lines += [{"step": s, "eval_loss": 2.0 / s, "eval_closed_accuracy": 20.0 * s} for s in (2, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    from PIL import Image

    plot_loss(str(tmp_path))
    plain = Image.open(tmp_path / "loss.png").size
    plot_loss(str(tmp_path), ["eval_closed_accuracy", "eval_open_recall"])  # one logged, one not: drawn, skipped
    assert Image.open(tmp_path / "loss.png").size[1] > plain[1]  # a second panel under the loss


def test_records_without_a_reference_fail_before_training(tmp_path, toy_data):
    cfg = make_cfg(tmp_path / "run", toy_data, data_args={"val_size": 4}, eval_task="vqa")
    model, tokenizer = build_model(cfg.model)
    records, image_dir = validation_records(build_validation_data(cfg, model, tokenizer), 2)
    assert len(records) == 2 and image_dir == str(toy_data.parent)
    records[1].conversations = records[1].conversations[:1]  # no answer turn
    with pytest.raises(ConfigError, match=f"id '{records[1].id}'.* has no 'answer'"):
        GenerationEval("vqa", records)


@pytest.mark.parametrize("train, data, message", [
    ({"eval_task": "vqa_rad"}, {"val_size": 2},
     r"train.eval_task: 'vqa_rad' is not a medm eval task; known: .*vqa-rad"),
    ({"eval_task": "vqa"}, {}, "train.eval_task scores generation at each evaluation, but there is none"),
    ({"eval_task": "vqa", "eval_strategy": "no"}, {"val_size": 2}, "but there is none"),
    ({"metric_for_best_model": "eval_closed_accuracy"}, {"val_size": 2},
     r"train.metric_for_best_model: 'eval_closed_accuracy' is not logged; without train.eval_task"),
])
def test_eval_task_settings_fail_when_read(tmp_path, toy_data, train, data, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(tmp_path / "run", toy_data, data_args=data, **train)


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "zero3"])
def test_two_ranks_share_the_records_and_log_the_same_figures(tmp_path, toy_data, launch):
    """Each rank answers part of the records (ZeRO-3: in step, every rank in every forward pass); both log the
    figures of all of them, and the answers are those of the saved checkpoint."""
    out = tmp_path / "run"
    train = {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "eval_steps": 2,
             "save_strategy": "steps", "save_steps": 2, "per_device_eval_batch_size": 2, "eval_task": "vqa",
             "eval_max_new_tokens": 4}
    if launch == "zero3":
        train["deepspeed"] = str(REPO / "configs" / "deepspeed" / "zero3.json")
    spec = {"out": str(out), "data": str(toy_data), "stage": {}, "train": train, "data_args": {"val_size": 5}}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "tests" / "train" / "train_worker.py"), json.dumps(spec)]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert [r["zero_stage"] for r in ranks] == [3 if launch == "zero3" else None] * 2
    evals = [[{k: v for k, v in e.items() if not k.startswith(("eval_runtime", "eval_samples", "eval_steps"))}
              for e in r["evals"]] for r in ranks]
    assert [e["step"] for e in evals[0]] == [2, 4] and evals[0] == evals[1]  # same figures: same best checkpoint
    assert all(e["eval_n"] == 5 for e in evals[0])  # 3 records on one rank, 2 (and a repeat) on the other
    cfg = make_cfg(out, toy_data, data_args={"val_size": 5})
    model, tokenizer = build_model(cfg.model)
    records, _ = validation_records(build_validation_data(cfg, model, tokenizer), 5)
    predictor = Predictor.from_pretrained(str(out / "checkpoint-2"), image_dir=str(toy_data.parent))
    # In the ranks' batches (3 records on rank 0, 2 on rank 1, two at a time): batch shapes change float sums.
    settings = GenerationSettings(max_new_tokens=4)
    expected = [p for part in (records[:3], records[3:])
                for _, p in predictor.predict(part, batch_size=2, settings=settings)]
    written = (out / "eval_predictions" / "step-2.jsonl").read_text().splitlines()
    assert [json.loads(line)["prediction"] for line in written] == expected
    answers = [r.conversations[-1]["value"] for r in records]
    assert evals[0][0]["eval_closed_accuracy"] == pytest.approx(_closed_accuracy(expected, answers))


def test_results_name_the_best_evaluation_of_a_run_without_checkpoints(tmp_path):
    # save_strategy: no (the demo): the Trainer tracks the best figure but no checkpoint holds it.
    logs = [{"step": s, "eval_loss": 1.0 / s, "eval_closed_accuracy": a, "eval_runtime": 0.1}
            for s, a in ((10, 40.0), (20, 70.0), (30, 60.0))]
    state = TrainerState(global_step=30, log_history=[{"step": 5, "loss": 2.0}, *logs], best_metric=70.0)
    args = SimpleNamespace(metric_for_best_model="eval_closed_accuracy", load_best_model_at_end=False)
    results = json.loads(open(write_results(str(tmp_path), state, args)).read())
    assert (results["best_step"], results["best_metric"], results["final_weights"]) == (20, 70.0, "last")
    assert "best_checkpoint" not in results and results["best"] == {"eval_loss": 0.05, "eval_closed_accuracy": 70.0}
    assert results["last"] == {"step": 30, "eval_loss": 1.0 / 30, "eval_closed_accuracy": 60.0}
    assert [p["step"] for p in results["curve"]] == [10, 20, 30] and results["evaluations"] == 3
