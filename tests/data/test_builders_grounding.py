"""Grounding builder: box annotations {image, boxes: [{label, bbox}]} -> "Where is the X?" records whose answer holds
the canonical pixel box, with both answer-text formats read back by the eval box parser."""

import json

import pytest
from PIL import Image

from medm.cli import main
from medm.data.builders._common import SourceError
from medm.data.builders.grounding import build_grounding, format_boxes
from medm.eval.metrics import parse_boxes
from medm.eval.protocols import score_grounding

ENTRIES = [
    {"image": "ct_0001.png", "id": "ct_0001",
     "boxes": [{"label": "liver", "bbox": [12, 30, 140, 118]}, {"label": "spleen", "bbox": [150.5, 40, 190, 96]}]},
    {"image": "sub/ct_0002.png", "boxes": [{"label": "kidney", "bbox": [20, 100, 60, 140]},
                                           {"label": "kidney", "bbox": [140, 100, 180, 140]}]},
]


def _src(root, entries=ENTRIES):
    (root / "sub").mkdir(parents=True)
    Image.new("L", (200, 160)).save(root / "ct_0001.png")
    Image.new("L", (200, 160)).save(root / "sub" / "ct_0002.png")
    (root / "boxes.json").write_text(json.dumps(entries))
    return root / "boxes.json"


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_records_hold_canonical_boxes_and_json_text(tmp_path):
    src = _src(tmp_path / "src")
    paths = build_grounding(str(tmp_path / "out"), str(src))
    records = _read(paths["grounding"])
    assert [r["id"] for r in records] == ["ct_0001-liver", "ct_0001-spleen", "sub/ct_0002.png-kidney"]
    liver = records[0]
    assert liver["image"] == ["ct_0001.png"] and liver["image_size"] == [200, 160]
    assert liver["conversations"][0]["value"] == "<image>\nWhere is the liver?"
    assert liver["answer"] == [12, 30, 140, 118] and liver["boxes"] == [[12, 30, 140, 118]]
    assert json.loads(liver["conversations"][1]["value"]) == [{"bbox_2d": [12, 30, 140, 118], "label": "liver"}]
    assert records[1]["answer"] == [150.5, 40, 190, 96]
    # Two boxes of one label: one record, both boxes, in order.
    kidney = records[2]
    assert kidney["answer"] == [[20, 100, 60, 140], [140, 100, 180, 140]]
    assert parse_boxes(kidney["conversations"][1]["value"]) == [(20, 100, 60, 140), (140, 100, 180, 140)]
    # A perfect answer scores IoU 1 with the eval protocol, reading the record's answer and image size.
    rows = [{"prediction": r["conversations"][1]["value"], "answer": r["answer"], "image_size": r["image_size"]}
            for r in records[:2]]
    assert score_grounding(rows)["mean_iou"] == pytest.approx(100.0)
    assert main(["data", "validate", paths["grounding"], "--image-dir", paths["image_dir"]]) == 0


def test_grid1000_text_scales_back_to_pixels(tmp_path):
    src = _src(tmp_path / "src")
    records = _read(build_grounding(str(tmp_path / "out"), str(src), box_format="grid1000",
                                    question="Locate the {label}.")["grounding"])
    liver = records[0]
    assert liver["conversations"][0]["value"] == "<image>\nLocate the liver."
    assert liver["conversations"][1]["value"] == "<box>(60,188),(700,738)</box>"
    x1, y1, x2, y2 = parse_boxes(liver["conversations"][1]["value"], (200, 160))[0]
    assert (x1, y1, x2, y2) == pytest.approx((12, 30.08, 140, 118.08))
    assert format_boxes([[0, 0, 200, 160]], "x", (200, 160), "grid1000") == "<box>(0,0),(1000,1000)</box>"


@pytest.mark.parametrize("bbox,message", [
    ([10, 10, 5, 20], "x1 < x2 and y1 < y2"),
    ([0, 0, 201, 10], "outside the 200x160 image"),
    ([0, 0, 10], "must be 4 pixel numbers"),
])
def test_bad_boxes_name_entry_and_label(tmp_path, bbox, message):
    src = _src(tmp_path / "src", [{"image": "ct_0001.png", "boxes": [{"label": "liver", "bbox": bbox}]}])
    with pytest.raises(SourceError, match=rf"boxes.json, entry 0, box 0 \(liver\): .*{message}"):
        build_grounding(str(tmp_path / "out"), str(src))


def test_missing_image_and_bad_options(tmp_path):
    src = _src(tmp_path / "src", [{"image": "nope.png", "boxes": [{"label": "liver", "bbox": [0, 0, 1, 1]}]}])
    with pytest.raises(FileNotFoundError, match="entry 0: image .*nope.png not found"):
        build_grounding(str(tmp_path / "out"), str(src))
    with pytest.raises(ValueError, match="unknown box format 'xyxy'"):
        build_grounding(str(tmp_path / "out"), str(src), box_format="xyxy")
    with pytest.raises(ValueError, match="must contain {label}"):
        build_grounding(str(tmp_path / "out"), str(src), question="Where is it?")
