"""One reader for JSON list and JSONL files (annotations, builders' source files, benchmarks' published files).

Every error names the file, line and column. Text is UTF-8 (a byte-order mark is dropped) or UTF-16 / UTF-32
(found by their byte-order mark or zero bytes, as `json.loads` does for bytes); nesting too deep for Python's
parser is an invalid-JSON error, not a RecursionError; a JSONL line torn by a killed writer can be kept as an
`InvalidLine` so the rest of the file stays readable.

Callers pass their own exception classes (`error` for bad contents, `missing` for a file that is not there), so
each reader's errors stay what its callers catch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any


@dataclass
class InvalidLine:
    """A JSONL line that does not decode (e.g. torn by a killed writer); the rest of the file stays readable."""

    lineno: int
    message: str


def read_text(path: str, *, what: str = "JSON file", error: type[Exception] = ValueError,
              missing: type[Exception] = FileNotFoundError) -> str:
    """The text of `path` (UTF-8 / UTF-16 / UTF-32, see the module docstring); `what` names it in errors.

    Raises:
        missing: no such file, or a directory.
        error: bytes that are not text in that encoding (naming line and column).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise missing(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise missing(f"{what} {path} is a directory") from None
    encoding = json.detect_encoding(data)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - data.rfind(b"\n", 0, e.start)
        raise error(f"{path}:{line}:{col}: not {encoding.upper().replace('-SIG', '')} text (byte "
                    f"0x{data[e.start]:02x}): save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 "
                    f"{os.path.basename(path)} > fixed.json` for a Latin-1 file") from None


def decode(text: str) -> Any:
    """`json.loads`, with nesting too deep for Python's parser as a JSONDecodeError (not a RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply (thousands of [ or {)", text, 0) from None


def read_json(path: str, *, what: str = "JSON file", error: type[Exception] = ValueError,
              missing: type[Exception] = FileNotFoundError) -> Any:
    """The decoded JSON document of `path` (any top-level type).

    Raises:
        missing: no such file.
        error: invalid JSON or text, naming the file, line and column.
    """
    text = read_text(path, what=what, error=error, missing=missing)
    try:
        return decode(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def read_json_list(path: str, *, what: str = "JSON file", items: str | None = None, jsonl: bool = True,
                   keep_torn: bool = False, error: type[Exception] = ValueError,
                   missing: type[Exception] = FileNotFoundError) -> list[Any]:
    """The items of a JSON list file, or (with `jsonl`) of a JSONL file, one value per non-empty line.

    Args:
        what: names the file in errors ("annotation file", "SLAKE split file").
        items: what the list holds, for the error on another top-level type ("records").
        jsonl: also read JSONL (a file that does not start with `[`).
        keep_torn: a JSONL line that does not decode becomes an `InvalidLine` item instead of an error.

    Raises:
        missing: no such file.
        error: invalid JSON or text (file, line, column), or a top level that is not a list (or JSONL).
    """
    text = read_text(path, what=what, error=error, missing=missing)
    of = f" of {items}" if items else ""
    if not jsonl or text.lstrip().startswith("["):
        try:
            value = decode(text)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        if not isinstance(value, list):
            raise error(f"{path}: expected a JSON list{of}, got {type(value).__name__}")
        return value
    lines = text.splitlines()
    if len([ln for ln in lines if ln.strip()]) > 1:
        # One JSON value over several lines is a whole document, not JSONL: say what it is rather than
        # reporting its first line as a broken JSONL line.
        try:
            whole = decode(text)
        except json.JSONDecodeError:
            pass
        else:
            kind = f"object (keys: {', '.join(map(str, list(whole)[:8]))})" if isinstance(whole, dict) else \
                type(whole).__name__
            raise error(f"{path}: expected a JSON list{of} or JSONL (one record per line), got one JSON {kind} "
                        f"over {len(lines)} lines")
    out: list[Any] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(decode(line))
        except json.JSONDecodeError as e:
            if not keep_torn:
                raise error(f"{path}:{lineno}:{e.colno}: invalid JSON (JSONL line): {e.msg}") from None
            out.append(InvalidLine(lineno, f"line {lineno}, column {e.colno}: invalid JSON (JSONL line): {e.msg}"))
    return out
