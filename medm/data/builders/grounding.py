"""Grounding records ("Where is the liver?" -> its box) from box annotations in canonical pixel form.

`medm data build grounding --src boxes.json --out data/grounding [--box-format json|grid1000]`

Source: a JSON list with one entry per image::

    [{"image": "ct_0001.png", "boxes": [{"label": "liver", "bbox": [12, 30, 140, 118]},
                                        {"label": "spleen", "bbox": [150, 40, 190, 96]}],
      "id": "ct_0001"},                       # optional; default: the image path
     ...]

`bbox` is the canonical box: pixel `[x1, y1, x2, y2]` of the image as stored, x to the right and y down from the
top-left corner, x1 < x2 and y1 < y2, inside the image (checked against its size, read from the file header).
Image paths are relative to `--image-folder` (default: the folder of `--src`).

One record per (image, label), all boxes of that label in the answer::

    {"id": "ct_0001-liver", "image": ["ct_0001.png"],
     "conversations": [{"from": "human", "value": "<image>\\nWhere is the liver?"},
                       {"from": "gpt", "value": "[{\\"bbox_2d\\": [12, 30, 140, 118], \\"label\\": \\"liver\\"}]"}],
     "answer": [12, 30, 140, 118], "boxes": [[12, 30, 140, 118]], "label": "liver", "image_size": [256, 256],
     "task": "grounding", ...}

`answer` holds the canonical box, whatever the text: `[x1, y1, x2, y2]` in pixels when the label has one box in
the image (what the `grounding` eval task scores), a list of such boxes when it has several (two kidneys labelled
"kidney"); `boxes` is always the list. The model kinds render boxes their own way, and scoring reads them with
`image_size` ([width, height]). The gpt text is `--box-format`:

- `json` (default): `[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]` in pixels (the Qwen2.5-VL answer format);
- `grid1000`: `<box>(x1,y1),(x2,y2)</box>` per box, coordinates on a 0-1000 grid over the image (Qwen-VL /
  MedM-VL), rounded to integers.

Both are read back by `medm.eval.metrics.parse_boxes`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from PIL import Image

from medm.data.annotations import IMAGE_TOKEN, write_json_records
from medm.data.builders._common import (
    SourceError,
    image_dir_note,
    markdown_table,
    read_json_list,
    text_field,
    write_readme,
)
from medm.registry import BUILDER

BOX_FORMATS = ("json", "grid1000")
DEFAULT_QUESTION = "Where is the {label}?"


def _number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def check_box(bbox: Any, image_size: tuple[int, int] | None, where: str) -> list[int | float]:
    """A canonical pixel box `[x1, y1, x2, y2]`, checked (4 numbers, x1 < x2, y1 < y2, inside the image)."""
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise SourceError(f"{where}: bbox must be 4 pixel numbers [x1, y1, x2, y2], got {bbox!r}")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if not (x1 < x2 and y1 < y2):
        raise SourceError(f"{where}: bbox {list(bbox)} must have x1 < x2 and y1 < y2 (pixel [x1, y1, x2, y2])")
    if image_size is not None:
        w, h = image_size
        if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
            raise SourceError(f"{where}: bbox {list(bbox)} lies outside the {w}x{h} image")
    return [_number(v) for v in (x1, y1, x2, y2)]


def format_boxes(boxes: Sequence[Sequence[float]], label: str, image_size: tuple[int, int],
                 box_format: str = "json") -> str:
    """Answer text for canonical pixel boxes (see the module docstring for the formats)."""
    if box_format == "json":
        return json.dumps([{"bbox_2d": [_number(v) for v in b], "label": label} for b in boxes])
    if box_format == "grid1000":
        w, h = image_size
        grid = [(round(b[0] * 1000 / w), round(b[1] * 1000 / h), round(b[2] * 1000 / w), round(b[3] * 1000 / h))
                for b in boxes]
        return " ".join(f"<box>({x1},{y1}),({x2},{y2})</box>" for x1, y1, x2, y2 in grid)
    raise ValueError(f"unknown box format {box_format!r}; known: {', '.join(BOX_FORMATS)}")


def image_size_of(path: str, where: str) -> tuple[int, int]:
    """(width, height) from the image header; FileNotFoundError / SourceError name the entry."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image {path} not found")
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise SourceError(f"{where}: cannot read image {path}: {e}") from None


@BUILDER.register("grounding")
def build_grounding(out: str, src: str, image_folder: str | None = None, box_format: str = "json",
                    question: str = DEFAULT_QUESTION, output_name: str = "grounding") -> dict[str, str]:
    """Convert box annotations (`src`, a JSON list) into `out/{output_name}.json` grounding records.

    Args:
        out: output directory (created).
        src: the annotation JSON (layout in the module docstring).
        image_folder: base folder of the image paths; default the folder of `src`.
        box_format: gpt-turn text of the boxes: "json" (pixel `bbox_2d`) or "grid1000" (`<box>` on 0-1000).
        question: question template; `{label}` is replaced by the label.
        output_name: stem of the written file.

    Returns:
        Written paths by role ("grounding" or `output_name`, "readme") and "image_dir".
    """
    if box_format not in BOX_FORMATS:
        raise ValueError(f"unknown box format {box_format!r}; known: {', '.join(BOX_FORMATS)}")
    if "{label}" not in question:
        raise ValueError(f"--question must contain {{label}}, got {question!r}")
    image_dir = os.path.abspath(image_folder if image_folder is not None else os.path.dirname(os.path.abspath(src)))
    records, seen, labels = [], set(), Counter()
    for i, entry in enumerate(read_json_list(src, "grounding annotation file")):
        where = f"{src}, entry {i}"
        if not isinstance(entry, dict):
            raise SourceError(f"{where}: expected an object with image and boxes, got {type(entry).__name__}")
        image = text_field(entry, "image", where)
        key = str(entry.get("id", image))
        size = image_size_of(os.path.join(image_dir, image), where)
        boxes = entry.get("boxes")
        if not isinstance(boxes, list) or not boxes:
            raise SourceError(f"{where}: field 'boxes' must be a non-empty list of {{label, bbox}}, got {boxes!r}")
        by_label: dict[str, list[list[int | float]]] = {}
        for j, box in enumerate(boxes):
            at = f"{where}, box {j}"
            if not isinstance(box, dict):
                raise SourceError(f"{at}: expected {{label, bbox}}, got {box!r}")
            label = text_field(box, "label", at)
            by_label.setdefault(label, []).append(check_box(box.get("bbox"), size, f"{at} ({label})"))
        for label, label_boxes in by_label.items():
            rid = f"{key}-{label}".replace(" ", "_")
            if rid in seen:
                raise SourceError(f"{where}: record id {rid!r} repeats an earlier entry (ids must be unique)")
            seen.add(rid)
            q = question.format(label=label)
            records.append({
                "id": rid, "image": [image],
                "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{q}"},
                                  {"from": "gpt", "value": format_boxes(label_boxes, label, size, box_format)}],
                "answer": label_boxes[0] if len(label_boxes) == 1 else label_boxes, "boxes": label_boxes,
                "question": q, "label": label, "image_size": list(size),
                "box_format": box_format, "task": "grounding", "data_source": "grounding",
            })
            labels[label] += 1
    os.makedirs(out, exist_ok=True)
    paths = {output_name: os.path.join(out, f"{output_name}.json")}
    write_json_records(paths[output_name], records)
    lines = ["# Grounding (medm records)", "",
             f"Built by `medm data build grounding --src {src} --out {out} --box-format {box_format}`: "
             f"{len(records)} record(s) from {len({r['image'][0] for r in records})} image(s). `answer` holds the "
             "pixel [x1, y1, x2, y2] box (a list of them for a label with several); `image_size` is [width, height].",
             "", image_dir_note(image_dir), ""]
    lines += markdown_table(("label", "records"), sorted(labels.items()))
    paths["readme"] = write_readme(os.path.join(out, "README.md"), lines)
    paths["image_dir"] = image_dir
    return paths
