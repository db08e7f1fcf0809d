"""MedXpertQA MM (Zuo et al. 2025): expert-level multimodal medical exam questions (5 options), to medm records.

`medm data build medxpertqa --src data/MedXpertQA --out data/medxpertqa [--splits test,dev]`

Source layout (the `TsinghuaC3I/MedXpertQA` release; fields as in its `eval/data/medxpertqa/input/
medxpertqa_mm_input.jsonl`)::

    MedXpertQA/MM/test.jsonl  dev.jsonl
    MedXpertQA/images/MM-0-a.jpeg ...

One JSON object per line: `id` ("MM-0"), `question` (ending in "Answer Choices: (A) ... (E) ..."), `options`
(`{"A": text, ...}`, or the eval input's list of `{"letter", "content"}`), `label` ("A", or `["A"]`), `images`
(file names, or `{"image_path": ...}`; several per question), `medical_task`, `body_system`, `question_type`.

Output: `<split>.json`, ids `medxpertqa-<id>`, every image of a question in `image` (relative to `--src`); the prompt
is MedXpertQA's zero-shot answer-only one ("Q: {question}\\nA: Among A through E, the answer is"), `answer` the
letter, `choice_rule: medxpertqa`.
"""

from __future__ import annotations

import os
from typing import Any

from medm.data.builders._common import SourceError, as_list, check_images, text_field
from medm.data.builders._mc import check_unique, choice_record, write_splits
from medm.data.jsonlist import read_json_list
from medm.registry import BUILDER

RULE = "medxpertqa"
_MAPPED = ("id", "question", "options", "label", "images")


def read_jsonl(path: str) -> list[Any]:
    return read_json_list(path, what="MedXpertQA file", items="questions", error=SourceError)


def convert_row(row: Any, split: str, where: str, image_folder: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise SourceError(f"{where}: expected an object, got {type(row).__name__}")
    raw = row.get("options")
    if isinstance(raw, list):
        raw = {o.get("letter"): o.get("content") for o in raw if isinstance(o, dict)}
    if not isinstance(raw, dict) or len(raw) < 2:
        raise SourceError(f"{where}: field 'options' must map letters to texts, got {row.get('options')!r}")
    options = {str(k): str(v) for k, v in raw.items()}
    label = row.get("label")
    label = label[0] if isinstance(label, list) and len(label) == 1 else label
    if label not in options:
        raise SourceError(f"{where}: field 'label' must be one option letter, got {row.get('label')!r}")
    images = [i.get("image_path") if isinstance(i, dict) else i for i in row.get("images") or []]
    if not all(isinstance(i, str) and i for i in images):
        raise SourceError(f"{where}: field 'images' must list file names, got {row.get('images')!r}")
    fields = {k: v for k, v in row.items() if k not in _MAPPED}
    return choice_record(f"medxpertqa-{text_field(row, 'id', where)}", [os.path.join(image_folder, i) for i in images],
                         text_field(row, "question", where), options, label, RULE, "medxpertqa", split,
                         {**fields, "source_id": row["id"]})


def convert_file(path: str, image_folder: str = "images") -> list[dict[str, Any]]:
    split = os.path.splitext(os.path.basename(path))[0]
    return [convert_row(row, split, f"{path}:{i + 1}", image_folder) for i, row in enumerate(read_jsonl(path))]


@BUILDER.register("medxpertqa")
def build_medxpertqa(out: str, src: str, splits: Any = "test", subset: str = "MM", image_folder: str = "images",
                     check_images_exist: bool = True) -> dict[str, str]:
    """Convert MedXpertQA `src/<subset>/<split>.jsonl` into `out/<split>.json`.

    Args:
        out: output directory (created).
        src: the MedXpertQA folder (`MM/`, `images/`).
        splits: test (default) and / or dev.
        subset: MM (multimodal, default); Text has no images and works the same.
        image_folder: images folder inside `src`.
        check_images_exist: fail, naming the questions, when an image file is missing.
    """
    result = {}
    for s in as_list(splits, "splits"):
        result[str(s)] = convert_file(os.path.join(src, subset, f"{s}.jsonl"), image_folder)
        check_unique(result[str(s)], os.path.join(src, subset, f"{s}.jsonl"))
    image_dir = os.path.abspath(src)
    if check_images_exist:
        for records in result.values():
            check_images(records, image_dir, "MedXpertQA")
    return write_splits(out, result, "MedXpertQA", f"medm data build medxpertqa --src {src} --out {out}", image_dir,
                        by="medical_task")
