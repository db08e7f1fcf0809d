"""Batch inference to a predictions file: `run_inference` behind `medm infer`, and the JSONL rows it writes.

One JSON object per line, written and flushed as each batch finishes, so a killed run keeps what it answered::

    {"id": "vqa-rad-test-11", "question": "Is there evidence of an aortic aneurysm?", "prediction": "yes",
     "answer": "yes", "image": ["synpic42202.jpg"], "answer_type": "CLOSED", "question_type": "PRES", ...}

`question` is the last human turn without image placeholders; `answer` is the record's reference (its `answer`,
else its final gpt turn) and is left out when it has none; `image` / `image3d` are the paths as written; every other
key of the record follows as written (`answer_type`, `question_type`, `image_organ`, ...). A run with blank images
adds `"blank_images": true`. `resume=True` keeps the rows already written (a half-written last line from a killed
run is dropped and that record answered again) and answers only the missing ids, so the finished file holds every
id exactly once.

A record whose image or volume cannot be read gets an error line instead of an answer, and the run goes on::

    {"id": "q7", "question": "...", "error": "corrupt or truncated image data (...)", "file": "/data/img/7.png",
     "answer": "yes", "image": ["img/7.png"], ...}

`--resume` keeps such lines like answers; `medm eval` counts them as unanswered.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from medm.data.annotations import IMAGE3D_TOKEN, IMAGE_TOKEN, AnnotationError, Record
from medm.infer.generate import GenerationSettings, Predictor

logger = logging.getLogger(__name__)

# Keys the row itself sets; a record's extra key of the same name is left out.
ROW_KEYS = ("id", "question", "prediction", "error", "file", "answer", "image", "image3d", "blank_images")
_PLACEHOLDER = re.compile(f"{re.escape(IMAGE3D_TOKEN)}|{re.escape(IMAGE_TOKEN)}")


class PredictionFileError(ValueError):
    """A predictions file that cannot be read or resumed; the message names the file and line."""


def question_text(record: Record) -> str:
    """The last human turn (the one the model answers) without `<image>` / `<image3d>` placeholders.

    Example:
        "<image>\\nIs there a fracture?" -> "Is there a fracture?"
    """
    human = [t["value"] for t in record.conversations if t["from"] == "human"]
    return " ".join(_PLACEHOLDER.sub(" ", human[-1]).split()) if human else ""


def reference_answer(record: Record) -> Any:
    """The record's `answer`, else the text of its final gpt turn (an evaluation record written as training data),
    else None."""
    if record.answer is not None:
        return record.answer
    last = record.conversations[-1]
    return last["value"] if last["from"] == "gpt" else None


def prediction_row(record: Record, prediction: str, blank_images: bool = False) -> dict[str, Any]:
    """The JSON object `medm infer` writes for one answered record (see the module docstring)."""
    row: dict[str, Any] = {"id": record.id, "question": question_text(record), "prediction": prediction}
    answer = reference_answer(record)
    if answer is not None:
        row["answer"] = answer
    if record.image:
        row["image"] = list(record.image)
    if record.image3d:
        row["image3d"] = list(record.image3d)
    if blank_images:
        row["blank_images"] = True
    row.update({k: v for k, v in record.extra.items() if k not in ROW_KEYS})
    return row


def error_row(record: Record, error: BaseException, blank_images: bool = False) -> dict[str, Any]:
    """The line `medm infer` writes for a record it could not answer: `error` (the reason) and `file` (the file
    at fault, when known) where an answered record has `prediction`."""
    row = prediction_row(record, "", blank_images)
    del row["prediction"]
    reason = getattr(error, "reason", None) or str(error) or (
        "out of memory" if isinstance(error, MemoryError) else type(error).__name__)
    path = getattr(error, "path", None) or getattr(error, "filename", None)
    head = {"id": row.pop("id"), "question": row.pop("question"), "error": reason}
    if path is not None:
        head["file"] = str(path)
    return {**head, **row}


def _parse_row(raw: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) else None


def read_predictions(path: str, *, resuming: bool = False) -> tuple[list[dict[str, Any]], int]:
    """The rows of a predictions JSONL file, and the byte offset where its trusted part ends.

    Args:
        resuming: read what a killed writer left: a last line that is unreadable or lacks its newline is dropped
            (with a warning) and the returned offset points at its start, so the caller can cut it off and answer
            that record again. Otherwise an unreadable last line is an error, and a readable one without a
            newline counts.

    Raises:
        FileNotFoundError: no such file.
        PredictionFileError: a line that is not a JSON object (naming the line), or a row without `id`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"predictions file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    rows: list[dict[str, Any]] = []
    offset, lineno = 0, 0
    while offset < len(data):
        newline = data.find(b"\n", offset)
        end = len(data) if newline < 0 else newline + 1
        raw, lineno = data[offset:end], lineno + 1
        if raw.strip():
            row = _parse_row(raw)
            is_last = not data[end:].strip()
            if row is None or (resuming and newline < 0):
                if resuming and is_last:
                    logger.warning("%s: dropping the half-written last line %d; its record is answered again",
                                   path, lineno)
                    return rows, offset
                hint = " (left by a killed `medm infer`? finish the file with --resume)" if is_last else ""
                raise PredictionFileError(f"{path}:{lineno}: not a JSON object{hint}")
            if "id" not in row:
                raise PredictionFileError(f"{path}:{lineno}: prediction row without an 'id'")
            rows.append(row)
        offset = end
    return rows, offset


def load_predictions(path: str) -> list[dict[str, Any]]:
    """Every row of a finished predictions file; duplicate ids are an error naming the id."""
    rows, _ = read_predictions(path)
    seen: set[str] = set()
    for i, row in enumerate(rows, start=1):
        rid = str(row["id"])
        if rid in seen:
            raise PredictionFileError(f"{path}: id {rid!r} appears more than once (row {i})")
        seen.add(rid)
    return rows


@dataclass
class InferenceResult:
    """What `run_inference` did: rows in the file now, rows it added, and the file."""

    out: str
    total: int
    written: int
    skipped: int
    errors: int = 0  # of `written`: error lines for records whose media could not be read


def _check_unique_ids(records: Sequence[Record], data: str) -> None:
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise AnnotationError(f"{data}: record id {r.id!r} appears more than once; predictions are keyed by id, "
                                  "so ids must be unique")
        seen.add(r.id)


def run_inference(model: str | Predictor, records: Sequence[Record], out: str, *, data: str = "<records>",
                  image_dir: str | None = None, batch_size: int = 8, settings: GenerationSettings | None = None,
                  resume: bool = False, overwrite: bool = False, blank_images: bool = False,
                  device: str | None = None, dtype: str | None = None, template: str | None = None,
                  system_prompt: str | None = None, progress: bool = True,
                  trust_remote_code: bool = False) -> InferenceResult:
    """Answer `records` in batches and append one row per record to the JSONL file `out` as it goes.

    Args:
        model: a checkpoint directory (any format `medm.models.checkpoint.load_trained` opens) or a `Predictor`.
        records: the questions, in order; ids must be unique.
        data: the records' source, named in errors.
        image_dir: base directory of relative image paths (ignored when `model` is a Predictor).
        batch_size: records per `generate` call (left-padded, KV cache).
        settings: decoding settings; greedy by default.
        resume: keep the rows `out` already holds and answer only the missing ids.
        overwrite: start `out` afresh. Without `resume` or `overwrite`, an existing non-empty `out` is an error
            (a finished or half-done run is never clobbered by accident).
        blank_images: answer with every image replaced by a blank one (image-reliance check).
        device: "auto" / None (CUDA when available), "cuda", "cpu", ...; dtype: e.g. "bfloat16"; None: the
            checkpoint's.
        template, system_prompt: override the model config's prompt format.
        progress: show a tqdm progress bar.
        trust_remote_code: run Python files the checkpoint ships (`auto_map`); off unless asked for.

    Raises:
        FileExistsError: `out` exists and neither `resume` nor `overwrite` is set.
        PredictionFileError: `out` cannot be resumed (a broken line before the last), or its rows name ids the
            records do not have.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    _check_unique_ids(records, data)
    done: set[str] = set()
    exists = os.path.isfile(out) and os.path.getsize(out) > 0
    if exists and not (resume or overwrite):
        raise FileExistsError(f"{out} already exists; pass --resume to finish it or --overwrite to start again")
    if exists and resume:
        rows, good_end = read_predictions(out, resuming=True)
        wanted = {r.id for r in records}
        foreign = [str(r["id"]) for r in rows if str(r["id"]) not in wanted]
        if foreign:
            raise PredictionFileError(f"{out}: cannot resume: {len(foreign)} row(s) have ids that {data} does not "
                                      f"hold (e.g. {foreign[0]!r}); is it the output of another data file?")
        done = {str(r["id"]) for r in rows}
        if len(done) != len(rows):
            raise PredictionFileError(f"{out}: cannot resume: some ids appear more than once")
        with open(out, "r+b") as f:  # drop a half-written last line
            f.truncate(good_end)
    todo = [r for r in records if r.id not in done]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    mode = "a" if resume else "w"
    if not todo:
        if mode == "w":
            open(out, "w").close()
        return InferenceResult(out, len(done), 0, len(done))

    predictor = model if isinstance(model, Predictor) else _load_predictor(model, image_dir, device, dtype,
                                                                            template, system_prompt,
                                                                            trust_remote_code)

    bar = tqdm(total=len(records), initial=len(done), unit="q", desc="infer", disable=not progress)
    written, errors = 0, 0
    with open(out, mode, encoding="utf-8") as f:

        def write(row: dict[str, Any]) -> None:
            nonlocal written
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            written += 1
            bar.update(1)

        def unreadable(rec: Record, error: Exception) -> None:
            # One unreadable file costs its record, not the batch or the run; --resume keeps the line.
            nonlocal errors
            logger.warning("record %r: %s; written as an error line", rec.id, error or "out of memory")
            write(error_row(rec, error, blank_images))
            errors += 1

        # predict() yields a batch's records together once it is generated; each row is flushed at once, so a
        # killed run keeps every finished batch (and at worst leaves one half-written line, which resume drops).
        for rec, pred in predictor.predict(todo, batch_size=batch_size, settings=settings, blank_images=blank_images,
                                           on_error=unreadable):
            write(prediction_row(rec, pred, blank_images))
    bar.close()
    if errors:
        logger.warning("%d of %d record(s) could not be answered (unreadable media): see their `error` lines in %s",
                       errors, len(todo), out)
    return InferenceResult(out, len(done) + written, written, len(done), errors)


def _load_predictor(path: str, image_dir: str | None, device: str | None, dtype: str | None,
                    template: str | None, system_prompt: str | None, trust_remote_code: bool = False) -> Predictor:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Predictor.from_pretrained(path, dtype=dtype, device=device, image_dir=image_dir, template=template,
                                     system_prompt=system_prompt, trust_remote_code=trust_remote_code)
