"""M3D-Data / M3D-Bench (Bai et al. 2024): 3D CT VQA (closed and open) and 3D captioning, to medm records.

`medm data build m3d-vqa --src M3D/Data/data --out data/m3d_vqa [--vqa-file M3D-VQA/M3D_VQA_test.csv]`
`medm data build m3d-cap --src M3D/Data/data --out data/m3d_cap [--cap-file M3D_Cap_npy/M3D_Cap.json --split test]`

Source layout (as M3D's `Bench/dataset/multi_dataset.py` and `Bench/eval/eval_{vqa,caption}.py` read it, `--src`
being their `data_root`, `./Data/data`)::

    Data/data/M3D-VQA/M3D_VQA_test.csv          (M3D_VQA_train.csv, M3D_VQA_val.csv)
    Data/data/M3D_Cap_npy/M3D_Cap.json          {"train": [...], "validation": [...], "test": [...]}
    Data/data/<volumes>.npy, <reports>.txt      (paths relative to data_root)

M3D-VQA rows: `Image Path` (a `.npy` volume, (1, D, H, W) in [0, 1]), `Text`, `Question Type`, `Question`,
`Choice A` .. `Choice D`, `Answer` (text), `Answer Choice` (letter). Every row becomes a closed record (M3D's prompt
"{Question} Choices: A. .. B. .. C. .. D. ..", `answer` the letter, `choice_rule: m3d`) in `<stem>_closed.json` and
an open record (the question alone, the answer text) in `<stem>_open.json`; ids `m3d-vqa-<stem>-<row>`.
M3D-Cap items: `image` (`.npy`), `text` (path of a `.txt` report, read); the prompt is the first of M3D's caption
templates ("Can you provide a caption consists of findings for this medical image?"; M3D picks one at random).
Volumes go into `image3d`, relative to `--src`.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from medm.data.builders._common import SourceError, check_images, read_json, text_field
from medm.data.builders._mc import choice_record, text_record, write_splits
from medm.registry import BUILDER

CAPTION_PROMPT = "Can you provide a caption consists of findings for this medical image?"
_MAPPED = ("Image Path", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer", "Answer Choice",
           "Question Type")


def convert_vqa_row(row: dict[str, Any], index: int, stem: str, where: str) -> tuple[dict, dict]:
    """(closed record, open record) of one M3D-VQA row."""
    options = {k: text_field(row, f"Choice {k}", where) for k in "ABCD"}
    letter = str(row.get("Answer Choice") or "").strip()
    if letter not in options:
        raise SourceError(f"{where}: field 'Answer Choice' must be A-D, got {row.get('Answer Choice')!r}")
    fields = {k: v for k, v in row.items() if k not in _MAPPED and k is not None}
    fields["question_type"] = str(row.get("Question Type", "")).strip()
    volume, question = text_field(row, "Image Path", where), text_field(row, "Question", where)
    rid = f"m3d-vqa-{stem}-{index}"
    closed = choice_record(rid + "-closed", [volume], question, options, letter, "m3d", "m3d-vqa", stem,
                           {**fields, "answer_type": "CLOSED"}, volume=True)
    opened = text_record(rid + "-open", [volume], question, text_field(row, "Answer", where), "m3d-vqa", stem,
                         {**fields, "answer_type": "OPEN"}, volume=True)
    return closed, opened


def convert_vqa_file(path: str) -> tuple[list[dict], list[dict]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"M3D-VQA file not found: {path}")
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(path, encoding="utf-8", newline="") as f:
        pairs = [convert_vqa_row(row, i, stem, f"{path}, row {i + 2}") for i, row in enumerate(csv.DictReader(f))]
    return [c for c, _ in pairs], [o for _, o in pairs]


@BUILDER.register("m3d-vqa")
def build_m3d_vqa(out: str, src: str, vqa_file: str = "M3D-VQA/M3D_VQA_test.csv",
                  check_images_exist: bool = True) -> dict[str, str]:
    """Convert an M3D-VQA CSV into `out/<stem>_closed.json` and `out/<stem>_open.json`.

    Args:
        out: output directory (created).
        src: M3D's data root (volume paths are relative to it).
        vqa_file: the CSV, relative to `src`.
        check_images_exist: fail, naming the questions, when a volume file is missing.
    """
    closed, opened = convert_vqa_file(os.path.join(src, vqa_file))
    image_dir = os.path.abspath(src)
    if check_images_exist:
        check_images(closed, image_dir, "M3D-VQA", key="image3d")
    stem = os.path.splitext(os.path.basename(vqa_file))[0]
    return write_splits(out, {f"{stem}_closed": closed, f"{stem}_open": opened}, "M3D-VQA",
                        f"medm data build m3d-vqa --src {src} --out {out}", image_dir, by="question_type")


@BUILDER.register("m3d-cap")
def build_m3d_cap(out: str, src: str, cap_file: str = "M3D_Cap_npy/M3D_Cap.json", split: str = "test",
                  check_images_exist: bool = True) -> dict[str, str]:
    """Convert one split of M3D-Cap into `out/<split>.json` (captions read from their `.txt` files).

    Args:
        out: output directory (created).
        src: M3D's data root (volume and text paths are relative to it).
        cap_file: the caption JSON, relative to `src`.
        split: train, validation or test (default).
        check_images_exist: fail, naming the items, when a volume file is missing.
    """
    path = os.path.join(src, cap_file)
    data = read_json(path, "M3D-Cap file")
    if not isinstance(data, dict) or not isinstance(data.get(split), list):
        raise SourceError(f"{path}: expected an object with a {split!r} list")
    records = []
    for i, item in enumerate(data[split]):
        where = f"{path}, {split}[{i}]"
        text_path = os.path.join(src, text_field(item, "text", where))
        if not os.path.isfile(text_path):
            raise FileNotFoundError(f"{where}: report file not found: {text_path}")
        with open(text_path, encoding="utf-8") as f:
            report = f.read().strip()
        records.append(text_record(f"m3d-cap-{split}-{i}", [text_field(item, "image", where)], CAPTION_PROMPT,
                                   report, "m3d-cap", split, {"text_path": item["text"]}, volume=True))
    image_dir = os.path.abspath(src)
    if check_images_exist:
        check_images(records, image_dir, "M3D-Cap", key="image3d")
    return write_splits(out, {split: records}, "M3D-Cap", f"medm data build m3d-cap --src {src} --out {out}",
                        image_dir)
