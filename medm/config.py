"""YAML -> dataclasses, with dotted overrides from the CLI (`llm.path=/models/x`).

Every argument is a dataclass field with `metadata["help"]`, so the CLI, the YAML and the docs share one
definition. A value that does not fit is a one-line error naming the key, the value and what was expected
(`train.learning_rate: 'abc' is not a float`); an unknown key names the closest known one
(`train.learnig_rate: unknown key; did you mean learning_rate?`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def arg(default: Any = dataclasses.MISSING, help: str = "", *, ge: float | None = None,
        choices: Any = None, **kw: Any) -> Any:
    """A dataclass field with help text; mutable defaults are copied per instance.

    Args:
        ge: smallest value allowed (numbers), checked by `from_dict` with the field's type.
        choices: the values allowed (strings), checked by `from_dict`.
    """
    metadata: dict[str, Any] = {"help": help}
    if ge is not None:
        metadata["ge"] = ge
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


def closest(word: str, known: Any) -> str | None:
    """The known name nearest to a misspelt `word`, or None when none is near: the first that `word` begins
    (`adamw` -> adamw_torch), else the closest by difflib."""
    known = [str(k) for k in known]
    started = [k for k in known if k.startswith(str(word))] if len(str(word)) >= 4 else []
    found = started or difflib.get_close_matches(str(word), known, n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_key(where: str, key: str, known: Any, what: str = "key", sep: str = ".", of: str = "") -> ConfigError:
    """`where.key: unknown key; did you mean X?` (or the list of known keys when none is close); `of` names whose
    keys they are (` for 'clip'`)."""
    known = list(known)
    best = closest(key, known)
    hint = f"did you mean {best}?" if best else f"valid {what}s: {', '.join(map(str, known))}"
    return ConfigError(f"{where}{sep}{key}: unknown {what}{of}; {hint}")


def not_allowed(where: str, value: Any, allowed: Any) -> ConfigError:
    """`where: 'x' is not allowed; did you mean y? (allowed: ...)` for a value outside a field's choices."""
    allowed = [str(a) for a in allowed]
    best = closest(value, allowed) if isinstance(value, str) else None
    hint = f"; did you mean {best}?" if best else ""
    return ConfigError(f"{where}: {value!r} is not allowed{hint} (allowed: {', '.join(allowed)})")


def load_yaml(path: str) -> dict[str, Any]:
    """Read one YAML mapping; a syntax error names the file, line and column."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML: numbers, lists, null) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
        node = cfg
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return cfg


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a float", str: "a string", list: "a list",
               dict: "a mapping", type(None): "null"}


def _coerce(value: Any, tp: Any, choices: tuple | None) -> tuple[bool, Any]:
    """(fits, value) of `value` for type `tp`, with the readings YAML makes necessary: `1e-4` is a string to YAML
    (a number here), and `no` / `yes` are booleans to YAML (the words, for a text field that offers them)."""
    if tp is Any or tp is object:
        return True, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        for member in members:  # an exact fit first: `str | bool` keeps `true` a boolean
            if member is type(None) and value is None or isinstance(member, type) and type(value) is member:
                return True, value
        for member in members:
            fits, coerced = _coerce(value, member, choices)
            if fits:
                return True, coerced
        return False, value
    base = origin or tp
    if not isinstance(base, type):
        return True, value  # Literal, TypeVar, ...: not checked here
    if base is type(None):
        return value is None, value
    if base is bool:
        return isinstance(value, bool), value
    if base is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if base is float:
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if base is str:
        if isinstance(value, bool) and choices:
            word = {False: "no", True: "yes"}[value]
            return word in choices, word
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)  # a name YAML read as a number (a folder called 2024)
        return isinstance(value, str), value
    if base in (list, tuple):
        return isinstance(value, (list, tuple)), value
    if dataclasses.is_dataclass(base):
        return isinstance(value, (dict, base)), value
    return isinstance(value, base), value


def _type_words(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]  # `float | None`: 'abc' is not a float
        return " or ".join(dict.fromkeys(_type_words(a) for a in members))
    base = typing.get_origin(tp) or tp
    return _TYPE_WORDS.get(base, "a mapping" if _is_dataclass_type(base) else getattr(base, "__name__", str(tp)))


def check_value(value: Any, tp: Any, field: dataclasses.Field, where: str) -> Any:
    """`value` read for `field` (type `tp`), made to fit it (see `_coerce`), or a ConfigError that names the field,
    the value and what it must be: the type, the `arg(ge=...)` bound, the `arg(choices=...)` values."""
    choices = field.metadata.get("choices")
    fits, coerced = _coerce(value, tp, choices)
    if not fits:
        raise ConfigError(f"{where}: {value!r} is not {_type_words(tp)}")
    value = coerced
    ge = field.metadata.get("ge")
    if ge is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value < ge:
        raise ConfigError(f"{where}: {value!r} is not allowed (must be >= {ge})")
    if choices and isinstance(value, str) and value not in choices:
        raise not_allowed(where, value, choices)
    return value


def check_arguments(func: Any, values: dict[str, Any], where: str) -> None:
    """Each of `values` (the keys of a component's config section) fits the annotation of `func`'s parameter of
    that name, if it has one: the same one-line errors as `check_value`. Null is left to the component."""
    try:
        hints = typing.get_type_hints(func)
    except (NameError, TypeError):  # an annotation that names what this module cannot see: left unchecked
        return
    for key, value in values.items():
        if key in hints and value is not None and not _coerce(value, hints[key], None)[0]:
            raise ConfigError(f"{where}.{key}: {value!r} is not {_type_words(hints[key])}")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass `cls` from a dict, recursing into nested dataclass fields; each value is checked against
    its field's type, bound and choices (`check_value`). A class may refuse keys by name with a reason
    (`__refused__ = {key: reason}`)."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    refused = getattr(cls, "__refused__", {})
    for key in data:
        if key in refused and key not in names:
            raise ConfigError(f"{where}.{key}: not settable: {refused[key]}")
    unknown = [k for k in data if k not in names]
    if unknown:
        raise unknown_key(where, unknown[0], names)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, tp = data[f.name], _unwrap_optional(hints[f.name])
        if _is_dataclass_type(tp) and (value is None or isinstance(value, dict)):
            value = from_dict(tp, value, f"{where}.{f.name}")
        elif not (value is None and f.default is None):  # null where the default is null: "not set"
            value = check_value(value, hints[f.name], f, f"{where}.{f.name}")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def resolve_relative(path: str | None, base_file: str) -> str | None:
    """A path in a YAML file is relative to the working directory, else to that file's folder or the nearest folder
    above it where it exists (the shipped configs name `configs/model/x.yaml` from the repository root, so `medm
    demo` and `medm train configs/...` work from any working directory)."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    folder = os.path.dirname(os.path.abspath(base_file))
    while True:
        candidate = os.path.join(folder, path)
        if os.path.exists(candidate):
            return candidate
        if os.path.dirname(folder) == folder:
            return path
        folder = os.path.dirname(folder)


def model_section(cfg: dict[str, Any], where: str) -> tuple[dict[str, Any], str]:
    """The `model` section of a train config mapping read from `where`, and where it came from: a YAML path in it
    (relative to cwd or to `where`) is read; shared by `medm train` and `medm data validate --model`."""
    model = cfg.get("model")
    if model is None:
        raise ConfigError(f"{where}: `model` is required (a configs/model/*.yaml path or a mapping)")
    model_where = f"{where}: model"
    if isinstance(model, str):
        model_where = model_file(model, where)
        model = load_yaml(model_where)
    if not isinstance(model, dict):
        raise ConfigError(f"{where}: `model` must be a path or a mapping, got {type(model).__name__}")
    return model, model_where


def model_file(path: str, where: str) -> str:
    """The model YAML a train config at `where` names by `path`; an error names both when it is missing."""
    found = resolve_relative(path, where)
    if not os.path.isfile(found):
        raise ConfigError(f"{where}: model file {path!r} not found")
    return found
