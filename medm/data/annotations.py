"""Conversation records: read, check and normalise annotation files (LLaVA / MedM-VL and ShareGPT), and write them.

The internal format is the LLaVA / MedM-VL record, one JSON list or JSONL file of::

    {"id": "...", "image": ["a.png", ...] | "image3d": ["ct.nii.gz", ...],
     "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"}, {"from": "gpt", "value": "..."}, ...],
     "answer": "...", <any other keys, kept: domain, task, data_source, ...>}

LLaMA-Factory's ShareGPT layout (`messages` of `role` user / assistant / system + `content`, `images`, optional
top-level `system`) is read the same way (a record is ShareGPT when it has `messages` and no `conversations`).

Each record becomes a `Record`. Normalisation rules:
- `image` / `image3d` as a single string means a list of one; missing or null means none.
- `<image>` / `<image3d>` placeholders may sit anywhere in human turns; their count must equal the number of
  images / volumes, except that one image (volume) with no placeholder gets `"<image>\\n"` prepended to the
  first human turn (LLaVA's rule). Any other mismatch, or a placeholder in a gpt turn, is a `RecordError`.
- An optional leading `system` turn, then human / gpt turns alternating from a human turn. Training records end
  on a gpt turn; inference records have only human turns (and perhaps an `answer`).
- A record without `id` gets `"<file name>:<index>"`, stable for a given file.
- Paths stay as written; `resolve_path(path, image_dir)` joins relative paths to `image_dir` when they are used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from medm.data import jsonlist
from medm.data.jsonlist import InvalidLine

# The placeholder strings of the annotation format; `medm.models.builder.add_media_tokens` adds the same
# strings to the tokenizer as special tokens (checked by tests/data/test_annotations.py).
IMAGE_TOKEN = "<image>"
IMAGE3D_TOKEN = "<image3d>"

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_FROM = {v: k for k, v in ROLES.items()}
_LLAVA_KEYS = ("id", "image", "image3d", "conversations", "answer")
_SHAREGPT_KEYS = ("id", "images", "image3d", "messages", "system", "answer")


class AnnotationError(ValueError):
    """A whole annotation file that cannot be read (bad JSON, wrong top-level type) or holds bad records."""


# How the shared JSON-list reader names annotation files and what it raises for them.
_FILE = {"what": "annotation file", "error": AnnotationError, "missing": AnnotationError}


class RecordError(ValueError):
    """One bad record. `kind` names the failure (see `FAILURE_KINDS`); the message names the record id."""

    def __init__(self, record_id: str, kind: str, message: str):
        super().__init__(f"record {record_id!r}: {message}")
        self.record_id = record_id
        self.kind = kind


FAILURE_KINDS = {
    "invalid_json": "a JSONL line that is not valid JSON (e.g. torn by a killed writer)",
    "schema": "not a record: wrong or missing keys / types",
    "empty_conversation": "no turns, or a turn with empty text",
    "bad_turn_order": "roles do not alternate human / gpt from a human turn",
    "ends_on_human": "training record whose last turn is human (nothing to learn after it)",
    "placeholder_mismatch": "<image> / <image3d> placeholders do not match the image / volume lists",
    "special_token": "an answer holds a chat control token such as <|im_end|> or </s> (medm data validate)",
    "duplicate_id": "a second record with an id already used (medm data validate)",
    "missing_file": "an image or volume file does not exist",
    "corrupt_image": "an image file does not decode",
}


@dataclass
class Record:
    """One normalised conversation.

    Attributes:
        id: stable identifier (from the file, or `"<file name>:<index>"`).
        conversations: turns `{"from": "system" | "human" | "gpt", "value": str}`, placeholders explicit.
        image: 2D image paths as written in the file (absolute, or relative to an image dir), reading order.
        image3d: 3D volume paths, same rules.
        answer: reference answer for inference / evaluation records, or None.
        extra: every other key of the source record, kept in order (domain, task, data_source, ...).
    """

    id: str
    conversations: list[dict[str, str]]
    image: list[str] = field(default_factory=list)
    image3d: list[str] = field(default_factory=list)
    answer: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_inference(self) -> bool:
        """True when the record ends on a human turn (a prompt awaiting an answer)."""
        return self.conversations[-1]["from"] == "human"

    def messages(self, system_prompt: str | None = None) -> list[dict[str, str]]:
        """Chat messages `{"role", "content"}` for `apply_chat_template`; a record's own system turn wins over
        `system_prompt`, which is prepended when given."""
        msgs = [{"role": ROLES[t["from"]], "content": t["value"]} for t in self.conversations]
        if system_prompt is not None and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system_prompt})
        return msgs

    def to_llava(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.image:
            out["image"] = list(self.image)
        if self.image3d:
            out["image3d"] = list(self.image3d)
        out["conversations"] = [dict(t) for t in self.conversations]
        if self.answer is not None:
            out["answer"] = self.answer
        return {**out, **self.extra}

    def to_sharegpt(self) -> dict[str, Any]:
        """LLaMA-Factory ShareGPT layout; volumes stay under `image3d` (LLaMA-Factory has no 3D column)."""
        messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in self.conversations]
        out: dict[str, Any] = {"id": self.id, "messages": messages}
        if self.image:
            out["images"] = list(self.image)
        if self.image3d:
            out["image3d"] = list(self.image3d)
        if self.answer is not None:
            out["answer"] = self.answer
        return {**out, **self.extra}


def resolve_path(path: str, image_dir: str | None) -> str:
    """`path` itself when absolute or when no `image_dir` is given, else `image_dir/path`."""
    if image_dir is None or os.path.isabs(path):
        return path
    return os.path.join(image_dir, path)


# ---- reading files --------------------------------------------------------------------------------------------
def read_text(path: str) -> str:
    """The text of an annotation file: UTF-8 (a byte-order mark is dropped), or UTF-16 / UTF-32.

    Raises:
        AnnotationError: no such file, or bytes that are not text in that encoding (naming line and column).
    """
    return jsonlist.read_text(path, **_FILE)


def _read_items(path: str, keep_torn: bool) -> list[Any]:
    return jsonlist.read_json_list(path, items="records", keep_torn=keep_torn, **_FILE)


def read_json_records(path: str) -> list[Any]:
    """The raw items of a JSON list file or a JSONL file (one object per non-empty line).

    Raises:
        AnnotationError: unreadable JSON, naming the file, line and column; a top level that is not a list
            (or JSONL); a file that is missing or not UTF-8 / UTF-16 / UTF-32 text.
    """
    return _read_items(path, keep_torn=False)


def _as_paths(value: Any, key: str, rid: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise RecordError(rid, "schema", f"`{key}` must be a path or a list of paths, got {value!r}")


def _turns(raw: dict[str, Any], rid: str) -> list[dict[str, str]]:
    """Turns `{"from", "value"}` from either layout (schema checks only)."""
    if "conversations" in raw:
        turns = raw["conversations"]
        if not isinstance(turns, list):
            raise RecordError(rid, "schema", "`conversations` must be a list of turns")
        out = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or t.get("from") not in ROLES or not isinstance(t.get("value"), str):
                raise RecordError(rid, "schema", f"turn {i} must be {{'from': human|gpt|system, 'value': str}}, "
                                                 f"got {t!r}")
            out.append({"from": t["from"], "value": t["value"]})
        return out
    msgs = raw["messages"]
    if not isinstance(msgs, list):
        raise RecordError(rid, "schema", "`messages` must be a list of messages")
    out = []
    if raw.get("system"):
        if not isinstance(raw["system"], str):
            raise RecordError(rid, "schema", f"`system` must be a string, got {raw['system']!r}")
        out.append({"from": "system", "value": raw["system"]})
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _FROM or not isinstance(m.get("content"), str):
            raise RecordError(rid, "schema", f"message {i} must be {{'role': user|assistant|system, 'content': str}}, "
                                             f"got {m!r}")
        out.append({"from": _FROM[m["role"]], "value": m["content"]})
    return out


def _check_order(turns: list[dict[str, str]], rid: str, for_training: bool | None) -> None:
    if not turns:
        raise RecordError(rid, "empty_conversation", "has no turns")
    body = turns[1:] if turns[0]["from"] == "system" else turns
    if not body:
        raise RecordError(rid, "empty_conversation", "has only a system turn")
    for i, t in enumerate(body):
        want = "human" if i % 2 == 0 else "gpt"
        if t["from"] != want:
            where = i + len(turns) - len(body)
            raise RecordError(rid, "bad_turn_order", f"turn {where} is {t['from']!r}, expected {want!r} (an optional "
                                                     "system turn, then human / gpt alternating)")
    if for_training and body[-1]["from"] == "human":
        raise RecordError(rid, "ends_on_human", "ends on a human turn; a training record must end on a gpt turn")


def _fix_placeholders(turns: list[dict[str, str]], token: str, n_files: int, key: str, rid: str) -> None:
    """Check placeholder counts against the file list; one file and no placeholder -> prepend it (LLaVA)."""
    in_gpt = sum(t["value"].count(token) for t in turns if t["from"] != "human")
    if in_gpt:
        raise RecordError(rid, "placeholder_mismatch", f"{token} may only appear in human turns, found {in_gpt} "
                                                       "elsewhere")
    found = sum(t["value"].count(token) for t in turns if t["from"] == "human")
    if found == n_files:
        return
    if found == 0 and n_files == 1:
        first = next(t for t in turns if t["from"] == "human")
        first["value"] = f"{token}\n{first['value']}"
        return
    raise RecordError(rid, "placeholder_mismatch", f"{n_files} file(s) in `{key}` but {found} {token} "
                                                   "placeholder(s) in the human turns")


def parse_record(raw: Any, default_id: str, *, for_training: bool | None = None) -> Record:
    """Normalise one raw record (LLaVA or ShareGPT layout) into a `Record`.

    Args:
        raw: the decoded JSON object.
        default_id: id to use when the record has none (e.g. `"train.json:17"`).
        for_training: True requires a final gpt turn; False / None accept inference records too.

    Raises:
        RecordError: with `kind` one of `FAILURE_KINDS` and the record id in the message.
    """
    if not isinstance(raw, dict):
        raise RecordError(default_id, "schema", f"a record must be a JSON object, got {type(raw).__name__}")
    rid = str(raw["id"]) if raw.get("id") is not None else default_id
    sharegpt = "messages" in raw and "conversations" not in raw
    if not sharegpt and "conversations" not in raw:
        raise RecordError(rid, "schema", "has neither `conversations` (LLaVA) nor `messages` (ShareGPT)")
    turns = _turns(raw, rid)
    _check_order(turns, rid, for_training)
    image = _as_paths(raw.get("images" if sharegpt else "image"), "images" if sharegpt else "image", rid)
    image3d = _as_paths(raw.get("image3d"), "image3d", rid)
    _fix_placeholders(turns, IMAGE_TOKEN, len(image), "images" if sharegpt else "image", rid)
    _fix_placeholders(turns, IMAGE3D_TOKEN, len(image3d), "image3d", rid)
    for i, t in enumerate(turns):
        if not t["value"].strip():
            raise RecordError(rid, "empty_conversation", f"turn {i} ({t['from']}) has empty text")
    known = _SHAREGPT_KEYS if sharegpt else _LLAVA_KEYS
    extra = {k: v for k, v in raw.items() if k not in known}
    return Record(id=rid, conversations=turns, image=image, image3d=image3d, answer=raw.get("answer"), extra=extra)


def iter_file(path: str, *, for_training: bool | None = None):
    """Yield `(raw, Record | RecordError)` for every item of one file, never stopping at a bad record; a JSONL
    line that does not decode is a bad record of kind `invalid_json` (raw: an `InvalidLine`).

    Raises:
        AnnotationError: a file that cannot be read as a whole (see `read_json_records`).
    """
    name = os.path.basename(path)
    for i, raw in enumerate(_read_items(path, keep_torn=True)):
        if isinstance(raw, InvalidLine):
            yield raw, RecordError(f"{name}:{i}", "invalid_json", f"{path} {raw.message}")
            continue
        try:
            yield raw, parse_record(raw, f"{name}:{i}", for_training=for_training)
        except RecordError as e:
            yield raw, e


def load_records(paths: str | list[str], *, for_training: bool | None = None) -> list[Record]:
    """All records of one or more files, in order.

    Raises:
        AnnotationError: bad JSON, or any bad record; the message lists every bad record (up to 20) and points
            to `medm data validate`.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    records, errors = [], []
    for path in paths:
        for _, rec in iter_file(path, for_training=for_training):
            (errors if isinstance(rec, RecordError) else records).append(rec)
    if errors:
        raise bad_records_error(errors, paths)
    return records


def bad_records_error(errors: list[RecordError], paths: list[str]) -> AnnotationError:
    """One error listing the bad records of `paths` (up to 20) and pointing to `medm data validate`."""
    shown = "\n  ".join(str(e) for e in errors[:20])
    more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
    return AnnotationError(f"{len(errors)} bad record(s) in {', '.join(paths)}:\n  {shown}{more}\n"
                           "Run `medm data validate FILE --write-clean OUT` to list and drop them.")


def write_json_records(path: str, items: list[dict[str, Any]]) -> None:
    """Write raw dicts as JSONL when `path` ends with `.jsonl`, else as one indented JSON list."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        else:
            json.dump(items, f, ensure_ascii=False, indent=1)
            f.write("\n")


def write_records(path: str, records: list[Record], layout: str = "llava") -> None:
    """Write records in the `llava` (internal) or `sharegpt` (LLaMA-Factory) layout."""
    if layout not in ("llava", "sharegpt"):
        raise ValueError(f"unknown layout {layout!r}; known: llava, sharegpt")
    write_json_records(path, [r.to_llava() if layout == "llava" else r.to_sharegpt() for r in records])
