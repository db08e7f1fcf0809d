"""Remote code (issue 26 item 6): medm passes `trust_remote_code` to transformers explicitly, off unless the user
says `--trust-remote-code`. Left unset, transformers asks on stdin, and `printf 'y\\n' | medm infer ...` ran the
Python file a checkpoint ships (`auto_map` in its tokenizer_config.json). Here that file writes a marker when
imported: it must never be written unless asked for."""

import io
import json
import logging
import sys

import pytest
import torch
import transformers.dynamic_module_utils as dynamic_modules

from medm.cli import main
from medm.models import build_model, save_model
from medm.models.builder import load_model
from medm.models.tiny import tiny_model_config


@pytest.fixture
def trapped(tmp_path, monkeypatch):
    """(checkpoint, marker): a tiny checkpoint whose tokenizer config maps AutoTokenizer to its own evil_tok.py."""
    torch.manual_seed(0)
    ckpt, marker = tmp_path / "ckpt", tmp_path / "REMOTE_CODE_RAN"
    save_model(*build_model(tiny_model_config()), str(ckpt))
    (ckpt / "evil_tok.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    path = ckpt / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]})
    path.write_text(json.dumps(cfg))
    # Where transformers copies a checkpoint's code before importing it: inside the test's folder.
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # a user (or a pipe) that says yes to the prompt
    return ckpt, marker


def test_a_yes_on_stdin_does_not_run_a_checkpoints_code(trapped):
    ckpt, marker = trapped
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(str(ckpt))
    assert not marker.exists()


def test_medm_infer_refuses_remote_code_unless_asked(trapped, tmp_path, toy_data, capsys):
    ckpt, marker = trapped
    code = main(["infer", "--model", str(ckpt), "--data", str(toy_data), "--image-dir", str(toy_data.parent),
                 "--out", str(tmp_path / "p.jsonl"), "--limit", "1", "--device", "cpu", "--no-progress"])
    assert code == 2 and "trust_remote_code" in capsys.readouterr().err
    assert not marker.exists()


def test_trust_remote_code_runs_it_and_says_so(trapped, caplog):
    """The trap works: asked for, the checkpoint's code runs, and the log names the checkpoint."""
    ckpt, marker = trapped
    with caplog.at_level(logging.WARNING, logger="medm.models.llm"):
        _, tokenizer = load_model(str(ckpt), trust_remote_code=True)
    assert marker.read_text() == "ran" and type(tokenizer).__name__ == "EvilTokenizer"
    assert f"trust_remote_code is ON: running the model code shipped with {ckpt}" in caplog.text
