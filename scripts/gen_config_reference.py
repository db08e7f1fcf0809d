"""python scripts/gen_config_reference.py [--check]

Writes docs/config_reference.md, the reference of every configuration key, from the definitions themselves: the
config dataclasses (their fields, types, defaults and `arg(help=...)` text) and the registered components (the
keys of each encoder and connector are its constructor's parameters, described in its docstring's `Args:`).
`--check` writes nothing and exits 1 when the file is out of date; tests/test_docs.py does the same check, so a
config field added without regenerating fails the suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any

import transformers

from medm._docstrings import docstring_args
from medm.train._training_arguments import REFUSED, own_fields, passthrough_fields

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "config_reference.md"
COMMAND = "python scripts/gen_config_reference.py"

# Connector constructor arguments that come from the model (the encoder's width and grid, the LLM's width), never
# from the config section (medm.models.builder._CONNECTOR_GEOMETRY).
_GEOMETRY = {"self", "in_dim", "out_dim", "grid", "num_prefix_tokens"}


# Every config dataclass the reference documents: where its keys sit -> (module, class name).
CONFIG_CLASSES = {
    "train config": ("medm.train.args", "TrainConfig"),
    "model": ("medm.models.builder", "ModelArgs"),
    "model.llm": ("medm.models.builder", "LLMArgs"),
    "model.qwenvl": ("medm.qwenvl.args", "QwenVLArgs"),
    "volume": ("medm.data.volumes", "VolumeArgs"),
    "data": ("medm.data.dataset", "DataArgs"),
    "data.path entry": ("medm.data.mixture", "MixtureEntry"),
    "data.mixture": ("medm.data.mixture", "MixtureArgs"),
    "stage": ("medm.train.args", "StagePlan"),
    "stage.lora": ("medm.train.args", "LoraArgs"),
    "train": ("medm.train.args", "TrainArgs"),
}


def _cls(where: str) -> type:
    """The dataclass of `where`, looked up at render time so the reference describes the current definitions."""
    module, name = CONFIG_CLASSES[where]
    return getattr(importlib.import_module(module), name)


def _yaml(value: Any) -> str:
    """A default as it would be written in YAML."""
    if value is None:
        return "null"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _cell(text: str) -> str:
    """Table-safe text: one line, pipes escaped, and `<name>` shown as text rather than taken for an HTML tag."""
    return re.sub(r"<(?=[A-Za-z/])", "&lt;", " ".join(str(text).split()).replace("|", "\\|"))


def _type_name(tp: Any) -> str:
    union = typing.get_origin(tp) is typing.Union  # typing.Union[...] is named "Union": show its members
    text = tp if isinstance(tp, str) else str(tp) if union else getattr(tp, "__name__", str(tp))
    return text.replace("typing.", "").replace("NoneType", "None")


def _first_paragraph(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""  # the signature dataclasses write when a class has no docstring
    return _cell(doc.split("\n\n", 1)[0])


def _field_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _yaml(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _yaml(f.default_factory())
    return "required"


def dataclass_table(cls: type, fields: list[dataclasses.Field] | None = None, first_sentence: bool = False
                    ) -> list[str]:
    """One row per field (`fields`, default: all of `cls`): key, type, default, help (field metadata, else the class
    docstring's entry; `first_sentence`: only the help's first sentence)."""
    from_doc = docstring_args(cls)
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls) if fields is None else fields:
        text = f.metadata.get("help") or from_doc.get(f.name, "")
        if first_sentence:
            text = re.split(r"(?<=[a-z0-9)`'])\.\s", " ".join(text.split()), maxsplit=1)[0].rstrip(".") + "."
        rows.append(f"| `{f.name}` | `{_cell(_type_name(f.type))}` | `{_cell(_field_default(f))}` | {_cell(text)} |")
    return rows


def component_table(cls: type, skip: set[str]) -> list[str]:
    """One row per constructor parameter of a registered component (its config keys)."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):  # a preset's constructor may narrow its base's: the nearest `Args:` wins
        docs.update(docstring_args(base))
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = "required" if p.default is inspect.Parameter.empty else _yaml(p.default)
        tp = "" if p.annotation is inspect.Parameter.empty else _type_name(p.annotation)
        rows.append(f"| `{name}` | `{_cell(tp)}` | `{_cell(default)}` | {_cell(docs.get(name, ''))} |")
    return rows


def _section(title: str, cls: type, intro: str = "") -> list[str]:
    out = [f"### {title}", "", f"`{cls.__module__}.{cls.__qualname__}`. " + (intro or _first_paragraph(cls)), ""]
    return out + dataclass_table(cls) + [""]


def _components(registry, skip: set[str]) -> list[str]:
    out = []
    for name in registry.names():
        cls = registry.get(name)
        owner = f"{cls.__module__}.{cls.__qualname__}"
        out += [f"#### `name: {name}`", "", f"`{owner}`. {_first_paragraph(cls)}", ""]
        out += component_table(cls, skip) + [""]
    return out


def render() -> str:
    """The whole reference as markdown text."""
    from medm.registry import CONNECTOR, LLM, TEMPLATE, VISION

    train_config = _cls("train config")
    model_args = _cls("model")
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{COMMAND}` from the config dataclasses and the registered components. Do not edit by "
        "hand: tests/test_docs.py fails when this file is out of date. -->",
        "",
        "Every key a YAML file (or a `a.b=c` override on the command line) can set. A train YAML (`medm train "
        "CONFIG`, `configs/train/`, `configs/recipes/`) has four sections: `model`, `data`, `stage` and `train`; a "
        "model YAML (`configs/model/`) is the `model` section on its own. Types are the Python annotations; `null` "
        "is YAML's empty value. How the pieces fit together: [concepts](concepts.md).",
        "",
        "## Train config",
        "",
    ]
    out += dataclass_table(train_config) + [""]

    out += ["## Model (`model:`, or a model YAML on its own)", ""]
    out += _section("`model`", model_args)
    out += _section("`model.llm`", _cls("model.llm"), "The language model of the medm kind.")
    out += _section("`model.qwenvl`", _cls("model.qwenvl"),
                    "The whole model of kind `qwen-vl` (tower, merger, LLM and processor); no other model key "
                    "but `kind` and `system_prompt` is set with it.")
    out += ["### `model.llm.family`", "", "Registered LLM families (`medm list`): the defaults each sets.", "",
            "| family | default LoRA targets | chat template when the tokenizer has none |", "|---|---|---|"]
    for name in LLM.names():
        fam = LLM.get(name)
        out.append(f"| `{name}` | `{_yaml(fam.lora_target_modules)}` | `{_yaml(fam.template)}` |")
    out += ["", "### `model.template`, `data.template`", "",
            "Registered chat templates (null: the tokenizer's own chat template).", "",
            "| template | format |", "|---|---|"]
    for name in TEMPLATE.names():
        out.append(f"| `{name}` | {_cell(TEMPLATE.get(name).description)} |")
    out += ["", "### `model.vision`, `model.vision3d`: encoders", "",
            "A mapping with `name` (a registered encoder) and that encoder's keys below. Pretrained weights load "
            "from `path` (a local directory or file, or a hub id) on your machine.", ""]
    out += _components(VISION, {"self"})
    out += _section("`volume` (inside `vit3d` and `slices`)", _cls("volume"))
    out += ["### `model.connector`, `model.connector3d`: connectors", "",
            "A mapping with `name` (a registered connector) and its keys below; the input and output widths and the "
            "grid come from the encoder and the LLM.", ""]
    out += _components(CONNECTOR, _GEOMETRY)

    out += ["## Data (`data:`)", ""]
    out += _section("`data`", _cls("data"), "The training data of a stage.")
    out += _section("`data.path` entries of a mixture", _cls("data.path entry"),
                    "Each entry of a `path` list is a file name or a mapping with these keys (docs/data.md, "
                    "\"Mixtures and curricula\").")
    out += _section("`data.mixture`", _cls("data.mixture"), "How a mixture plans each epoch.")

    out += ["## Stage plan (`stage:`)", ""]
    out += _section("`stage`", _cls("stage"))
    out += _section("`stage.lora`", _cls("stage.lora"),
                    "Settings of the components set to `lora` / `qlora`.")

    out += ["## Training (`train:`)", ""]
    train = _cls("train")
    out += ["### `train`", "", f"`{train.__module__}.{train.__qualname__}`. medm's own settings; every other "
            "field of transformers' `TrainingArguments` is settable too (below).", ""]
    out += dataclass_table(train, [train.__dataclass_fields__[name] for name in own_fields(train)]) + [""]
    out += ["### `train`: the other fields of transformers' `TrainingArguments`", "",
            f"Passed to the Trainer as they are, with transformers' own types and defaults (transformers "
            f"{transformers.__version__}; the description is the first sentence of its help, the whole of which is "
            "in [transformers' TrainingArguments reference](https://huggingface.co/docs/transformers/main_classes/"
            "trainer#transformers.TrainingArguments)). They are checked when the config is read like medm's own: "
            "`train.ddp_timeout: 'soon' is not an integer`.", ""]
    out += dataclass_table(train, passthrough_fields(train), first_sentence=True) + [""]
    out += ["### `train`: fields medm sets itself", "",
            "A config that sets one of these is refused with the reason (`train.use_cpu: not settable: ...`).", "",
            "| key | why |", "|---|---|"]
    out += [f"| `{name}` | {_cell(why)} |" for name, why in REFUSED.items()]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/config_reference.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT.relative_to(REPO)} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
