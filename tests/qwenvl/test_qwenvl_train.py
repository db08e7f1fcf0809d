"""Qwen-VL fine-tuning through the shared stage plans and `run_training`; checkpoints, Predictor, medm infer / eval."""

import json
from pathlib import Path

import pytest
import torch
from qwenvl_helpers import REPO, tiny_cfg

from medm.cli import main as medm_main
from medm.data._bad_samples import TooManyBadSamples
from medm.data.annotations import load_records
from medm.data.dataset import DataArgs, build_dataset
from medm.eval.metrics import grounding_scores
from medm.infer import GenerationSettings, Predictor, predictor_for
from medm.models import load_model
from medm.qwenvl.infer import QwenVLPredictor
from medm.train.args import load_train_config
from medm.train.checkpoint import export_merged, load_trained, read_meta
from medm.train.metrics import read_metrics
from medm.train.trainer import run_training

YAML = {"qwen2_vl": "configs/model/tiny-qwen2-vl.yaml", "qwen2_5_vl": "configs/model/tiny-qwen2.5-vl.yaml"}


def _cfg(out: Path, phantoms: dict, model_type: str = "qwen2_5_vl", *overrides: str):
    """configs/train/finetune_qwenvl.yaml (LoRA on the LM) on the tiny model, a few quiet CPU steps."""
    return load_train_config(str(REPO / "configs/train/finetune_qwenvl.yaml"), [
        f"model={REPO / YAML[model_type]}", f"data.path={phantoms['train']}", f"data.image_dir={phantoms['image_dir']}",
        "data.max_length=128", f"train.output_dir={out}", "train.max_steps=12", "train.per_device_train_batch_size=8",
        "train.gradient_accumulation_steps=1", "train.learning_rate=0.01", "train.warmup_steps=0",
        "train.lr_scheduler_type=constant", "train.bf16=false", "train.deepspeed=null", "train.device=cpu",
        "train.report_to=[]", "train.dataloader_num_workers=0", "train.logging_steps=1", "train.save_strategy=\"no\"",
        "train.disable_tqdm=true", "train.gradient_checkpointing=false", "train.plot_loss=false",
        "train.train_sampling_strategy=sequential", *overrides])


@torch.no_grad()
def _answer_loss(model, dataset) -> float:
    model.eval()
    batch = dataset.collator()([dataset[i] for i in range(len(dataset))])
    return float(model(**batch).loss)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, phantoms):
    """A LoRA run of the tiny Qwen2.5-VL: (output dir, trainer)."""
    out = tmp_path_factory.mktemp("qwenvl_lora")
    return out, run_training(_cfg(out, phantoms))


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_lora_finetuning_lowers_the_answer_loss(model_type, phantoms, tmp_path, lora_run):
    if model_type == "qwen2_5_vl":
        out, trainer = lora_run
    else:
        out, trainer = tmp_path, run_training(_cfg(tmp_path, phantoms, model_type))
    base, _ = load_trained(str(out / "base"))
    dataset = trainer.train_dataset
    before, after = _answer_loss(base, dataset), _answer_loss(trainer.model, dataset)
    assert after < before - 0.3, (before, after)
    assert read_meta(str(out))["format"] == "lora"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert {t.rsplit(".", 1)[-1] for t in adapter["target_modules"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(".language_model." in t for t in adapter["target_modules"])


def test_saved_adapter_reloads_with_identical_outputs(lora_run, phantoms, tmp_path):
    out, trainer = lora_run
    dataset = trainer.train_dataset
    batch = dataset.collator()([dataset[i] for i in range(4)])
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(**batch).logits
        fresh, processor = load_trained(str(out), merge=False)  # a new base model + the saved adapter
        assert torch.equal(fresh(**batch).logits, want)
        merged, _ = load_trained(str(out))  # folded into the weights: the same up to float rounding
        torch.testing.assert_close(merged(**batch).logits, want, atol=1e-4, rtol=1e-4)
        # medm export --merge: a standalone checkpoint (no adapter, no base dir) with the same outputs.
        exported = export_merged(str(out), str(tmp_path / "merged"))
        assert not (tmp_path / "merged" / "adapter_config.json").exists()
        torch.testing.assert_close(load_model(exported)[0](**batch).logits, want, atol=1e-4, rtol=1e-4)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"


def test_predictor_and_medm_infer_on_the_checkpoint(lora_run, phantoms, tmp_path):
    out, trainer = lora_run
    predictor = Predictor.from_pretrained(str(out), image_dir=phantoms["image_dir"])
    assert isinstance(predictor, QwenVLPredictor)
    test = load_records(phantoms["test"])[:6]
    settings = GenerationSettings(max_new_tokens=4)
    preds = [p for _, p in predictor.predict(test, batch_size=4, settings=settings)]
    # Batched (left-padded) answers equal one-by-one answers, and the in-memory trained model's.
    alone = [next(predictor.predict([r], settings=settings))[1] for r in test]
    live = predictor_for(trainer.model, trainer.processing_class, image_dir=phantoms["image_dir"])
    assert preds == alone == [p for _, p in live.predict(test, batch_size=6, settings=settings)]
    assert all(isinstance(p, str) and "<|" not in p for p in preds)
    blank = [p for _, p in predictor.predict(test, batch_size=6, settings=settings, blank_images=True)]
    assert len(blank) == len(test)
    streamed = list(predictor.stream(test[0].messages()[:-1], images=[str(Path(phantoms["image_dir"]) /
                                                                      test[0].image[0])], settings=settings))
    assert streamed[-1] == preds[0]

    pred_file = tmp_path / "preds.jsonl"
    assert medm_main(["infer", "--model", str(out), "--data", phantoms["test"], "--image-dir", phantoms["image_dir"],
                      "--out", str(pred_file), "--max-new-tokens", "4", "--batch-size", "8", "--no-progress"]) == 0
    rows = [json.loads(line) for line in pred_file.read_text().splitlines()]
    assert len(rows) == len(load_records(phantoms["test"])) and rows[0]["id"] == test[0].id
    assert [r["prediction"] for r in rows[:6]] == preds
    assert medm_main(["eval", "--task", "vqa", "--pred", str(pred_file), "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "metrics.json").is_file()


@pytest.mark.parametrize("model_type,answer", [
    ("qwen2_vl", "<|object_ref_start|>lesion<|object_ref_end|><|box_start|>(250,500),(500,750)<|box_end|>"),
    ("qwen2_5_vl", '[{"bbox_2d": [14, 28, 28, 42], "label": "lesion"}]'),
])
def test_predicted_boxes_come_back_in_original_pixels(model_type, answer, lora_run, phantoms):
    """A Qwen-VL box answer (as generated ids, end token and padding included) decodes to canonical pixel boxes of
    the 64x64 original, which the grounding metrics score against the record's box."""
    from medm.models import build_model

    model, processor = build_model(tiny_cfg(model_type))
    predictor = predictor_for(model, processor)
    tok = processor.tokenizer
    ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>"),
                                                                 tok.pad_token_id]
    item, geometry = predictor.prepare([{"role": "user", "content": "<image>\nWhere is the lesion?"}],
                                       [str(Path(phantoms["image_dir"]) / "images/phantom_00000.png")])
    assert geometry.original == (64, 64) and geometry.resized == (56, 56)
    text = predictor.decode(ids, geometry)
    assert json.loads(text) == [{"bbox_2d": [16, 32, 32, 48], "label": "lesion"}]
    assert grounding_scores([text], [[16, 32, 32, 48]], [(64, 64)])["mean_iou"] == pytest.approx(1.0)


def test_connector_only_stage_and_init_from_a_full_checkpoint(phantoms, tmp_path):
    """A merger-only stage saves `components`; a full finetune then starts from it, and a later stage from that."""
    pre = tmp_path / "merger"
    run_training(_cfg(pre, phantoms, "qwen2_5_vl", "stage.llm=frozen", "stage.connector=full", "train.max_steps=3"))
    assert read_meta(str(pre))["format"] == "components"
    model, _ = load_trained(str(pre))
    from safetensors.torch import load_file

    saved = load_file(str(pre / "components.safetensors"))
    assert saved and all(k.startswith("model.visual.merger.") for k in saved)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    full = tmp_path / "full"
    run_training(_cfg(full, phantoms, "qwen2_5_vl", "stage.llm=full", f"stage.init_from={pre}", "train.max_steps=2"))
    assert read_meta(str(full))["format"] == "full"
    later = tmp_path / "later"
    trainer = run_training(_cfg(later, phantoms, "qwen2_5_vl", "stage.llm=frozen", "stage.connector=full",
                                f"stage.init_from={full}", "train.max_steps=1", "train.learning_rate=0.0"))
    reopened, _ = load_trained(str(full))
    for k, v in reopened.state_dict().items():  # lr 0: the weights are the full checkpoint's
        assert torch.equal(trainer.model.state_dict()[k], v), k


def test_qwen_vl_dataset_refuses_a_medm_template(lora_run, phantoms):
    _, trainer = lora_run
    with pytest.raises(ValueError, match="data.template: 'pretrain'; a qwen-vl model renders conversations"):
        build_dataset(DataArgs(path=phantoms["train"], template="pretrain"), trainer.model, trainer.processing_class)


def test_training_skips_and_counts_unreadable_images(phantoms, tmp_path):
    """`data.max_bad_samples` reaches the Qwen-VL dataset: a missing image costs one sample and shows in the logs;
    with no bad sample allowed, training stops before it starts, naming the record and the file."""
    records = json.loads(Path(phantoms["train"]).read_text())
    gone = records[1]["id"]
    records[1] = {**records[1], "image": "images/missing.png"}
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    run = tmp_path / "run"
    trainer = run_training(_cfg(run, {**phantoms, "train": str(data)}, "qwen2_5_vl", "train.max_steps=2"))
    assert trainer.state.global_step == 2 and len(trainer.train_dataset) == len(records)
    assert [h["bad_samples"] for h in trainer.state.log_history if "loss" in h] == [1, 1]
    assert read_metrics(str(run))[-1]["bad_samples"] == 1
    with pytest.raises(TooManyBadSamples, match=rf"record '{gone}': cannot load image .*missing\.png"):
        run_training(_cfg(tmp_path / "strict", {**phantoms, "train": str(data)}, "qwen2_5_vl",
                          "data.max_bad_samples=0"))
    assert not (tmp_path / "strict" / "adapter_model.safetensors").exists()
