"""medm.data.collator: padding, masks and media order; a mixed batch trains through the tiny model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from medm.data.annotations import parse_record
from medm.data.collator import DataCollator
from medm.data.dataset import ConversationDataset
from medm.data.templates import IGNORE_INDEX
from medm.registry import VISION


class Tok:
    pad_token_id = 0


def item(ids, labels=True, images=None):
    ids = torch.tensor(ids)
    out = {"input_ids": ids, "labels": ids.clone() if labels else None, "pixel_values": images}
    return out


def test_right_padding_masks_and_image_order():
    # Images tagged by value so their order in the batch is visible: text-only, 1 image, 2 images, text-only.
    img = [torch.full((1, 3, 4, 4), float(v)) for v in (1, 2, 3)]
    items = [item([5, 6]), item([7, 8, 9, 10], images=img[0]), item([11], images=torch.cat(img[1:])), item([12, 13])]
    batch = DataCollator(Tok())(items)
    assert batch["input_ids"].tolist() == [[5, 6, 0, 0], [7, 8, 9, 10], [11, 0, 0, 0], [12, 13, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, -100, -100], [7, 8, 9, 10], [11, -100, -100, -100],
                                        [12, 13, -100, -100]]
    assert batch["pixel_values"].shape == (3, 3, 4, 4)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert "pixel_values_3d" not in batch


def test_left_padding_for_prompts_and_multiple_of():
    batch = DataCollator(Tok(), padding_side="left", pad_to_multiple_of=4)([item([5, 6, 7], labels=False),
                                                                            item([8], labels=False)])
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert set(batch) == {"input_ids", "attention_mask"}  # no labels, no media keys


def test_collator_errors():
    with pytest.raises(ValueError, match="some items have labels"):
        DataCollator(Tok())([item([1]), item([2], labels=False)])
    with pytest.raises(ValueError, match="different shapes"):
        DataCollator(Tok())([item([1], images=torch.zeros(1, 3, 4, 4)), item([2], images=torch.zeros(1, 3, 8, 8))])
    with pytest.raises(ValueError, match="padding_side"):
        DataCollator(Tok(), padding_side="middle")


def test_mixed_batch_trains_through_the_tiny_model(tiny_model, tmp_path):
    model, tok = tiny_model
    model.train()
    for name, size in [("a.png", (40, 30)), ("b.png", (17, 23)), ("c.png", (64, 64))]:
        Image.new("RGB", size, (120, 60, 30)).save(tmp_path / name)
    raw = [
        {"id": "t", "conversations": [{"from": "human", "value": "Is there a fracture?"},
                                      {"from": "gpt", "value": "No."}]},
        {"id": "1", "image": ["a.png"], "conversations": [{"from": "human", "value": "Which organ is shown?"},
                                                          {"from": "gpt", "value": "The lesion is in the liver."}]},
        {"id": "2", "image": ["b.png", "c.png"], "conversations": [
            {"from": "human", "value": "<image> then <image>: how many lesions?"}, {"from": "gpt", "value": "two"}]},
    ]
    vision = model.config.vision
    ds = ConversationDataset([parse_record(r, "x") for r in raw], tok, num_image_tokens=model.num_image_tokens,
                             image_preprocess=VISION.get(vision["name"]).preprocessor(vision), image_dir=str(tmp_path))
    items = [ds[i] for i in range(3)]
    batch = DataCollator(tok)(items)
    B, T = batch["input_ids"].shape
    assert (B, T) == (3, max(ds.lengths))
    image_id = tok.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 3 * model.num_image_tokens
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][0], items[1]["pixel_values"][0])
    assert torch.equal(batch["pixel_values"][1:], items[2]["pixel_values"])
    # Padding is never attended to nor supervised.
    assert bool(((batch["attention_mask"] == 0) <= (batch["labels"] == IGNORE_INDEX)).all())
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part in (model.connector, model.llm):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    # The loss is the mean over supervised tokens only: recompute it from the logits.
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
    ref = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(out.loss.detach(), ref.detach(), atol=1e-5)
