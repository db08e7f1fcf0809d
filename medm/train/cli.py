"""`medm train CONFIG [a.b=c ...]` (`medm export` is medm.interop.cli's).

    medm train configs/train/finetune.yaml model=configs/model/tiny.yaml data.path=train.json train.max_steps=10
    torchrun --nproc_per_node 4 -m medm.cli train configs/train/finetune.yaml data.path=train.json
"""

from __future__ import annotations

import argparse
import ast
import logging
import signal
import sys
import textwrap
from pathlib import Path

import medm
from medm.config import ConfigError
from medm.data._bad_samples import TooManyBadSamples
from medm.data.annotations import AnnotationError


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("medm").setLevel(logging.INFO)


def _cmd_train(args: argparse.Namespace) -> int:
    from medm.train._distributed import finish_process_group  # defers torch
    from medm.train.args import check_data_files, load_train_config  # defers torch, transformers
    from medm.train.safety import CheckpointWriteError, NonFiniteLossError  # defers torch, transformers
    from medm.train.trainer import run_training  # defers torch, transformers

    _setup_logging()
    try:
        cfg = load_train_config(args.config, args.overrides)
        check_data_files(cfg, args.config)
        trainer = run_training(cfg)
        finish_process_group()
    except (ConfigError, AnnotationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, TooManyBadSamples, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if trainer.stop_signal is not None:
        # Stopped cleanly with a checkpoint; the conventional exit code of a process ended by that signal, so
        # `medm train a.yaml && medm train b.yaml` does not start the next stage.
        print(f"stopped by {trainer.stop_signal} at step {trainer.state.global_step}; resume with "
              "train.resume_from_checkpoint=true", file=sys.stderr)
        sig = getattr(signal.Signals, str(trainer.stop_signal), signal.SIGTERM)
        return 128 + int(sig)
    if trainer.is_world_process_zero():
        print(f"saved to {cfg.train.output_dir}")
    return 0


# The train YAML's sections and nested sections, with the dataclass listing their keys (module, class).
_SECTIONS = {"model": ("medm.models.builder", "ModelArgs"), "model.llm": ("medm.models.builder", "LLMArgs"),
             "data": ("medm.data.dataset", "DataArgs"), "stage": ("medm.train.args", "StagePlan"),
             "train": ("medm.train.args", "TrainArgs")}


def section_keys(module: str, name: str) -> list[str]:
    """The field names of dataclass `name` in `module`, read from its source: importing the config modules would
    import torch, and `medm train --help` should not wait for that (tests check this against the dataclass)."""
    path = Path(medm.__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return [st.target.id for st in node.body if isinstance(st, ast.AnnAssign)
                    and isinstance(st.target, ast.Name) and "ClassVar" not in ast.unparse(st.annotation)]
    raise KeyError(f"no class {name} in {path}")


def config_keys_text(width: int = 100) -> str:
    """What `medm train --help` lists after the arguments: each section's keys, and where they are explained."""
    lines = textwrap.wrap("settings: KEY=VALUE after the YAML (or in the YAML), e.g. train.max_steps=10 "
                          "data.path=train.json model=configs/model/tiny.yaml. Every key with its type, default and "
                          "meaning: docs/config_reference.md. The keys of each section:", width) + [""]
    for section, (module, name) in _SECTIONS.items():
        keys = ", ".join(section_keys(module, name))
        if section == "train":
            keys += ", and every other field of transformers' TrainingArguments"
        lines += textwrap.wrap(f"{section}: {keys}", width, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


class _HelpWithKeys(argparse.Action):
    """-h for `medm train`: the usage, then `config_keys_text`."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.epilog = config_keys_text()
        parser.print_help()
        parser.exit()


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one stage: medm train CONFIG [a.b=c ...]", add_help=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Train one stage from a train YAML (configs/train/*.yaml); dotted "
                                          "overrides such as train.learning_rate=1e-4 or\n"
                                          "model=configs/model/tiny.yaml follow the file. The keys are listed below.")
    p.add_argument("-h", "--help", action=_HelpWithKeys, help="show this help, with every section's keys, and exit")
    p.add_argument("config", help="train YAML with model / data / stage / train sections")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides, applied in order (values parsed as YAML)")
    p.set_defaults(func=_cmd_train)
