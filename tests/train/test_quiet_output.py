"""A CPU run of the tiny model says nothing alarming: no "trainable parameters got no gradient" for a trained tower
(what its features never use stays frozen), no "tokenizer has new PAD/BOS/EOS tokens" (a random-init LLM takes the
tokenizer's ids when built), no DeepSpeed "Setting accelerator to CPU" guess."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from train_helpers import make_cfg, run_env
from transformers.trainer_utils import align_special_tokens
from transformers.utils import logging as hf_logging

from medm.models import build_model
from medm.models.tiny import tiny_model_config
from medm.train.trainer import run_training


@pytest.fixture
def hf_warnings_to_caplog():
    hf_logging.enable_propagation()
    yield
    hf_logging.disable_propagation()


def test_a_random_init_llm_takes_the_tokenizers_special_token_ids(caplog, hf_warnings_to_caplog):
    model, tok = build_model(tiny_model_config())
    text = model.config.get_text_config()
    assert (text.pad_token_id, text.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert model.generation_config.pad_token_id == tok.pad_token_id
    before = text.to_dict()
    with caplog.at_level(logging.WARNING):
        align_special_tokens(model, tok)  # what the Trainer does before training
    assert "PAD/BOS/EOS" not in caplog.text and text.to_dict() == before


def test_a_cpu_run_with_a_trained_tower_warns_about_nothing(tmp_path, toy_data, caplog, hf_warnings_to_caplog,
                                                             monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "")  # records the variable's state, restored after the test
    monkeypatch.delenv("DS_ACCELERATOR")
    cfg = tiny_model_config()  # CLIP tower, select_layer -2: its last block and post_layernorm are never used
    with caplog.at_level(logging.INFO):
        result = run_training(make_cfg(tmp_path, toy_data, stage={"vision": "full", "llm": "frozen"}, model=cfg,
                                       max_steps=1))
    text = caplog.text
    assert "got no gradient" not in text and "PAD/BOS/EOS" not in text
    assert "encoder parameter tensors stay frozen: the features never use them" in text
    frozen = {n for n, p in result.model.named_parameters() if n.startswith("vision.") and not p.requires_grad}
    assert any("post_layernorm" in n for n in frozen) and any("encoder.layers.1." in n for n in frozen)
    assert not any("encoder.layers.0." in n for n in frozen)
    if not torch.cuda.is_available():
        assert os.environ.get("DS_ACCELERATOR") == "cpu"


@pytest.mark.slow
def test_deepspeed_told_the_cpu_does_not_guess_and_warn():
    """The mechanism the CPU run relies on: DeepSpeed with DS_ACCELERATOR=cpu imports without its guess warning."""
    code = "import deepspeed.accelerator as a; print(a.get_accelerator().device_name())"
    proc = subprocess.run([sys.executable, "-c", code], env=run_env(DS_ACCELERATOR="cpu"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "cpu" and "Setting accelerator" not in proc.stdout + proc.stderr
