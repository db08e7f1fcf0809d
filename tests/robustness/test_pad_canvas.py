"""`vision.resize: pad` and extreme aspect ratios (issue 26 item 4): padding a 20000x1 image to a square would make
a 400-megapixel canvas (200000x1: 40 gigapixels, a kill by the kernel). The padded canvas is checked against the
pixel limit, so such an image is a bad sample (skipped, counted, named), and a MemoryError while loading one sample
is a bad sample too, never the end of the run."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from medm.data.dataset import ConversationDataset
from medm.data.images import DEFAULT_MAX_PIXELS
from medm.models.vision._base import ImagePreprocess

PAD = ImagePreprocess((16, 16), (0.5,), (0.5,), resize="pad")


def _records(tmp_path, names):
    recs = []
    for i, name in enumerate(names):
        recs.append({"id": f"r{i}", "image": [name], "conversations": [
            {"from": "human", "value": "<image>\nIs it bright?"}, {"from": "gpt", "value": "yes"}]})
    from medm.data.annotations import load_records

    path = tmp_path / "train.json"
    path.write_text(json.dumps(recs))
    return load_records(str(path), for_training=True)


def _dataset(tiny_model, tmp_path, names, preprocess=PAD):
    model, tok = tiny_model
    return ConversationDataset(_records(tmp_path, names), tok, num_image_tokens=model.num_image_tokens,
                               image_preprocess=preprocess, image_dir=str(tmp_path), max_length=256)


def test_a_sliver_image_is_a_bad_sample_with_pad_resize(tiny_model, tmp_path, caplog):
    # 20000 x 1 = 20,000 pixels: far below the limit as stored, 400,000,000 once padded to a square.
    Image.fromarray(np.full((1, 20000), 200, np.uint8)).save(tmp_path / "sliver.png")
    Image.fromarray(np.full((24, 32), 200, np.uint8)).save(tmp_path / "ok.png")
    ds = _dataset(tiny_model, tmp_path, ["sliver.png", "ok.png"])
    with caplog.at_level(logging.WARNING, logger="medm.data.dataset"):
        item = ds[0]
    assert ds.bad_samples.count == 1
    assert item["pixel_values"].shape == (1, 1, 16, 16)  # sample r1 stands in
    assert "skipping sample 'r0'" in caplog.text and "sliver.png" in caplog.text
    assert "20000x20000" in caplog.text and f"{DEFAULT_MAX_PIXELS:,}" in caplog.text


def test_the_padded_canvas_is_checked_before_it_is_made():
    with pytest.raises(ValueError, match=r"padding this 20000x1 image to a square.*20000x20000"):
        PAD(Image.new("L", (20000, 1)))
    # squash mode makes no canvas: the same image is fine there
    assert ImagePreprocess((16, 16), (0.5,), (0.5,))(Image.new("L", (200000, 1))).shape == (1, 16, 16)
    # an ordinary image pads as before
    assert PAD(Image.new("L", (30, 20), 255)).shape == (1, 16, 16)


def test_memory_error_loading_one_sample_is_a_bad_sample(tiny_model, tmp_path, caplog):
    Image.fromarray(np.full((40, 50), 200, np.uint8)).save(tmp_path / "huge.png")
    Image.fromarray(np.full((24, 32), 200, np.uint8)).save(tmp_path / "ok.png")

    def preprocess(image):
        if image.size == (50, 40):
            raise MemoryError()  # what an allocation too big for the machine raises
        return PAD(image)

    ds = _dataset(tiny_model, tmp_path, ["huge.png", "ok.png"], preprocess)
    with caplog.at_level(logging.WARNING, logger="medm.data.dataset"):
        item = ds[0]
    assert item["pixel_values"].shape == (1, 1, 16, 16) and ds.bad_samples.count == 1
    assert "skipping sample 'r0'" in caplog.text and "huge.png" in caplog.text and "out of memory" in caplog.text
