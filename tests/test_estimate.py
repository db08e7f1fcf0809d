"""medm.estimate: parameter, gradient and optimizer parts equal the built model's (counted per stage component,
and the bytes a real backward and AdamW step allocate); ZeRO partitions them; real-size configs count from their
config.json alone; the largest micro-batch fits; `medm estimate` prints it."""

from __future__ import annotations

import json

import pytest
import torch

from medm.estimate import EstimateError, count_parameters, estimate, parse_size
from medm.models import build_model
from medm.models.tiny import tiny_model_config
from medm.train.args import parse_train_config
from medm.train.stages import apply_plan


def tiny_last_layer():
    """The tiny model with features from the encoder's last layer, so every trained encoder block gets gradients."""
    cfg = tiny_model_config()
    cfg["vision"]["select_layer"] = -1
    return cfg


def train_config(stage=None, model=None, data=None, **train):
    return parse_train_config({"model": model or tiny_last_layer(), "stage": stage or {},
                               "data": data or {"max_length": 64},
                               "train": {"output_dir": "unused", "per_device_train_batch_size": 2, **train}})


PLANS = [
    {},  # connector + LLM full, vision frozen
    {"llm": "frozen"},  # connector pretraining
    {"llm": "lora", "lora": {"r": 4, "alpha": 8}},
    {"vision": "partial:1", "llm": "frozen"},
    {"vision": "lora", "connector": "frozen", "llm": "full"},
]


@pytest.mark.parametrize("stage", PLANS, ids=["full", "frozen-llm", "lora", "partial-vision", "lora-vision"])
def test_parameter_gradient_and_optimizer_parts_equal_the_built_model(stage):
    cfg = train_config(stage)
    est = estimate(cfg)
    torch.manual_seed(0)
    base, _ = build_model(cfg.model)
    model = apply_plan(base, cfg.stage, torch.float32)
    # Per component, the meta-device count is the real model's.
    assert est.params == count_parameters(model)
    assert sum(r["total"] for r in est.params.values()) == sum(p.numel() for p in model.parameters())
    assert sum(r["trainable"] for r in est.params.values()) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    assert est.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    # One real step: the gradients and AdamW's states take exactly the estimated bytes.
    trainable = [p for p in model.parameters() if p.requires_grad]
    size = base.config.vision["config"]["image_size"]
    ids = torch.randint(3, 500, (2, 24))
    ids[:, 2:2 + base.num_image_tokens] = base.config.image_token_id
    out = model(input_ids=ids, labels=ids, pixel_values=torch.randn(2, 3, size, size))
    out.loss.backward()
    grads = [p.grad for p in trainable if p.grad is not None]
    assert len(grads) == len(trainable)
    assert est.gradients == sum(g.numel() * g.element_size() for g in grads)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    opt.step()
    states = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    assert est.optimizer == sum(t.numel() * t.element_size() for t in states)


def test_zero_stages_partition_and_offload(tmp_path):
    def ds(stage, **extra):
        path = tmp_path / f"z{stage}{len(extra)}.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": stage, **extra}}))
        return str(path)

    plain = estimate(train_config(bf16=True))
    n_train = sum(r["trainable"] for r in plain.params.values())
    n_total = sum(r["total"] for r in plain.params.values())
    # Plain Trainer, fp32 weights under bf16 autocast: fp32 gradients and two fp32 AdamW states.
    assert (plain.gradients, plain.optimizer) == (4 * n_train, 8 * n_train)
    z1 = estimate(train_config(bf16=True, deepspeed=ds(1)), num_gpus=4)
    assert (z1.weights, z1.gradients, z1.optimizer) == (2 * n_total, 2 * n_train, 12 * n_train // 4)
    z2 = estimate(train_config(bf16=True, deepspeed=ds(2)), num_gpus=4)
    assert (z2.weights, z2.gradients, z2.optimizer) == (2 * n_total, 2 * n_train // 4, 12 * n_train // 4)
    z3 = estimate(train_config(bf16=True, deepspeed=ds(3)), num_gpus=4)
    assert (z3.weights, z3.gradients) == (2 * n_total // 4, 2 * n_train // 4)
    off = estimate(train_config(bf16=True, deepspeed=ds(3, offload_optimizer={"device": "cpu"},
                                                        offload_param={"device": "cpu"})), num_gpus=4)
    assert (off.weights, off.optimizer) == (0, 0)
    with pytest.raises(EstimateError, match="train.deepspeed: 'nope.json' not found"):
        estimate(train_config(deepspeed="nope.json"))


def test_activations_grow_with_batch_and_shrink_with_checkpointing():
    a = estimate(train_config(), micro_batch=1, seq_len=128)
    b = estimate(train_config(), micro_batch=4, seq_len=128)
    ck = estimate(train_config(gradient_checkpointing=True), micro_batch=4, seq_len=128)
    assert b.activations == 4 * a.activations == 4 * a.activations_per_sample
    assert ck.activations < b.activations
    gpu = b.fixed + 10 * b.activations_per_sample + parse_size("1GiB") + 5
    assert b.max_micro_batch(gpu) == 10
    assert b.max_micro_batch(b.fixed) == 0


def test_real_size_config_counts_from_config_json_alone(tmp_path):
    """A pretrained LLM path with only config.json (no weights, no tokenizer): exact parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model("qwen2", hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=5000,
                              tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    model_cfg = {"llm": {"family": "qwen2", "path": str(tmp_path), "dtype": "bfloat16"},
                 "vision": tiny_model_config()["vision"], "connector": {"name": "mlp", "type": "mlp2x_gelu"}}
    est = estimate(train_config(model=model_cfg, bf16=True))
    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(hf)
    assert est.params["llm"]["total"] == sum(p.numel() for p in ref.parameters())
    assert est.weights == 2 * sum(r["total"] for r in est.params.values())
    with pytest.raises(EstimateError, match="model.llm.path: cannot read the config of"):
        estimate(train_config(model={**model_cfg, "llm": {"family": "qwen2", "path": str(tmp_path / "none")}}))


def test_parse_size():
    assert parse_size("24GB") == 24 * 2**30 == parse_size("24GiB") == parse_size("24g")
    assert parse_size("512MB") == 512 * 2**20 and parse_size(1000) == 1000
    with pytest.raises(EstimateError, match="cannot read memory size 'lots'"):
        parse_size("lots")


def test_cli_prints_parts_and_the_largest_micro_batch(capsys):
    from medm.cli import main

    assert main(["estimate", "configs/train/finetune.yaml", "--tiny", "--json", "--gpu-mem", "24GB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["micro_batch"] == 16 and out["settings"]["gradient_checkpointing"] is True
    assert out["total"] == out["weights"] + out["gradients"] + out["optimizer"] + out["activations"]
    assert out["fit"]["fits"] and out["fit"]["max_micro_batch"] >= 16
    assert main(["estimate", "configs/train/finetune_lora.yaml", "--tiny", "--gpu-mem", "8GB"]) == 0
    text = capsys.readouterr().out
    assert "optimizer states" in text and "largest micro-batch that fits" in text
    assert main(["estimate", "configs/train/finetune.yaml", "--tiny", "--gpu-mem", "1KB"]) == 0
    assert "does NOT fit" in capsys.readouterr().out


def test_overrides_may_follow_options_in_the_order_written(capsys):
    """docs/recipes.md writes `--num-gpus 16 train.per_device_train_batch_size=4 --gpu-mem 80GB`."""
    from medm.cli import main

    argv = ["estimate", "configs/train/finetune.yaml", "train.per_device_train_batch_size=2", "--tiny", "--json",
            "train.per_device_train_batch_size=4", "--gpu-mem", "24GB", "train.gradient_checkpointing=false"]
    assert main(argv) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert settings["micro_batch"] == 4 and settings["gradient_checkpointing"] is False
    with pytest.raises(SystemExit):
        main(["estimate", "configs/train/finetune.yaml", "--tiny", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
