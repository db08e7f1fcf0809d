"""Grounding boxes: the canonical record form <-> the box convention of each Qwen-VL model.

Records hold boxes in one canonical form: pixel `[x1, y1, x2, y2]` of the original image (x to the right, y down,
from the top-left corner), written in answers as JSON objects `{"bbox_2d": [x1, y1, x2, y2], "label": "liver"}`,
alone or in a list (what `medm data build grounding` writes; its `<box>(x1,y1),(x2,y2)</box>` form on a 0-1000 grid
is read as well). A qwen-vl model's `box_format` (a config field) says how that model writes boxes:

- `tokens1000` (Qwen2-VL): `<|object_ref_start|>liver<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`
  with coordinates on a 0-1000 grid over the image;
- `json_resized` (Qwen2.5-VL): the JSON form, in integer pixels of the resized image the vision tower sees
  (`smart_resize` of the processor, see `medm.qwenvl.data.ImageGeometry`);
- `json1000` (Qwen3-VL): the JSON form on a 0-1000 grid.

`to_model` rewrites a training answer into the model's form; `from_model` rewrites a model's answer back into
canonical JSON in original-image pixels, which `medm.eval.metrics.parse_boxes` scores. A round trip moves a corner
by at most half a unit of the model's grid (half a resized pixel, or half a 1/1000 of the image side).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from medm.qwenvl.args import BOX_FORMATS

Size = tuple[int, int]  # (width, height) in pixels

_NUM = r"[-+]?\d+(?:\.\d+)?"
_PAIRS = rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)"
_GRID_BOX = re.compile(rf"<box>\s*{_PAIRS}\s*</box>")
_BBOX_2D = re.compile(rf"([\"']bbox_2d[\"']\s*:\s*\[)\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*(\])")
_TOKEN_BOX = re.compile(rf"<\|box_start\|>\s*{_PAIRS}\s*<\|box_end\|>")
# A referring expression with its boxes: <|object_ref_start|>label<|object_ref_end|><|box_start|>...<|box_end|>...
_TOKEN_REF = re.compile(r"(?:<\|object_ref_start\|>(.*?)<\|object_ref_end\|>\s*)?"
                        rf"(<\|box_start\|>\s*{_PAIRS}\s*<\|box_end\|>(?:\s*<\|box_start\|>\s*{_PAIRS}\s*<\|box_end\|>)*)",
                        re.S)


def check_format(box_format: str) -> str:
    if box_format not in BOX_FORMATS:
        raise ValueError(f"unknown box_format {box_format!r}; known: {', '.join(BOX_FORMATS)}")
    return box_format


def _number(v: float) -> int | float:
    v = round(float(v), 2)
    return int(v) if v.is_integer() else v


def _scale(box_format: str, original: Size, resized: Size | None) -> tuple[float, float]:
    """Model units per original pixel, along x and y."""
    if box_format == "json_resized":
        if resized is None:
            raise ValueError("box_format json_resized needs the resized image size")
        return resized[0] / original[0], resized[1] / original[1]
    return 1000 / original[0], 1000 / original[1]


def box_to_model(box: Sequence[float], box_format: str, original: Size, resized: Size | None = None) -> list[int]:
    """A canonical pixel box of the original image -> integer coordinates in the model's convention."""
    sx, sy = _scale(check_format(box_format), original, resized)
    x1, y1, x2, y2 = (float(v) for v in box)
    return [round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)]


def box_from_model(box: Sequence[float], box_format: str, original: Size,
                   resized: Size | None = None) -> list[int | float]:
    """Coordinates in the model's convention -> a canonical pixel box of the original image (2 decimals)."""
    sx, sy = _scale(check_format(box_format), original, resized)
    x1, y1, x2, y2 = (float(v) for v in box)
    return [_number(x1 / sx), _number(y1 / sy), _number(x2 / sx), _number(y2 / sy)]


# ---- canonical -> model ----------------------------------------------------------------------------------------
def _is_box_object(v: Any) -> bool:
    box = v.get("bbox_2d") if isinstance(v, dict) else None
    return (isinstance(box, list) and len(box) == 4
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in box))


def _json_boxes(text: str) -> Iterator[tuple[int, int, list[dict]]]:
    """(start, end, box objects) for each JSON value in `text` that is a box object or a list of them."""
    decoder = json.JSONDecoder()
    i = 0
    while i < len(text):
        if text[i] in "[{":
            try:
                value, end = decoder.raw_decode(text, i)
            except ValueError:
                value, end = None, i + 1
            objects = [value] if _is_box_object(value) else value if (
                isinstance(value, list) and value and all(_is_box_object(v) for v in value)) else None
            if objects is not None:
                yield i, end, objects
                i = end
                continue
        i += 1


def has_boxes(text: str) -> bool:
    """True when `text` holds a canonical box (JSON `bbox_2d` object or `<box>` tag)."""
    return bool(_GRID_BOX.search(text)) or next(_json_boxes(text), None) is not None


def _render(objects: list[dict], box_format: str, original: Size, resized: Size | None, single: bool = False) -> str:
    """Box objects in the model's form; `single`: one JSON object rather than a list (JSON forms)."""
    if box_format == "tokens1000":
        parts = []
        for obj in objects:
            x1, y1, x2, y2 = box_to_model(obj["bbox_2d"], box_format, original, resized)
            ref = f"<|object_ref_start|>{obj['label']}<|object_ref_end|>" if obj.get("label") else ""
            parts.append(f"{ref}<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>")
        return "".join(parts)
    out = [{**obj, "bbox_2d": box_to_model(obj["bbox_2d"], box_format, original, resized)} for obj in objects]
    return json.dumps(out[0] if single else out, ensure_ascii=False)


def to_model(text: str, box_format: str, original: Size, resized: Size | None = None) -> str:
    """Rewrite every canonical box in an answer into the model's convention; other text stays as written.

    Args:
        text: an answer holding canonical boxes (JSON `bbox_2d` objects in original pixels, or `<box>` 0-1000 tags).
        box_format: the model's convention (`tokens1000`, `json_resized`, `json1000`).
        original: (width, height) of the image as stored; resized: (width, height) the vision tower sees.
    """
    check_format(box_format)
    out, last = [], 0
    for start, end, objects in _json_boxes(text):
        out.append(text[last:start])
        out.append(_render(objects, box_format, original, resized, single=text[start] == "{"))
        last = end
    out.append(text[last:])
    text = "".join(out)
    w, h = original

    def grid_box(m: re.Match) -> str:
        pixels = [float(m.group(1)) * w / 1000, float(m.group(2)) * h / 1000,
                  float(m.group(3)) * w / 1000, float(m.group(4)) * h / 1000]
        return _render([{"bbox_2d": pixels}], box_format, original, resized, single=True)

    return _GRID_BOX.sub(grid_box, text)


# ---- model -> canonical ----------------------------------------------------------------------------------------
def from_model(text: str, box_format: str, original: Size, resized: Size | None = None) -> str:
    """Rewrite the boxes of a model's answer into canonical JSON in original-image pixels.

    `tokens1000` spans become `{"bbox_2d": [...], "label": ...}` objects (an answer made only of spans becomes one
    JSON list); JSON `bbox_2d` arrays are rescaled where they stand, so a truncated JSON answer keeps its boxes.
    """
    check_format(box_format)
    if box_format != "tokens1000":
        def rescale(m: re.Match) -> str:
            box = box_from_model([float(m.group(i)) for i in range(2, 6)], box_format, original, resized)
            return m.group(1) + ", ".join(str(v) for v in box) + m.group(6)

        return _BBOX_2D.sub(rescale, text)
    matches = list(_TOKEN_REF.finditer(text))
    if not matches:
        return text

    def objects(m: re.Match) -> list[dict]:
        label = m.group(1)
        found = []
        for b in _TOKEN_BOX.finditer(m.group(2)):
            obj: dict[str, Any] = {"bbox_2d": box_from_model([float(b.group(i)) for i in range(1, 5)], box_format,
                                                             original, resized)}
            if label:
                obj["label"] = label.strip()
            found.append(obj)
        return found

    if not _TOKEN_REF.sub("", text).strip(" \n,;."):
        return json.dumps([o for m in matches for o in objects(m)], ensure_ascii=False)
    return _TOKEN_REF.sub(lambda m: json.dumps(objects(m), ensure_ascii=False), text)
