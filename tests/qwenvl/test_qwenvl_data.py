"""Records -> Qwen-VL inputs: exact assistant-only labels, vision spans sized by the image, boxes, collation."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from qwenvl_helpers import build_tiny

from medm.data._bad_samples import TooManyBadSamples, bad_sample_count
from medm.data.annotations import load_records, parse_record
from medm.data.templates import IGNORE_INDEX, TemplateError
from medm.qwenvl.data import QwenVLDataset, QwenVLInputs, expand_images


@pytest.fixture(scope="module")
def qwen25():
    return build_tiny("qwen2_5_vl")


@pytest.fixture(scope="module")
def qwen2():
    return build_tiny("qwen2_vl")


def _image(path, size, level=120):
    Image.fromarray(np.full((size[1], size[0]), level, dtype=np.uint8)).save(path)
    return path.name


def _record(rid, image, turns):
    conv = []
    for q, a in turns:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return parse_record({"id": rid, "image": [image] if image else [], "conversations": conv}, rid, for_training=True)


def _supervised_runs(item):
    """Consecutive runs of supervised label ids."""
    runs, cur = [], []
    for lab in item["labels"].tolist():
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(lab)
    return runs + ([cur] if cur else [])


def test_labels_are_exactly_the_assistant_turns(qwen25, tmp_path):
    _, processor = qwen25
    name = _image(tmp_path / "a.png", (64, 64))
    rec = _record("two-turns", name, [("<image>\nIs there a lesion?", "yes"), ("How many lesions are there?", "2")])
    ds = QwenVLDataset([rec], processor, box_format="json_resized", image_dir=str(tmp_path))
    item = ds[0]
    tok = processor.tokenizer
    assert [tok.decode(r) for r in _supervised_runs(item)] == ["yes<|im_end|>", "2<|im_end|>"]
    ids = item["input_ids"]
    # The labels equal the ids where supervised; the vision span holds one pad per LLM token of the 56x56 image.
    sup = item["labels"] != IGNORE_INDEX
    assert torch.equal(item["labels"][sup], ids[sup])
    text = tok.decode(ids)
    assert "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>\nIs there a lesion?" in text
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert item["image_grid_thw"].tolist() == [[1, 4, 4]] and item["pixel_values"].shape == (16, 3 * 2 * 14 * 14)
    assert ds.lengths == [len(ids)] and ds.modalities == ["image"]


def test_sharegpt_records_and_system_prompt(qwen25, tmp_path):
    _, processor = qwen25
    name = _image(tmp_path / "b.png", (64, 64))
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>Where is the lesion?"},
                                              {"role": "assistant", "content": "upper left"}],
                                 "images": [name]}]))
    ds = QwenVLDataset(load_records(str(path)), processor, box_format="json_resized", image_dir=str(tmp_path),
                       system_prompt="Answer briefly.")
    text = processor.tokenizer.decode(ds[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    assert [processor.tokenizer.decode(r) for r in _supervised_runs(ds[0])] == ["upper left<|im_end|>"]


@pytest.mark.parametrize("model_type,expected", [
    ("qwen2_vl", "<|object_ref_start|>lesion<|object_ref_end|><|box_start|>(250,500),(500,750)<|box_end|><|im_end|>"),
    ("qwen2_5_vl", '[{"bbox_2d": [14, 28, 28, 42], "label": "lesion"}]<|im_end|>'),
])
def test_canonical_boxes_become_the_model_convention(model_type, expected, qwen2, qwen25, tmp_path):
    """A 64x64 image is seen at 56x56: Qwen2-VL gets the 0-1000 grid, Qwen2.5-VL pixels of the 56x56 image."""
    _, processor = qwen2 if model_type == "qwen2_vl" else qwen25
    name = _image(tmp_path / "c.png", (64, 64))
    answer = json.dumps([{"bbox_2d": [16, 32, 32, 48], "label": "lesion"}])
    rec = _record("box-1", name, [("<image>\nWhere is the lesion?", answer)])
    box_format = "tokens1000" if model_type == "qwen2_vl" else "json_resized"
    ds = QwenVLDataset([rec], processor, box_format=box_format, image_dir=str(tmp_path))
    assert [processor.tokenizer.decode(r) for r in _supervised_runs(ds[0])] == [expected]


def test_pixel_bounds_and_tiny_images(qwen25, tmp_path):
    _, processor = qwen25
    inputs = QwenVLInputs(processor, "json_resized")
    assert inputs.geometry((64, 64)).num_tokens == 4  # min_pixels 56x56
    assert inputs.geometry((400, 300)).num_tokens <= 16  # max_pixels 112x112
    tiny = inputs.geometry((10, 20))  # below one 28 px merged patch: upscaled first
    assert tiny.resized[0] >= 28 and tiny.resized[1] >= 28
    names = [_image(tmp_path / "t.png", (10, 20)), _image(tmp_path / "w.png", (200, 60))]
    recs = [_record(f"r{i}", n, [("<image>\nIs there a lesion?", "no")]) for i, n in enumerate(names)]
    ds = QwenVLDataset(recs, processor, box_format="json_resized", image_dir=str(tmp_path))
    for i in range(2):
        item = ds[i]
        t, gh, gw = item["image_grid_thw"][0].tolist()
        assert item["pixel_values"].shape[0] == t * gh * gw
        assert int((item["input_ids"] == inputs.image_pad_id).sum()) == gh * gw // 4
    _, bigger = build_tiny("qwen2_5_vl", min_pixels=112 * 112)
    assert QwenVLInputs(bigger, "json_resized").geometry((64, 64)).num_tokens == 16


def test_collator_pads_and_concatenates_images_of_different_sizes(qwen2, tmp_path):
    model, processor = qwen2
    names = [_image(tmp_path / "s.png", (64, 64)), _image(tmp_path / "l.png", (120, 90), level=200)]
    recs = [_record("small", names[0], [("<image>\nIs there a lesion?", "yes")]),
            _record("large", names[1], [("<image>\nHow large is the lesion?", "large")]),
            _record("text", None, [("Is this text only?", "yes")])]
    ds = QwenVLDataset(recs, processor, box_format="tokens1000", image_dir=str(tmp_path))
    items = [ds[i] for i in range(3)]
    batch = ds.collator()(items)
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    T = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == batch["mm_token_type_ids"].shape == batch["labels"].shape == (3, T)
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == pad_id)
    assert torch.equal(batch["image_grid_thw"], torch.cat([items[0]["image_grid_thw"], items[1]["image_grid_thw"]]))
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
    assert (batch["labels"][2, len(items[2]["input_ids"]):] == IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(it["input_ids"]) for it in items]
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)


def test_truncation_never_cuts_an_image(qwen25, tmp_path):
    ids, labels, kept = expand_images([1, 9, 2, 9, 3], [-100, -100, 5, -100, 6], pad_id=9, counts=[3, 4],
                                      max_length=6)
    assert ids == [1, 9, 9, 9, 2] and labels == [-100, -100, -100, -100, 5] and kept == 1
    _, processor = qwen25
    names = [_image(tmp_path / "1.png", (64, 64)), _image(tmp_path / "2.png", (64, 64))]
    rec = parse_record({"id": "two-images", "image": names, "conversations": [
        {"from": "human", "value": "<image>\nIs there a lesion?"}, {"from": "gpt", "value": "yes"},
        {"from": "human", "value": "<image>\nAnd here?"}, {"from": "gpt", "value": "no"}]}, "x")
    full = QwenVLDataset([rec], processor, box_format="json_resized", image_dir=str(tmp_path))
    n = full.lengths[0]
    second = full[0]["input_ids"].tolist().index(processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"), 30)
    # Room up to the middle of the second image's run: it is dropped whole, the first answer stays.
    cut = QwenVLDataset([rec], processor, box_format="json_resized", image_dir=str(tmp_path),
                        max_length=second + 3)
    item = cut[0]
    assert cut.lengths[0] == second + 1 < n
    assert item["image_grid_thw"].tolist() == [[1, 4, 4]] and item["pixel_values"].shape[0] == 16
    assert [processor.tokenizer.decode(r) for r in _supervised_runs(item)] == ["yes<|im_end|>"]


def test_template_mismatch_and_bad_records_name_the_record(tmp_path):
    _, processor = build_tiny("qwen2_5_vl")
    name = _image(tmp_path / "d.png", (64, 64))
    # A template that renders answers upper-cased: the labels would not be the answer, so encoding refuses.
    processor.chat_template = processor.chat_template.replace(
        "{% if message['content'] is string %}{{ message['content'] }}",
        "{% if message['content'] is string %}{{ message['content'] | upper }}")
    with pytest.raises(TemplateError, match=r"record 'bad-1': assistant turn \d+ renders as 'YES'"):
        QwenVLDataset([_record("bad-1", name, [("<image>\nIs there a lesion?", "yes")])], processor,
                      box_format="json_resized", image_dir=str(tmp_path))
    _, processor = build_tiny("qwen2_5_vl")
    box = json.dumps({"bbox_2d": [1, 2, 3, 4], "label": "x"})
    with pytest.raises(TemplateError, match=r"record 'no-image': assistant turn holds boxes but the record has no"):
        QwenVLDataset([_record("no-image", None, [("Where?", box)])], processor, box_format="json_resized")
    vol = parse_record({"id": "vol", "image3d": ["ct.nii.gz"], "conversations": [
        {"from": "human", "value": "<image3d>\nWhat?"}, {"from": "gpt", "value": "x"}]}, "vol")
    with pytest.raises(ValueError, match="record 'vol' has 3D volumes"):
        QwenVLDataset([vol], processor, box_format="json_resized")
    # With no bad sample allowed, an unreadable image stops the build, naming the record and the file.
    with pytest.raises(TooManyBadSamples, match=r"record 'gone': cannot load image .*missing.png"):
        QwenVLDataset([_record("gone", "missing.png", [("<image>\nQ?", "a")])], processor,
                      box_format="json_resized", image_dir=str(tmp_path), max_bad_samples=0)
    thin = _image(tmp_path / "thin.png", (1, 250))
    with pytest.raises(TooManyBadSamples, match=r"record 'thin': .*thin.png.*1x250 pixels: .*aspect ratios above 200"):
        QwenVLDataset([_record("thin", thin, [("<image>\nQ?", "a")])], processor,
                      box_format="json_resized", image_dir=str(tmp_path), max_bad_samples=0)


def test_unreadable_images_are_bad_samples_counted_and_replaced(qwen25, tmp_path, caplog):
    _, processor = qwen25
    q = [("<image>\nIs there a lesion?", "no")]
    recs = [_record("gone", "missing.png", q), _record("ok", _image(tmp_path / "ok.png", (64, 64)), q),
            _record("spoilt", _image(tmp_path / "spoilt.png", (64, 64), level=30), q),
            _record("ok2", _image(tmp_path / "ok2.png", (64, 64), level=200), q),
            _record("text", None, [("Hello?", "hi")])]
    with caplog.at_level(logging.WARNING, logger="medm.qwenvl.data"):
        ds = QwenVLDataset(recs, processor, box_format="json_resized", image_dir=str(tmp_path))
    # Found while building: kept as a known bad sample, logged with the record and the file, counted.
    assert "skipping sample 'gone': cannot load image" in caplog.text and "missing.png" in caplog.text
    assert len(ds) == 5 and ds.bad_samples.count == 1 and bad_sample_count(ds) == 1
    assert ds.modalities == ["image", "image", "image", "image", "text"]
    first, ok = ds[0], ds[1]  # the next good sample with an image stands in
    assert torch.equal(first["input_ids"], ok["input_ids"]) and torch.equal(first["pixel_values"], ok["pixel_values"])
    # Found while training: the file went bad after the dataset was built (the header stays readable).
    spoilt = tmp_path / "spoilt.png"
    spoilt.write_bytes(spoilt.read_bytes()[:40] + bytes(200))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medm.qwenvl.data"):
        item = ds[2]
    assert "skipping sample 'spoilt'" in caplog.text and "spoilt.png" in caplog.text
    assert torch.equal(item["pixel_values"], ds[3]["pixel_values"]) and ds.bad_samples.count == 2
    assert not torch.equal(item["pixel_values"], ok["pixel_values"])  # ok2 (the next one), not ok
    assert ds[4]["pixel_values"] is None and ds.bad_samples.count == 2
    with pytest.raises(TooManyBadSamples, match="2 of 5 samples failed to load"):
        QwenVLDataset(recs, processor, box_format="json_resized", image_dir=str(tmp_path), max_bad_samples=1)[2]


def test_records_with_no_answer_within_max_length_are_dropped_by_name(qwen25, tmp_path, caplog):
    # The Qwen-VL dataset reports dropped records as the conversation dataset does (one shared EncodingLog).
    _, processor = qwen25
    recs = [_record("short", None, [("Hi?", "yes")]), _record("long", None, [("word " * 60, "no")])]
    with caplog.at_level(logging.WARNING, logger="medm.qwenvl.data"):
        ds = QwenVLDataset(recs, processor, box_format="json_resized", max_length=40)
    assert len(ds) == 1 and ds.num_dropped == 1 and ds.samples[0].record.id == "short"
    assert "dropped 1 of 2 record(s)" in caplog.text and "max_length=40" in caplog.text and "'long'" in caplog.text
