"""What a resume says: which checkpoint and step it resumed from, and no "missing keys" warning for the tied output
head (it is the input embedding, so a full checkpoint does not store it twice)."""

import logging

import pytest
from train_helpers import make_cfg
from transformers.utils import logging as hf_logging

from medm.train.trainer import run_training


@pytest.fixture
def hf_warnings_to_caplog():
    hf_logging.enable_propagation()
    yield
    hf_logging.disable_propagation()


def test_a_resume_names_its_checkpoint_and_step_and_no_tied_head_warning(tmp_path, toy_data, caplog,
                                                                         hf_warnings_to_caplog):
    common = dict(save_strategy="steps", save_steps=2)
    first = run_training(make_cfg(tmp_path, toy_data, max_steps=2, **common))
    assert first.model.config.tie_word_embeddings or first.model.llm.config.tie_word_embeddings  # the tied case
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = run_training(make_cfg(tmp_path, toy_data, max_steps=3, resume_from_checkpoint=True, **common))
    assert resumed.state.global_step == 3
    text = caplog.text
    assert f"resuming from {tmp_path / 'checkpoint-2'} at step 2" in text
    assert "missing keys" not in text
