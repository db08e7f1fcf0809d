"""Tiny pretrain -> finetune (full and LoRA) on bright-vs-dark images: losses fall, answers follow the image,
frozen weights stay put, checkpoints reopen, LoRA merges to the same outputs, logs are written."""

import json
import logging

import pytest
import torch
from train_helpers import RecordStart, answer_loss, make_cfg

from medm.cli import main as medm_main
from medm.models import load_model
from medm.models.tiny import tiny_model_config
from medm.train.checkpoint import load_init_weights, load_trained, read_meta
from medm.train.trainer import build_training_data, run_training

pytestmark = pytest.mark.slow


def _yes_no_accuracy(model, tokenizer, dataset, collator) -> float:
    """Share of images whose answer position prefers the right one of "yes" (bright) / "no" (dark)."""
    yes, no = (tokenizer.convert_tokens_to_ids(tokenizer.tokenize(w))[0] for w in ("yes", "no"))
    batch = collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits
    first = (batch["labels"] != -100).float().argmax(1) - 1  # the position that predicts the answer
    rows = logits[torch.arange(len(first)), first]
    truth = torch.tensor([dataset.record(i).conversations[-1]["value"] == "yes" for i in range(len(dataset))])
    return float(((rows[:, yes] > rows[:, no]) == truth).float().mean())


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@pytest.fixture(scope="module")
def stages(tmp_path_factory, toy_data):
    """Run pretrain, then full and LoRA finetunes from it; record losses before / after each."""
    root = tmp_path_factory.mktemp("stages")
    runs = {}
    plans = {"pretrain": ({"llm": "frozen"}, {}),
             "full": ({"init_from": str(root / "pretrain")}, {}),
             "lora": ({"llm": "lora", "init_from": str(root / "pretrain"), "lora": {"r": 8, "alpha": 16}},
                      {"connector_lr": 1e-3, "learning_rate": 3e-3, "report_to": ["tensorboard"]})}
    for name, (stage, extra) in plans.items():
        start = RecordStart()
        cfg = make_cfg(root / name, toy_data, stage, max_steps=8, save_strategy="steps", save_steps=4, **extra)
        trainer = run_training(cfg, callbacks=[start])
        runs[name] = {"dir": root / name, "trainer": trainer, "cfg": cfg,
                      "before": {k.removeprefix("base_model.model."): v for k, v in start.state.items()},
                      "model": trainer.model}
    return runs


def _data(run):
    return build_training_data(run["cfg"], _base(run["model"]), run["trainer"].processing_class)


def test_each_stage_lowers_the_loss_and_finetunes_follow_the_image(stages):
    pre, full, lora = stages["pretrain"], stages["full"], stages["lora"]
    ds, col = _data(pre)
    losses = [h["loss"] for h in pre["trainer"].state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    pre_loss = answer_loss(pre["model"], ds, col)
    for run in (full, lora):
        logged = [h["loss"] for h in run["trainer"].state.log_history if "loss" in h]
        # The first logged loss is the pretrained model's: init_from really carried the connector over.
        assert logged[0] == pytest.approx(pre_loss, rel=1e-3)
        assert answer_loss(run["model"], ds, col) < pre_loss - 0.3
        assert _yes_no_accuracy(run["model"], run["trainer"].processing_class, ds, col) == 1.0


def test_frozen_weights_stay_put_and_planned_ones_move(stages):
    def changed(run, prefix):
        now = _state(_base(run["model"]))
        return {k for k, v in run["before"].items() if k.startswith(prefix) and not torch.equal(v, now[k])}

    pre = stages["pretrain"]
    assert changed(pre, "connector.") and not changed(pre, "llm.") and not changed(pre, "vision.")
    full = stages["full"]
    assert changed(full, "connector.") and changed(full, "llm.") and not changed(full, "vision.")


def test_pretrain_saves_only_the_connector_and_init_from_loads_it(stages):
    pre = stages["pretrain"]
    meta = read_meta(str(pre["dir"]))
    assert meta["format"] == "components" and meta["components"] == ["connector"]
    from safetensors.torch import load_file

    saved = load_file(str(pre["dir"] / "components.safetensors"))
    assert saved and all(k.startswith("connector.") for k in saved)
    # A new model picks up exactly the trained connector.
    trained = pre["model"].state_dict()
    reopened = load_trained(str(pre["dir"]))[0].state_dict()
    assert all(torch.equal(v, trained[k]) and torch.equal(reopened[k], v) for k, v in saved.items())
    fresh, _ = load_model(str(pre["dir"] / "base"))
    load_init_weights(fresh, str(pre["dir"]))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())


def test_full_finetune_checkpoint_opens_with_load_model(stages):
    full = stages["full"]
    assert read_meta(str(full["dir"]))["format"] == "full"
    model, tok = load_model(str(full["dir"]))
    ds, col = _data(full)
    assert answer_loss(model, ds, col) == pytest.approx(answer_loss(full["model"], ds, col), rel=1e-5)


def test_lora_checkpoint_reloads_and_merges_to_the_same_outputs(stages, tmp_path):
    lora = stages["lora"]
    assert (lora["dir"] / "adapter_model.safetensors").is_file()
    assert not (lora["dir"] / "model.safetensors").exists()
    ds, col = _data(lora)
    batch = col([ds[i] for i in range(4)])
    with torch.no_grad():
        trained = lora["model"].eval()(**batch).logits
        adapter, _ = load_trained(str(lora["dir"]), merge=False)
        from_adapter = adapter(**batch).logits
        assert medm_main(["export", "--merge", str(lora["dir"]), str(tmp_path / "merged")]) == 0
        merged, _ = load_model(str(tmp_path / "merged"))
        from_merged = merged.eval()(**batch).logits
    assert type(adapter).__name__ == "PeftModel" and type(merged).__name__ == "MedMForConditionalGeneration"
    torch.testing.assert_close(from_adapter, trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_merged, from_adapter, rtol=1e-4, atol=1e-4)
    # Intermediate checkpoints are adapters too, and find their base.
    assert read_meta(str(lora["dir"] / "checkpoint-4"))["base"] == "../base"
    load_trained(str(lora["dir"] / "checkpoint-4"))


def test_connector_has_its_own_learning_rate(stages):
    opt = stages["lora"]["trainer"].optimizer
    base = stages["lora"]["model"].get_base_model()
    conn = {id(p) for p in base.connector.parameters() if p.requires_grad}
    lrs = {("connector" if any(id(p) in conn for p in g["params"]) else "other"): g["initial_lr"]
           for g in opt.param_groups}
    assert lrs == {"connector": 1e-3, "other": 3e-3}
    assert all(all(id(p) in conn for p in g["params"]) or not any(id(p) in conn for p in g["params"])
               for g in opt.param_groups)


def test_logs_metrics_plot_and_tensorboard(stages):
    d = stages["lora"]["dir"]
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 9)) and all(r["loss"] > 0 for r in records if "loss" in r)
    png = (d / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert list((d / "tensorboard").glob("events.out.tfevents.*"))


def test_trainable_parameters_without_gradient_are_reported(tmp_path, toy_data, caplog):
    # The tiny open_clip tower selects block -2 and stops there, and (unlike the HF towers, whose unused blocks stay
    # frozen) does not say so: its last block never reaches the loss.
    with caplog.at_level(logging.WARNING, logger="medm.train.trainer"):
        run_training(make_cfg(tmp_path, toy_data, {"vision": "full", "llm": "frozen"},
                              tiny_model_config(vision="open_clip"), max_steps=1))
    assert "trainable parameters got no gradient" in caplog.text and ".resblocks.1." in caplog.text
