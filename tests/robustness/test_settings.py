"""Settings that are wrong in type or range, paths that cannot work, and resuming before any checkpoint (issue 26,
items 10 and 11): `medm train` answers each with one line naming the field and the value (exit code 2), before a
model is built; values YAML reads its own way (`no`, `1e-4`) mean what the docs say."""

import dataclasses
import logging
import typing

import pytest
import yaml
from train_helpers import make_cfg

from medm.cli import main
from medm.config import ConfigError, from_dict
from medm.models.tiny import tiny_model_config
from medm.train.args import LoraArgs, StagePlan, TrainArgs, parse_train_config
from medm.train.trainer import run_training


def _yaml(tmp_path, data, **train):
    cfg = {"model": tiny_model_config(), "data": {"path": str(data), "image_dir": str(data.parent)},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "device": "cpu", "report_to": [], **train}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("override, message", [
    ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps: 0 is not allowed (must be >= 1)"),
    ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size: 0 is not allowed (must be >= 1)"),
    ("train.seed=1.5", "train.seed: 1.5 is not an integer"),
    ("train.max_steps=ten", "train.max_steps: 'ten' is not an integer"),
    ("train.learning_rate=fast", "train.learning_rate: 'fast' is not a float"),
    ("train.bf16=maybe", "train.bf16: 'maybe' is not true or false"),
    ("train.lr_scheduler_type=zigzag", "train.lr_scheduler_type: 'zigzag' is not allowed (allowed: linear, cosine"),
    ("train.optim=adamw", "train.optim: 'adamw' is not allowed; did you mean adamw_torch? (allowed: adamw_torch"),
    ("train.save_strategy=sometimes", "train.save_strategy: 'sometimes' is not allowed (allowed: steps, epoch, no)"),
    ("train.stop_signals=SIGUSR1", "train.stop_signals: 'SIGUSR1' is not a list"),
    ("stage.lora.r=0", "stage.lora.r: 0 is not allowed (must be >= 1)"),
    ("data.max_length=long", "data.max_length: 'long' is not an integer"),
])
def test_bad_settings_are_one_line_naming_field_and_value(override, message, tmp_path, toy_data, capsys):
    path = _yaml(tmp_path, toy_data)
    assert main(["train", str(path), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


def test_paths_that_cannot_work_are_refused_by_field(tmp_path, toy_data, capsys):
    (tmp_path / "taken").write_text("a file where the run should go")
    path = _yaml(tmp_path, toy_data)
    assert main(["train", str(path), f"train.output_dir={tmp_path / 'taken'}"]) == 2
    assert f"train.output_dir '{tmp_path / 'taken'}' is a file, not a directory" in capsys.readouterr().err
    assert main(["train", str(path), f"train.output_dir={tmp_path / 'taken' / 'run'}"]) == 2
    assert f"{tmp_path / 'taken'} is a file" in capsys.readouterr().err
    missing = tmp_path / "nowhere.json"
    assert main(["train", str(path), f"data.path={missing}"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: data.path '{missing}' not found\n"
    assert main(["train", str(path), f"data.path=[{toy_data}, {{path: {missing}, ratio: 0.5}}]"]) == 2
    assert f"data.path '{missing}' not found" in capsys.readouterr().err


def test_yaml_readings_mean_what_the_docs_say():
    model = tiny_model_config()
    for word in ("no", "false", "off"):  # the documented `save_strategy: no` is a boolean to YAML
        cfg = parse_train_config({"model": model, "train": {"output_dir": "x", "save_strategy": yaml.safe_load(word)}})
        assert cfg.train.save_strategy == "no"
    cfg = parse_train_config({"model": model, "train": {"output_dir": "x", "learning_rate": yaml.safe_load("1e-4"),
                                                        "max_steps": 10.0, "resume_from_checkpoint": True}})
    assert cfg.train.learning_rate == 1e-4 and cfg.train.max_steps == 10 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.resume_from_checkpoint is True  # `str | bool`: a boolean stays one
    with pytest.raises(ConfigError, match="train.save_strategy: True is not a string"):
        parse_train_config({"model": model, "train": {"output_dir": "x", "save_strategy": True}})


def test_every_field_of_the_train_sections_is_checked_by_type():
    """The checks come from the dataclass types, not a list of special cases: any int / float / bool / list field
    of these sections refuses a value of the wrong type."""
    wrong = {int: "x", float: "x", bool: "x", list: "x", dict: "x"}
    for cls in (TrainArgs, StagePlan, LoraArgs):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            base = typing.get_origin(hints[f.name]) or hints[f.name]
            if base in wrong:
                with pytest.raises(ConfigError, match=f"where.{f.name}: .* is not "):
                    from_dict(cls, {f.name: wrong[base]}, "where")


@pytest.mark.slow
def test_resume_true_before_any_checkpoint_starts_fresh(tmp_path, toy_data, caplog):
    run = tmp_path / "run"
    cfg = make_cfg(run, toy_data, max_steps=2, save_strategy="steps", save_steps=2, resume_from_checkpoint=True)
    with caplog.at_level(logging.INFO, logger="medm"):
        first = run_training(cfg)
    assert first.state.global_step == 2 and (run / "checkpoint-2").is_dir()
    assert "no checkpoint-N in" in caplog.text and "starting from step 0" in caplog.text
    # The next requeue (here with more steps to go) resumes from that checkpoint.
    caplog.clear()
    longer = make_cfg(run, toy_data, max_steps=4, save_strategy="steps", save_steps=2, resume_from_checkpoint=True)
    with caplog.at_level(logging.INFO):
        again = run_training(longer)
    assert again.state.global_step == 4 and "starting from step 0" not in caplog.text
