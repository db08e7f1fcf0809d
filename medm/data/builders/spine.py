"""Lumbar spine MRI challenge labels (sagittal T2 slices) to medm records for five tasks.

`medm data build spine --src data/spine --out data/spine_records --task-type qd,zjppt --sag-image [5,6]`

Tasks (names as the challenge abbreviates them):

- `qd`: lumbar curvature (study level), `sl`: vertebral alignment (study level);
- `zjppt`: disc bulge or herniation, `zyzg`: central canal stenosis (one question per disc level);
- `positioning`: the bounding box of each disc level on the annotated sagittal slice.

The label schema (one JSON file per split: `train.json`, `dev.json`, `test.json` under `--src`; slice images
relative to `--src` or `--image-folder`) is documented in docs/spine_labels.md; `medm data build spine-synthetic
--out DIR` (medm.data.builders.spine_synthetic) writes a small synthetic set in it. `medm data split train_all.json
--out DIR` splits a label file into train / dev by study.

Options: `--task-type` (list, default all five); `--sag-image` (slice indices each sample shows, default the
middle slice; `[5,6]` gives two images per sample, in that order); `--sag-type joint|separate` (`separate`: one
sample per listed slice instead of one with all of them); `--type-dataset train|dev|test|both` (`both`: train and
dev); `--suffix` (added to the output names: `train{suffix}.json`); `--templates templates.json` (question wording
per task: a string or a list of strings, one picked per sample from its id; `{level}` and `{options}` are filled);
`--box-format json|grid1000` (positioning answers, see medm.data.builders.grounding). Positioning samples always
show the annotated slice (`positioning.slice`), whatever `--sag-image` says.

Records carry `spine_task`, `level` (per-level tasks), `study_id`, `slices`, `options` (the class names) and, for
positioning, `answer` = the canonical pixel box [x1, y1, x2, y2] and `image_size`; `medm eval --task spine` scores
them (accuracy and macro-F1 per task, mean IoU and Acc@0.5 for positioning). A label left `null` is unlabelled:
skipped in train / dev, written as a prompt-only record (no gpt turn; `medm data validate --inference`) in test.
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from typing import Any

from medm.data.annotations import IMAGE_TOKEN, write_json_records
from medm.data.builders._common import (
    SourceError,
    as_list,
    check_images,
    image_dir_note,
    markdown_table,
    read_json,
    write_readme,
)
from medm.data.builders.grounding import BOX_FORMATS, check_box, format_boxes, image_size_of
from medm.registry import BUILDER

TASKS = ("qd", "sl", "zjppt", "zyzg", "positioning")
STUDY_TASKS = ("qd", "sl")
LEVEL_TASKS = ("zjppt", "zyzg")
LEVELS = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
DEFAULT_CLASSES: dict[str, tuple[str, ...]] = {
    "qd": ("normal", "straightened", "reversed", "increased"),
    "sl": ("normal", "anterolisthesis", "retrolisthesis"),
    "zjppt": ("normal", "bulge", "herniation"),
    "zyzg": ("normal", "mild", "moderate", "severe"),
}
DEFAULT_TEMPLATES: dict[str, str] = {
    "qd": "What is the curvature of the lumbar spine in this sagittal MRI? Options: {options}.",
    "sl": "What is the vertebral alignment of the lumbar spine in this sagittal MRI? Options: {options}.",
    "zjppt": "Is there a disc bulge or herniation at {level}? Options: {options}.",
    "zyzg": "What is the grade of central canal stenosis at {level}? Options: {options}.",
    "positioning": "Where is the {level} intervertebral disc on this sagittal slice?",
}
SPLIT_FILES = {"train": "train.json", "dev": "dev.json", "test": "test.json"}
TYPE_DATASETS = {"train": ("train",), "dev": ("dev",), "test": ("test",), "both": ("train", "dev")}
SAG_TYPES = ("joint", "separate")
SCHEMA = "medm-spine-labels/1"


# ---- labels ---------------------------------------------------------------------------------------------------
def load_labels(path: str) -> tuple[list[dict[str, Any]], tuple[str, ...], dict[str, tuple[str, ...]]]:
    """(studies, levels, classes) of a label file, every label checked (schema in docs/spine_labels.md).

    Raises:
        SourceError: naming the file, study, task, level and value.
    """
    data = read_json(path, "spine label file")
    if isinstance(data, list):
        data = {"studies": data}
    if not isinstance(data, dict) or not isinstance(data.get("studies"), list):
        raise SourceError(f"{path}: expected {{\"studies\": [...]}} or a list of studies")
    levels = tuple(data.get("levels") or LEVELS)
    classes = dict(DEFAULT_CLASSES)
    for task, names in (data.get("classes") or {}).items():
        if task not in DEFAULT_CLASSES or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise SourceError(f"{path}: 'classes' must map {', '.join(DEFAULT_CLASSES)} to lists of names, got "
                              f"{task!r}: {names!r}")
        classes[task] = tuple(names)
    seen = set()
    for i, study in enumerate(data["studies"]):
        sid = study.get("study_id") if isinstance(study, dict) else None
        where = f"{path}, study {sid!r}" if sid is not None else f"{path}, study {i}"
        if not isinstance(sid, str) or not sid:
            raise SourceError(f"{where}: 'study_id' must be a non-empty string")
        if sid in seen:
            raise SourceError(f"{where}: study_id repeats an earlier study")
        seen.add(sid)
        sag = study.get("sagittal")
        if not isinstance(sag, list) or not sag or not all(isinstance(s, str) and s for s in sag):
            raise SourceError(f"{where}: 'sagittal' must be a non-empty list of slice image paths")
        for task in STUDY_TASKS:
            value = study.get(task)
            if value is not None and value not in classes[task]:
                raise SourceError(f"{where}: {task} label {value!r} is not one of {', '.join(classes[task])}")
        for task in LEVEL_TASKS:
            value = study.get(task)
            if value is None:
                continue
            if not isinstance(value, dict):
                raise SourceError(f"{where}: {task} must map levels to labels, got {value!r}")
            for level, label in value.items():
                if level not in levels:
                    raise SourceError(f"{where}: {task} names level {level!r}, not one of {', '.join(levels)}")
                if label is not None and label not in classes[task]:
                    raise SourceError(f"{where}: {task} {level} label {label!r} is not one of "
                                      f"{', '.join(classes[task])}")
        pos = study.get("positioning")
        if pos is not None:
            if not isinstance(pos, dict) or not isinstance(pos.get("slice"), int) or isinstance(pos["slice"], bool):
                raise SourceError(f"{where}: positioning must be {{\"slice\": int, \"boxes\": {{level: box}}}}")
            if not 0 <= pos["slice"] < len(sag):
                raise SourceError(f"{where}: positioning slice {pos['slice']} is outside 0..{len(sag) - 1}")
            boxes = pos.get("boxes")
            if boxes is not None and not isinstance(boxes, dict):
                raise SourceError(f"{where}: positioning boxes must map levels to [x1, y1, x2, y2], got {boxes!r}")
            for level, box in (boxes or {}).items():
                if level not in levels:
                    raise SourceError(f"{where}: positioning names level {level!r}, not one of {', '.join(levels)}")
                if box is not None:
                    check_box(box, None, f"{where}, positioning {level}")
    return data["studies"], levels, classes


def load_templates(path: str | None) -> dict[str, list[str]]:
    """Question wordings per task: the defaults, replaced per task by a templates JSON {task: str | [str, ...]}."""
    out = {task: [text] for task, text in DEFAULT_TEMPLATES.items()}
    if path is None:
        return out
    data = read_json(path, "spine templates file")
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected an object {{task: question or [questions]}}")
    for task, value in data.items():
        if task not in TASKS:
            raise SourceError(f"{path}: unknown task {task!r}; tasks: {', '.join(TASKS)}")
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise SourceError(f"{path}: {task} must be a question or a non-empty list of questions")
        for text in texts:
            try:
                text.format(level="L4-L5", options="a, b")
            except (KeyError, IndexError, ValueError) as e:
                raise SourceError(f"{path}: {task} template {text!r}: only {{level}} and {{options}} may be "
                                  f"filled ({e!r})") from None
            if task not in STUDY_TASKS and "{level}" not in text:
                raise SourceError(f"{path}: {task} template {text!r} must name the disc level with {{level}}")
        out[task] = list(texts)
    return out


# ---- records --------------------------------------------------------------------------------------------------
def _pick(texts: list[str], rid: str) -> str:
    # Chosen from the id, not an RNG: the same record always gets the same wording, whatever else is built.
    return texts[zlib.crc32(rid.encode()) % len(texts)]


def _record(rid: str, images: list[str], question: str, answer_text: str | None, fields: dict[str, Any]
            ) -> dict[str, Any]:
    turns = [{"from": "human", "value": IMAGE_TOKEN + "\n" + (IMAGE_TOKEN + "\n") * (len(images) - 1) + question}]
    if answer_text is not None:
        turns.append({"from": "gpt", "value": answer_text})
    record = {"id": rid, "image": images, "conversations": turns}
    if fields.get("answer") is None:
        fields = {k: v for k, v in fields.items() if k != "answer"}
    return {**record, **fields, "question": question}


def _views(study: dict[str, Any], sag_image: list[int] | None, sag_type: str, where: str) -> list[list[int]]:
    n = len(study["sagittal"])
    indices = sag_image if sag_image else [n // 2]
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise SourceError(f"{where}: --sag-image {bad} outside the study's {n} sagittal slices (0..{n - 1})")
    return [[i] for i in indices] if sag_type == "separate" else [list(indices)]


def study_records(study: dict[str, Any], split: str, tasks: list[str], levels: tuple[str, ...],
                  classes: dict[str, tuple[str, ...]], templates: dict[str, list[str]], sag_image: list[int] | None,
                  sag_type: str, image_dir: str, box_format: str, where: str) -> tuple[list[dict[str, Any]], int]:
    """(records, unlabelled count) of one study. Unlabelled (null) labels give prompt-only records in test only."""
    sid, sag = study["study_id"], study["sagittal"]
    records, unlabelled = [], 0
    prompt_only = split == "test"
    for task in tasks:
        if task == "positioning":
            pos = study.get("positioning")
            if pos is None:
                continue
            boxes = pos.get("boxes")
            image = sag[pos["slice"]]
            size = image_size_of(os.path.join(image_dir, image), f"{where}, positioning")
            for level in levels:
                box = None if boxes is None else boxes.get(level, ...)
                if box is ...:
                    continue  # level not annotated in this study
                if box is None:
                    unlabelled += 1
                    if not prompt_only:
                        continue
                else:
                    box = check_box(box, size, f"{where}, positioning {level}")
                rid = f"spine-{split}-{sid}-positioning-{level}"
                q = _pick(templates[task], rid).format(level=level, options="")
                text = format_boxes([box], level, size, box_format) if box is not None else None
                records.append(_record(rid, [image], q, text, {
                    "answer": box, "spine_task": task, "level": level, "study_id": sid, "slices": [pos["slice"]],
                    "image_size": list(size), "box_format": box_format, "data_source": "spine", "split": split}))
            continue
        value = study.get(task, ...)
        if value is ...:
            continue
        items = [(None, value)] if task in STUDY_TASKS else (
            [(level, None) for level in levels] if value is None else
            [(level, value[level]) for level in levels if level in value])
        for level, label in items:
            if label is None:
                unlabelled += 1
                if not prompt_only:
                    continue
            for view in _views(study, sag_image, sag_type, where):
                rid = f"spine-{split}-{sid}-{task}" + (f"-{level}" if level else "") + (
                    f"-s{view[0]}" if sag_type == "separate" else "")
                q = _pick(templates[task], rid).format(level=level or "", options=", ".join(classes[task]))
                fields = {"answer": label, "answer_type": "CLOSED", "spine_task": task, "study_id": sid,
                          "slices": view, "options": list(classes[task]), "data_source": "spine", "split": split}
                if level:
                    fields["level"] = level
                records.append(_record(rid, [sag[i] for i in view], q, label, fields))
    return records, unlabelled


@BUILDER.register("spine")
def build_spine(out: str, src: str, task_type: Any = "qd,sl,zjppt,zyzg,positioning", sag_image: Any = None,
                sag_type: str = "joint", type_dataset: str = "both", suffix: str = "", templates: str | None = None,
                image_folder: str | None = None, box_format: str = "json") -> dict[str, str]:
    """Convert spine label files under `src` into `out/{split}{suffix}.json` records (options in the module doc).

    Args:
        out: output directory (created).
        src: folder holding `train.json` / `dev.json` / `test.json` label files.
        task_type: tasks to write, from qd, sl, zjppt, zyzg, positioning (list or comma-separated).
        sag_image: sagittal slice indices each sample shows (int or list); default the middle slice.
        sag_type: "joint" (one sample with all listed slices) or "separate" (one sample per slice).
        type_dataset: "train", "dev", "test" or "both" (train and dev).
        suffix: added to each output file name before `.json`.
        templates: JSON file of question wordings per task.
        image_folder: base folder of the slice paths; default `src`.
        box_format: positioning answer text: "json" or "grid1000".

    Returns:
        Written paths by role (each split, "readme") and "image_dir".
    """
    tasks = [str(t) for t in as_list(task_type, "task_type")]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown spine task(s) {unknown or tasks}; tasks: {', '.join(TASKS)}")
    slices = [int(i) for i in as_list(sag_image, "sag_image")] or None
    if sag_type not in SAG_TYPES:
        raise ValueError(f"--sag-type must be one of {', '.join(SAG_TYPES)}, got {sag_type!r}")
    if type_dataset not in TYPE_DATASETS:
        raise ValueError(f"--type-dataset must be one of {', '.join(TYPE_DATASETS)}, got {type_dataset!r}")
    if box_format not in BOX_FORMATS:
        raise ValueError(f"unknown box format {box_format!r}; known: {', '.join(BOX_FORMATS)}")
    wordings = load_templates(templates)
    image_dir = os.path.abspath(image_folder if image_folder is not None else src)
    result: dict[str, list[dict[str, Any]]] = {}
    unlabelled: dict[str, int] = {}
    for split in TYPE_DATASETS[type_dataset]:
        path = os.path.join(src, SPLIT_FILES[split])
        studies, levels, classes = load_labels(path)
        records, missing = [], 0
        for study in studies:
            recs, n = study_records(study, split, tasks, levels, classes, wordings, slices, sag_type, image_dir,
                                    box_format, f"{path}, study {study['study_id']!r}")
            records += recs
            missing += n
        # E.g. label files written by `medm data split` into a folder of their own, away from the slices:
        check_images(records, image_dir, "spine", hint="" if image_folder else "slice paths start at --src: pass "
                     "--image-folder DIR where they are")
        result[split], unlabelled[split] = records, missing
    os.makedirs(out, exist_ok=True)
    paths = {}
    for split, records in result.items():
        paths[split] = os.path.join(out, f"{split}{suffix}.json")
        write_json_records(paths[split], records)
    paths["readme"] = write_readme(os.path.join(out, f"README{suffix}.md"),
                                   _readme(src, out, tasks, slices, sag_type, result, unlabelled, image_dir))
    paths["image_dir"] = image_dir
    return paths


def _readme(src: str, out: str, tasks: list[str], slices: list[int] | None, sag_type: str,
            result: dict[str, list[dict[str, Any]]], unlabelled: dict[str, int], image_dir: str) -> list[str]:
    rows = []
    for split, records in result.items():
        for task in tasks:
            recs = [r for r in records if r["spine_task"] == task]
            answers = Counter(str(r["answer"]) if task != "positioning" else "box" for r in recs if "answer" in r)
            rows.append((split, task, len(recs), len({r["study_id"] for r in recs}),
                         ", ".join(f"{k} {v}" for k, v in sorted(answers.items())),
                         sum("answer" not in r for r in recs)))
    lines = ["# Lumbar spine MRI (medm records)", "",
             f"Built by `medm data build spine --src {src} --out {out} --task-type {','.join(tasks)}` with sagittal "
             f"slices {slices if slices else 'middle'} ({sag_type}).", "", image_dir_note(image_dir), ""]
    lines += markdown_table(("split", "task", "records", "studies", "answers", "prompt-only"), rows)
    lines += ["", "Unlabelled (null) labels: " + ", ".join(f"{s} {n}" for s, n in unlabelled.items())
              + " (skipped in train / dev; prompt-only records in test)."]
    return lines
