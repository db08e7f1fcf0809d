"""Typed settings (issue 23): every field of transformers' TrainingArguments is settable under `train:` and reaches
the Trainer; a bad value or key, in a YAML file or an `a.b=c` override, is refused when the config is read with one
line naming the key, the value and what was expected (or the closest known key)."""

import dataclasses

import pytest
import yaml
from train_helpers import make_cfg
from transformers import TrainingArguments

from medm.cli import main
from medm.config import ConfigError
from medm.models.tiny import tiny_model_config
from medm.train._training_arguments import REFUSED, TrainingArgumentsFields, passthrough_fields
from medm.train.args import TrainArgs, load_train_config
from medm.train.trainer import run_training, training_arguments


def _config(tmp_path, records, **sections):
    cfg = {"model": tiny_model_config(), "data": {"path": str(records), "image_dir": str(records.parent)},
           "stage": {}, "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "device": "cpu",
                                  "report_to": []}}
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def _error(tmp_path, cfg, overrides=()) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as e:
        load_train_config(str(path), list(overrides))
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{path}: "), text
    return text[len(f"{path}: "):]


# (section, key, value as YAML text, the message after "FILE: ")
BAD = [
    # a value of the wrong type
    ("train", "learning_rate", "abc", "train.learning_rate: 'abc' is not a float"),
    ("train", "max_steps", "ten", "train.max_steps: 'ten' is not an integer"),
    ("train", "ddp_timeout", "soon", "train.ddp_timeout: 'soon' is not an integer"),  # a pass-through field
    ("train", "torch_compile", "maybe", "train.torch_compile: 'maybe' is not true or false"),
    ("stage", "lora", "4", "stage.lora: 4 is not a mapping"),
    ("data", "max_length", "long", "data.max_length: 'long' is not an integer"),
    ("model.llm", "trust_remote_code", "sure", "model.llm.trust_remote_code: 'sure' is not true or false"),
    # a component's key, checked against its constructor's annotation
    ("model.vision", "select_layer", "last", "model.vision.select_layer: 'last' is not an integer"),
    # a value not allowed
    ("train", "max_steps", "-5", "train.max_steps: -5 is not allowed (must be >= -1)"),
    ("train", "optim", "adamw", "train.optim: 'adamw' is not allowed; did you mean adamw_torch? (allowed: "),
    ("train", "logging_strategy", "sometimes",
     "train.logging_strategy: 'sometimes' is not allowed (allowed: no, steps, epoch)"),
    ("train", "log_level", "loud", "train.log_level: 'loud' is not allowed (allowed: detail, debug, info"),
    ("train", "device", "cuda:0",
     "train.device: 'cuda:0' is not allowed; did you mean cuda? (allowed: auto, cuda, cpu)"),
    ("train", "train_sampling_strategy", "group_by_len", "train.train_sampling_strategy: 'group_by_len' is not "
     "allowed; did you mean group_by_length? (allowed: auto, random, sequential, group_by_length, "),
    ("stage", "llm", "lorra", "stage.llm: 'lorra' is not a mode for the llm; valid: frozen, full, lora, qlora"),
    ("model.llm", "dtype", "bf16", "model.llm.dtype: 'bf16' is not allowed; did you mean bfloat16? (allowed: "),
    # an unknown key, with the closest known one
    ("train", "learnig_rate", "1e-4", "train.learnig_rate: unknown key; did you mean learning_rate?"),
    ("train", "ddp_timout", "600", "train.ddp_timout: unknown key; did you mean ddp_timeout?"),
    ("stage", "visoin", "full", "stage.visoin: unknown key; did you mean vision?"),
    ("data", "val_szie", "2", "data.val_szie: unknown key; did you mean val_size?"),
    # a TrainingArguments field medm sets itself
    ("train", "use_cpu", "true", "train.use_cpu: not settable: set by medm from train.device (auto, cuda, cpu)"),
    ("train", "remove_unused_columns", "true", "train.remove_unused_columns: not settable: set by medm (false)"),
]


@pytest.mark.parametrize("section, key, raw, message", BAD, ids=[f"{s}.{k}={v}" for s, k, v, _ in BAD])
def test_bad_settings_are_one_line_from_yaml_and_overrides(section, key, raw, message, tmp_path, toy_data):
    cfg = _config(tmp_path, toy_data)
    node = cfg
    for part in section.split("."):
        node = node[part]
    node[key] = yaml.safe_load(raw)
    in_yaml = _error(tmp_path, cfg)
    overridden = _error(tmp_path, _config(tmp_path, toy_data), [f"{section}.{key}={raw}"])
    # The same line whether the value sits in the YAML file or comes as an override.
    assert in_yaml == overridden
    assert in_yaml.startswith(message), in_yaml


@pytest.mark.parametrize("where, key, message", [
    ("model.llm", "pth", "model.llm.pth: unknown key; did you mean path?"),
    ("model.connector", "typ", "model.connector.typ: unknown key for 'mlp'; did you mean type?"),
    ("model", "visoin", "model.visoin: unknown key; did you mean vision?"),
])
def test_unknown_model_keys_name_the_closest(where, key, message, tmp_path, toy_data):
    cfg = _config(tmp_path, toy_data)
    section = cfg
    for part in where.split("."):
        section = section[part]
    section[key] = 1
    # The model section is read from the train YAML: its errors carry the file and `model`.
    assert _error(tmp_path, cfg).endswith(message)
    assert _error(tmp_path, _config(tmp_path, toy_data), [f"{where}.{key}=1"]).endswith(message)


def test_every_training_arguments_field_is_settable_or_refused_with_a_reason():
    ours = {f.name for f in dataclasses.fields(TrainArgs)}
    theirs = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert theirs - ours == set(REFUSED)
    # Pass-through fields keep transformers' type and default; medm's own keep theirs (medm trains for 1 epoch).
    hints = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    for f in passthrough_fields(TrainArgs):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        theirs_default = hints[f.name].default
        if hints[f.name].default_factory is not dataclasses.MISSING:
            theirs_default = hints[f.name].default_factory()
        assert default == theirs_default, f.name
    assert TrainArgs().num_train_epochs == 1.0 and TrainArgs().optim == "adamw_torch"
    assert issubclass(TrainArgs, TrainingArgumentsFields)


SETTINGS = ["train.torch_compile=false", "train.optim=adamw_torch_fused", "train.ddp_timeout=600",
            "train.neftune_noise_alpha=5", "train.adam_epsilon=1e-6", "train.data_seed=7",
            "train.logging_first_step=false", "train.include_num_input_tokens_seen=all"]


def _check_settings(args):
    assert args.torch_compile is False and args.optim == "adamw_torch_fused" and args.ddp_timeout == 600
    assert args.neftune_noise_alpha == 5.0 and args.adam_epsilon == 1e-6 and args.data_seed == 7
    assert args.logging_first_step is False and args.include_num_input_tokens_seen == "all"


def test_pass_through_settings_reach_the_training_arguments(tmp_path, toy_data):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, toy_data, train={"report_to": "wandb"})))
    cfg = load_train_config(str(path), SETTINGS)
    args = training_arguments(cfg.train, "cpu")
    _check_settings(args)
    assert args.report_to == ["wandb"]  # `report_to: wandb`, one name, as transformers takes it
    for given, expected in (("[tensorboard, wandb]", ["wandb"]), ("none", []), ("[]", [])):
        # TensorBoard is medm's own callback (into output_dir/tensorboard), not transformers'.
        cfg = load_train_config(str(path), [f"train.report_to={given}"])
        assert training_arguments(cfg.train, "cpu").report_to == expected
    # medm's own settings still decide the fields it sets.
    assert args.remove_unused_columns is False and args.label_names == ["labels"] and args.use_cpu
    # Untouched pass-through fields are transformers' defaults.
    assert args.ddp_bucket_cap_mb is None and args.eval_on_start is False


@pytest.mark.slow
def test_pass_through_settings_reach_a_real_run(tmp_path, toy_data):
    overrides = dict(item.split("=", 1) for item in SETTINGS)
    train = {k.split(".", 1)[1]: yaml.safe_load(v) for k, v in overrides.items()}
    out = tmp_path / "run"
    trainer = run_training(make_cfg(out, toy_data, max_steps=2, hub_token="hf_not_a_real_token", **train))
    _check_settings(trainer.args)
    assert trainer.state.global_step == 2
    logged = [h for h in trainer.state.log_history if "loss" in h]
    # logging_first_step=false: with logging_steps 1 every step logs anyway; tokens seen are counted ("all").
    assert trainer.state.num_input_tokens_seen > 0 and [h["step"] for h in logged] == [1, 2]
    # The model card records medm's settings and the pass-through ones the config changed, never the token.
    card = (out / "README.md").read_text()
    recorded = yaml.safe_load(card.split("---")[1])["medm"]["train"]
    assert recorded["ddp_timeout"] == 600 and recorded["optim"] == "adamw_torch_fused" and recorded["max_steps"] == 2
    assert "ddp_bucket_cap_mb" not in recorded and "hub_token" not in recorded
    assert "hf_not_a_real_token" not in card


def test_transformers_own_checks_are_one_line_config_errors(tmp_path, toy_data, capsys):
    """What only transformers knows to refuse (a pass-through value out of its range) stops `medm train` with one
    line too, before a model is built."""
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, toy_data)))
    assert main(["train", str(path), "train.torch_empty_cache_steps=0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: train: `torch_empty_cache_steps` must be an integer bigger than 0, got 0.\n"
    assert not (tmp_path / "run").exists()
