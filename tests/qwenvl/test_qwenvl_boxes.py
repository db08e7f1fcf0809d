"""Grounding boxes: canonical pixel boxes <-> each Qwen-VL convention, round trips, and eval reads the result."""

import json

import pytest
from qwenvl_helpers import build_tiny

from medm.eval.metrics import parse_boxes
from medm.qwenvl.boxes import box_from_model, box_to_model, from_model, has_boxes, to_model
from medm.qwenvl.data import QwenVLInputs

CANONICAL = json.dumps([{"bbox_2d": [12, 30, 140, 118], "label": "liver"},
                        {"bbox_2d": [150, 40, 190, 96], "label": "spleen"}])
ORIGINAL, RESIZED = (256, 200), (252, 196)


def test_qwen2_vl_tokens_on_the_1000_grid_with_the_label_span():
    text = to_model(CANONICAL, "tokens1000", ORIGINAL)
    assert text == ("<|object_ref_start|>liver<|object_ref_end|><|box_start|>(47,150),(547,590)<|box_end|>"
                    "<|object_ref_start|>spleen<|object_ref_end|><|box_start|>(586,200),(742,480)<|box_end|>")
    back = json.loads(from_model(text, "tokens1000", ORIGINAL))
    assert [o["label"] for o in back] == ["liver", "spleen"]
    for got, want in zip(back, json.loads(CANONICAL)):
        # One grid step is 256 / 1000 px wide: a round trip moves a corner by at most half of it.
        assert all(abs(g - w) <= 0.5 * 256 / 1000 + 1e-9 for g, w in zip(got["bbox_2d"], want["bbox_2d"]))


def test_qwen2_5_vl_json_in_pixels_of_the_resized_image():
    text = to_model(CANONICAL, "json_resized", ORIGINAL, RESIZED)
    objs = json.loads(text)
    assert objs == [{"bbox_2d": [12, 29, 138, 116], "label": "liver"},
                    {"bbox_2d": [148, 39, 187, 94], "label": "spleen"}]
    back = json.loads(from_model(text, "json_resized", ORIGINAL, RESIZED))
    for got, want in zip(back, json.loads(CANONICAL)):
        assert all(abs(g - w) <= 0.5 * 256 / 252 + 1e-9 for g, w in zip(got["bbox_2d"], want["bbox_2d"]))


@pytest.mark.parametrize("size", [(64, 64), (100, 60), (20, 10), (1000, 700)])
def test_round_trip_through_the_processor_geometry(size):
    """Boxes on images the processor upscales (20x10) or shrinks (1000x700) come back within one resized pixel."""
    _, processor = build_tiny("qwen2_5_vl")
    g = QwenVLInputs(processor, "json_resized").geometry(size)
    # Multiples of patch 14 x merge 2, area within the tiny preset's [56x56, 112x112].
    assert g.resized[0] % 28 == 0 and g.resized[1] % 28 == 0 and 56 * 56 <= g.resized[0] * g.resized[1] <= 112 * 112
    w, h = size
    box = [w * 0.1, h * 0.2, w * 0.7, h * 0.9]
    model_box = box_to_model(box, "json_resized", g.original, g.resized)
    assert all(0 <= v <= s for v, s in zip(model_box, g.resized * 2))
    back = box_from_model(model_box, "json_resized", g.original, g.resized)
    tol = (0.5 * w / g.resized[0], 0.5 * h / g.resized[1])
    assert all(abs(a - b) <= tol[i % 2] + 0.01 for i, (a, b) in enumerate(zip(back, box)))


def test_exact_when_the_grid_matches_the_image():
    assert box_from_model(box_to_model([10, 20, 300, 400], "tokens1000", (1000, 1000)), "tokens1000",
                          (1000, 1000)) == [10, 20, 300, 400]
    assert box_from_model(box_to_model([10, 20, 30, 40], "json_resized", (56, 56), (56, 56)), "json_resized",
                          (56, 56), (56, 56)) == [10, 20, 30, 40]
    assert box_to_model([0, 0, 500, 500], "json1000", (500, 250)) == [0, 0, 1000, 2000]


def test_single_object_and_grid_tags_and_surrounding_text():
    one = to_model('The lesion: {"bbox_2d": [10, 10, 30, 30], "label": "lesion"}.', "json_resized", (64, 64), (56, 56))
    assert one == 'The lesion: {"bbox_2d": [9, 9, 26, 26], "label": "lesion"}.'
    tag = to_model("Here: <box>(100,200),(300,400)</box>", "tokens1000", (256, 256))
    assert tag == "Here: <|box_start|>(100,200),(300,400)<|box_end|>"
    assert not has_boxes("A scan with no lesion.") and has_boxes(CANONICAL)


def test_model_answers_parse_back_for_eval():
    """What the Predictor returns is canonical pixel JSON that medm eval's parse_boxes reads as pixels."""
    qwen2 = "<|object_ref_start|>lesion<|object_ref_end|><|box_start|>(250,500),(500,750)<|box_end|>"
    assert parse_boxes(from_model(qwen2, "tokens1000", (64, 32))) == [(16.0, 16.0, 32.0, 24.0)]
    # A truncated Qwen2.5-VL answer still gives its boxes, rescaled from the 56x56 image to the 64x64 original.
    truncated = '```json\n[{"bbox_2d": [14, 14, 28, 42], "label": "les'
    assert parse_boxes(from_model(truncated, "json_resized", (64, 64), (56, 56))) == [(16.0, 16.0, 32.0, 48.0)]
    assert from_model("no box here", "tokens1000", (64, 64)) == "no box here"


def test_unknown_format_is_named():
    with pytest.raises(ValueError, match="unknown box_format 'xyxy'"):
        to_model(CANONICAL, "xyxy", ORIGINAL)
    with pytest.raises(ValueError, match="needs the resized image size"):
        box_to_model([1, 2, 3, 4], "json_resized", ORIGINAL)
