"""Every field of transformers' `TrainingArguments` under `train:`, typed and checked like medm's own.

`TrainingArgumentsFields` is a dataclass derived from `dataclasses.fields(TrainingArguments)` (each field's type,
default and help), less the fields medm sets itself (`REFUSED`, each with its reason). `TrainArgs`
(medm.train.args) extends it: its own fields keep their names and defaults and replace the transformers field of the
same name; every other field passes through to the Trainer's `TrainingArguments` as it is (`passthrough`).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import typing
from typing import Any

from transformers import TrainingArguments

# Fields of TrainingArguments that a config may not set: medm sets them from its own settings, or they would break
# what medm builds. key -> the one-line reason a config that sets it is refused with.
REFUSED = {
    "use_cpu": "set by medm from train.device (auto, cuda, cpu)",
    "activation_checkpointing": "set by medm from train.gradient_checkpointing",
    "gradient_checkpointing_kwargs": "a deprecated alias in transformers; set train.activation_checkpointing_kwargs",
    "remove_unused_columns": "set by medm (false): its collators build exactly the model's inputs",
    "label_names": "set by medm ([labels]): every medm batch carries its targets as `labels`",
    "prediction_loss_only": "set by medm (true): validation computes the loss without gathering logits (generated "
                            "answers are scored with train.eval_task)",
    "length_column_name": "medm's length grouping reads the dataset's lengths (train.train_sampling_strategy)",
    "local_rank": "set by the launcher (torchrun, deepspeed, accelerate)",
    "parallelism_config": "an accelerate ParallelismConfig object, which a YAML value cannot express",
    "do_train": "a flag of transformers' example scripts that the Trainer ignores; medm train always trains",
    "do_eval": "a flag of transformers' example scripts that the Trainer ignores; validation runs with "
               "data.val_path or data.val_size",
    "do_predict": "a flag of transformers' example scripts that the Trainer ignores",
}


def _enum_choices(tp: Any) -> tuple[str, ...] | None:
    """The values of a string Enum in `tp` (`SchedulerType | str` -> linear, cosine, ...), else None."""
    for member in typing.get_args(tp) or (tp,):
        if isinstance(member, type) and issubclass(member, enum.Enum) and issubclass(member, str):
            return tuple(m.value for m in member)
    return None


def _derived_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    hints = typing.get_type_hints(TrainingArguments)
    out = []
    for f in dataclasses.fields(TrainingArguments):
        if not f.init or f.name.startswith("_") or f.name in REFUSED:
            continue
        metadata = {"help": f.metadata.get("help", "")}
        choices = f.metadata.get("choices") or _enum_choices(hints[f.name])
        if choices:
            metadata["choices"] = tuple(choices)
        if f.default_factory is not dataclasses.MISSING:
            field = dataclasses.field(default_factory=f.default_factory, metadata=metadata)
        else:
            default = f.default.value if isinstance(f.default, enum.Enum) else f.default
            field = dataclasses.field(default=default, metadata=metadata)
        out.append((f.name, hints[f.name], field))
    return out


TrainingArgumentsFields = dataclasses.make_dataclass(
    "TrainingArgumentsFields", _derived_fields(),
    namespace={"__module__": __name__, "__refused__": REFUSED,
               "__doc__": "The fields of transformers' TrainingArguments that a config may set (see the module)."})


def own_fields(cls: type) -> list[str]:
    """The fields `cls` (a subclass of TrainingArgumentsFields) declares itself, in the order it declares them."""
    own: dict[str, None] = {}
    for klass in reversed(cls.__mro__):
        if issubclass(klass, TrainingArgumentsFields) and klass is not TrainingArgumentsFields:
            own.update(dict.fromkeys(inspect.get_annotations(klass)))
    names = {f.name for f in dataclasses.fields(cls)}
    return [name for name in own if name in names]


def passthrough_fields(cls: type) -> list[dataclasses.Field]:
    """The TrainingArguments fields of `cls` that it does not declare itself: they pass through unchanged."""
    own = set(own_fields(cls))
    return [f for f in dataclasses.fields(cls) if f.name not in own]


def passthrough(train: Any) -> dict[str, Any]:
    """{name: value} of the pass-through fields of a TrainArgs, for `TrainingArguments(...)`."""
    return {f.name: getattr(train, f.name) for f in passthrough_fields(type(train))}



# Never recorded anywhere medm writes (the model card, results): a credential.
SECRETS = ("hub_token",)


def recorded_settings(train: Any) -> dict[str, Any]:
    """The settings of a TrainArgs a model card records: medm's own fields, and the pass-through fields the config
    changed from transformers' defaults; never a credential (`SECRETS`)."""
    own = set(own_fields(type(train)))
    out = {}
    for f in dataclasses.fields(train):
        value = getattr(train, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name not in SECRETS and (f.name in own or value != default):
            out[f.name] = value
    return out
