"""Helpers shared by the data builders: reading source JSON, option lists, image checks, streaming JSONL and the
README each builder writes beside its records."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from medm.data import jsonlist
from medm.data.annotations import IMAGE_TOKEN


class SourceError(ValueError):
    """A source file or row that cannot be converted; the message names the file, the row and the field."""


def read_json(path: str, what: str) -> Any:
    """The decoded JSON of `path`; `what` names the source in errors ("SLAKE split file")."""
    return jsonlist.read_json(path, what=what, error=SourceError)


def read_json_list(path: str, what: str) -> list[Any]:
    """The items of a JSON list file; errors name the file, line and column."""
    return jsonlist.read_json_list(path, what=what, jsonl=False, error=SourceError)


def as_list(value: Any, option: str) -> list[Any]:
    """An option given as a list (YAML `[a, b]`), a comma-separated string (`a,b`) or a single value -> list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, float)):
        return [value]
    raise ValueError(f"option {option!r} must be a list or a comma-separated string, got {value!r}")


def text_field(row: dict[str, Any], key: str, where: str) -> str:
    """A required non-empty string field, stripped; numbers (some sources store answers as numbers) -> strings."""
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(int(value)) if float(value).is_integer() else str(value)
    if not isinstance(value, str) or not value.strip():
        raise SourceError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def check_images(records: Sequence[dict[str, Any]], image_dir: str, source: str, key: str = "image",
                 hint: str = "") -> None:
    """Raise FileNotFoundError naming up to 5 records whose `key` files are missing under `image_dir` (then `hint`)."""
    missing = [(r["id"], p) for r in records for p in r.get(key, [])
               if not os.path.isfile(p if os.path.isabs(p) else os.path.join(image_dir, p))]
    if missing:
        shown = ", ".join(f"{rid}: {p}" for rid, p in missing[:5])
        raise FileNotFoundError(f"{len(missing)} {source} record(s) name files missing from {image_dir}: {shown}"
                                + (" ..." if len(missing) > 5 else "") + (f"; {hint}" if hint else ""))


class JsonlWriter:
    """Append records to a JSONL file one line at a time (builders that stream never hold a split in memory)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.count = 0
        self._f = open(path, "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_readme(path: str, lines: Sequence[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip("\n") + "\n")
    return path


def image_dir_note(image_dir: str, absolute: bool = False) -> str:
    return ("Image paths are absolute." if absolute else
            f"Image paths are relative to `{image_dir}`: pass `--image-dir {image_dir}` (or `image_dir` in a data "
            "section).")


YES_NO = ("yes", "no")


def closed_if_yes_no(answer: str) -> str:
    """The answer type sources without one get: yes / no answers are CLOSED, everything else OPEN."""
    return "CLOSED" if answer.strip().lower() in YES_NO else "OPEN"


def qa_record(rid: str, image: str, question: str, answer: str, answer_type: str, source: str, split: str,
              fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """One single-turn VQA record; `fields` are the source's other fields, kept as written."""
    record: dict[str, Any] = {
        "id": rid, "image": [image],
        "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}],
        "answer": answer, "answer_type": answer_type, "question": question,
    }
    record.update(fields or {})
    record.update({"data_source": source, "split": split})
    return record


def qa_summary(splits: dict[str, list[dict[str, Any]]]) -> list[str]:
    """README table of QA splits: questions, CLOSED (yes/no), OPEN, distinct images."""
    rows = []
    for name, records in splits.items():
        closed = [r for r in records if r["answer_type"] == "CLOSED"]
        yes_no = sum(r["answer"].lower() in YES_NO for r in closed)
        rows.append((f"{name}.json", len(records), f"{len(closed)} ({yes_no} yes/no)",
                     len(records) - len(closed), len({r["image"][0] for r in records})))
    return markdown_table(("file", "questions", "CLOSED", "OPEN", "images"), rows)
