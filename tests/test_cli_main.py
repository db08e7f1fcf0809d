"""The `medm` command line as a whole: errors a user can cause are one line (tracebacks with --debug / MEDM_DEBUG),
`medm --help` builds without torch, `medm train --help` lists the keys, and option-style settings get a hint."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medm.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_building_the_parser_imports_neither_torch_nor_transformers():
    code = ("import sys, medm.cli; medm.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'gradio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_every_command_is_listed_in_the_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for command in ("train", "infer", "eval", "data", "demo", "export", "estimate", "playground", "chat", "serve"):
        assert f"    {command}" in text, command
    assert "MEDM_DEBUG=1 or --debug" in text


def test_eval_help_names_every_registered_task(capsys):
    from medm.registry import TASK

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    missing = [name for name in TASK.names() if f" {name}," not in flat and f" {name})" not in flat]
    assert not missing, f"medm eval --help does not name the tasks {missing}"


def test_train_help_lists_each_sections_keys_and_the_reference(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "docs/config_reference.md" in text
    flat = " ".join(text.split())
    for line in ("model: kind, qwenvl, llm,", "model.llm: family, path,", "data: path, image_dir, max_length,",
                 "stage: vision, connector, llm,", "train: output_dir, num_train_epochs, max_steps,"):
        assert line in flat, line


def test_train_help_keys_are_the_config_dataclasses_fields():
    import dataclasses
    import importlib

    from medm.train._training_arguments import own_fields
    from medm.train.args import TrainArgs
    from medm.train.cli import _SECTIONS, config_keys_text, section_keys

    for module, name in _SECTIONS.values():
        cls = getattr(importlib.import_module(module), name)
        # TrainArgs: medm's own fields (the rest of transformers' TrainingArguments pass through, as the help says).
        fields = own_fields(cls) if cls is TrainArgs else [f.name for f in dataclasses.fields(cls)]
        assert section_keys(module, name) == fields, name
    assert "every other field of transformers' TrainingArguments" in " ".join(config_keys_text().split())


@pytest.mark.parametrize("extra, fix", [(["--model", "configs/model/tiny.yaml"], "write model=configs/model/tiny.yaml"),
                                        (["--max-steps=5"], "write max_steps=5")])
def test_option_style_settings_get_a_key_value_hint(capsys, extra, fix):
    with pytest.raises(SystemExit) as e:
        main(["train", "configs/train/finetune.yaml", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and fix in err and "key=value" in err


@pytest.fixture
def moved_base(tmp_path, tiny_model):
    """A connector-only checkpoint whose base was moved after training: (checkpoint, the base's new place)."""
    from medm.models import save_model
    from medm.train.checkpoint import save_components

    model, tok = tiny_model
    save_model(model, tok, str(tmp_path / "base"))
    save_components(model, tok, str(tmp_path / "stage2"), ["connector"], base=str(tmp_path / "base"))
    shutil.move(tmp_path / "base", tmp_path / "moved")
    return tmp_path / "stage2", tmp_path / "moved"


def test_export_with_a_moved_base_is_one_line_naming_the_base_flag(capsys, moved_base, tmp_path):
    ckpt, moved = moved_base
    capsys.readouterr()  # the fixture's own output
    assert main(["export", "--merge", str(ckpt), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {ckpt}: its base weights") and "--base DIR" in err
    assert main(["export", "--merge", str(ckpt), str(tmp_path / "merged"), "--base", str(moved)]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


def test_debug_and_medm_debug_show_the_traceback(moved_base, tmp_path, monkeypatch):
    ckpt, _ = moved_base
    with pytest.raises(FileNotFoundError, match="--base DIR"):
        main(["export", "--merge", str(ckpt), str(tmp_path / "m"), "--debug"])
    monkeypatch.setenv("MEDM_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="--base DIR"):
        main(["export", "--merge", str(ckpt), str(tmp_path / "m")])


def test_infer_takes_base(moved_base, tmp_path, capsys):
    ckpt, moved = moved_base
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"id": "q1", "conversations": [{"from": "human", "value": "Hello?"}]}]))
    args = ["infer", "--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "p.jsonl"),
            "--max-new-tokens", "2", "--no-progress", "--device", "cpu"]
    assert main(args) == 2 and "--base DIR" in capsys.readouterr().err
    assert main([*args, "--base", str(moved)]) == 0
    assert json.loads((tmp_path / "p.jsonl").read_text())["id"] == "q1"


def test_an_unknown_template_is_one_line_listing_the_templates(capsys, tiny_model, tmp_path):
    from medm.data.templates import ChatFormat, TemplateError
    from medm.models import save_model

    _, tok = tiny_model
    with pytest.raises(TemplateError, match=r"unknown chat template 'qwen2_vl' \(data.template or model.template"):
        ChatFormat(tok, "qwen2_vl")
    model, tok = tiny_model
    save_model(model, tok, str(tmp_path / "m"))
    capsys.readouterr()
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"id": "q1", "conversations": [{"from": "human", "value": "Hello?"}]}]))
    assert main(["infer", "--model", str(tmp_path / "m"), "--data", str(data), "--out", str(tmp_path / "p.jsonl"),
                 "--template", "qwen2_vl", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.startswith("error:")]  # (loading progress bars aside)
    assert len(lines) == 1 and "Traceback" not in err and "'qwen2_vl'" in lines[0] and "vicuna" in lines[0]


def test_a_hub_model_not_on_disk_fails_at_once_offline_naming_the_setting(monkeypatch):
    from medm.config import ConfigError
    from medm.models import build_model
    from medm.models.tiny import tiny_model_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_model_config()
    cfg["llm"].update(path="nobody-medm-test/no-such-model", config=None)
    with pytest.raises(ConfigError, match=r"model.llm.path: 'nobody-medm-test/no-such-model' is not a local "
                                          r"directory nor in the Hugging Face cache.*HF_HUB_OFFLINE=1.*hf download"):
        build_model(cfg)
    cfg = tiny_model_config()
    cfg["vision"]["path"] = "nobody-medm-test/no-such-clip"
    with pytest.raises(ConfigError, match=r"model.vision.path: 'nobody-medm-test/no-such-clip' is not a local"):
        build_model(cfg)


def test_a_hub_model_not_on_disk_fails_at_once_without_network(monkeypatch):
    from medm.config import ConfigError
    from medm.models._hub import require_available

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(ConfigError, match="model.llm.tokenizer: .*no connection to 127.0.0.1"):
        require_available("nobody-medm-test/no-such-model", "model.llm.tokenizer", "tokenizer_config.json")
    require_available(str(REPO), "model.llm.path")  # a local directory is always fine


@pytest.mark.parametrize("builder", ["slake", "pathvqa", "medtrinity"])
def test_a_data_builder_without_its_source_is_one_line(capsys, builder, tmp_path):
    assert main(["data", "build", builder, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: builder {builder!r} needs --src"


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_chat_and_serve_on_a_folder_that_is_not_a_checkpoint_is_one_line(capsys, command, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main([command, "--model", str(tmp_path / "empty"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: cannot open --model {tmp_path / 'empty'}: ")


@pytest.mark.parametrize("how", [["--merge"], ["--to", "llava-hf"]])
def test_export_of_a_folder_that_is_not_a_checkpoint_is_one_line(capsys, how, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["export", *how, str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(tmp_path / "empty") in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine")
def test_commands_that_save_models_name_the_cpu_for_deepspeed(monkeypatch, tmp_path, capsys):
    """So DeepSpeed, imported by transformers when it saves, does not guess and warn "Setting accelerator to CPU";
    commands that save no model leave the variable alone."""
    monkeypatch.setenv("DS_ACCELERATOR", "")  # records the state, restored after the test
    monkeypatch.delenv("DS_ACCELERATOR")
    (tmp_path / "labels.json").write_text('[{"study_id": "a"}, {"study_id": "b"}]')
    assert main(["data", "split", str(tmp_path / "labels.json"), "--out", str(tmp_path / "split")]) == 0
    assert "DS_ACCELERATOR" not in os.environ
    (tmp_path / "empty").mkdir()
    assert main(["export", "--merge", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert os.environ["DS_ACCELERATOR"] == "cpu"
