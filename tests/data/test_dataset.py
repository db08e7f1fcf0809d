"""medm.data.dataset: items equal the chat template's ids with images expanded, pixel values follow the image
tokens through truncation, dropped samples are counted, and the model's config drives `build_dataset`."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from medm.data.annotations import parse_record
from medm.data.collator import DataCollator
from medm.data.dataset import ConversationDataset, DataArgs, build_dataset
from medm.data.images import load_image
from medm.data.templates import IGNORE_INDEX, TemplateError, expand_media
from medm.registry import VISION


def make_images(tmp_path):
    """Three small images of different sizes and modes (the preprocessor resizes them all)."""
    for name, mode, size, colour in [("a.png", "RGB", (40, 30), (200, 10, 10)), ("b.png", "L", (20, 20), 90),
                                     ("c.jpg", "RGB", (64, 48), (10, 200, 10))]:
        Image.new(mode, size, colour).save(tmp_path / name)
    return str(tmp_path)


RAW = [
    {"id": "text", "conversations": [{"from": "human", "value": "Is the heart enlarged?"},
                                     {"from": "gpt", "value": "No."}]},
    {"id": "one", "image": ["a.png"], "conversations": [{"from": "human", "value": "Which organ is shown?"},
                                                        {"from": "gpt", "value": "liver"}]},
    {"id": "two", "image": ["b.png", "c.jpg"], "conversations": [
        {"from": "human", "value": "<image>\nIs there a lesion?"}, {"from": "gpt", "value": "Yes."},
        {"from": "human", "value": "And here?\n<image>"}, {"from": "gpt", "value": "No lesion."}]},
]


def records():
    return [parse_record(r, "x", for_training=True) for r in RAW]


def preprocess(model):
    return VISION.get(model.config.vision["name"]).preprocessor(model.config.vision)


def test_items_are_the_chat_template_with_images_expanded(tiny_model, tmp_path):
    model, tok = tiny_model
    image_dir = make_images(tmp_path)
    pre = preprocess(model)
    ds = ConversationDataset(records(), tok, num_image_tokens=model.num_image_tokens, image_preprocess=pre,
                             image_dir=image_dir)
    n_tok = model.num_image_tokens
    image_id = tok.convert_tokens_to_ids("<image>")
    assert len(ds) == 3 and ds.modalities == ["text", "image", "image"] and ds.num_dropped == 0
    for i, rec in enumerate(records()):
        item = ds[i]
        native = tok.apply_chat_template(rec.messages(), tokenize=True)["input_ids"]
        expected, _, _ = expand_media(native, None, {image_id: n_tok})
        assert item["input_ids"].tolist() == expected
        assert item["length"] == ds.lengths[i] == len(expected)
        assert (item["input_ids"] == image_id).sum() == n_tok * len(rec.image)
        answers = [t["value"] + "<|im_end|>" for t in rec.conversations if t["from"] == "gpt"]
        assert tok.decode(item["input_ids"][item["labels"] != IGNORE_INDEX]) == "".join(answers)
        if rec.image:
            want = torch.stack([pre(load_image(f"{image_dir}/{p}")) for p in rec.image])
            assert item["pixel_values"].shape == (len(rec.image), 3, 32, 32)
            assert torch.equal(item["pixel_values"], want)  # in the record's order
        else:
            assert item["pixel_values"] is None
        assert item["pixel_values_3d"] is None


def test_truncation_inside_an_image_drops_that_image_and_counts_empty_samples(tiny_model, tmp_path, caplog):
    model, tok = tiny_model
    image_dir = make_images(tmp_path)
    n_tok = model.num_image_tokens
    two = records()[2]
    full = ConversationDataset([two], tok, num_image_tokens=n_tok, image_preprocess=preprocess(model),
                               image_dir=image_dir)[0]
    image_pos = (full["input_ids"] == tok.convert_tokens_to_ids("<image>")).nonzero().flatten().tolist()
    second_start = image_pos[n_tok]
    # A cut in the middle of the second image's run moves before it; the first answer stays supervised.
    ds = ConversationDataset([two], tok, num_image_tokens=n_tok, image_preprocess=preprocess(model),
                             image_dir=image_dir, max_length=second_start + n_tok // 2)
    assert len(ds) == 1 and ds.num_dropped == 0
    item = ds[0]
    assert item["input_ids"].tolist() == full["input_ids"][:second_start].tolist()
    assert ds.lengths == [second_start]
    assert item["pixel_values"].shape[0] == 1 and torch.equal(item["pixel_values"][0], full["pixel_values"][0])
    assert tok.decode(item["input_ids"][item["labels"] != IGNORE_INDEX]) == "Yes.<|im_end|>"
    # The item still runs: the image count matches its pixel values.
    batch = DataCollator(tok)([item])
    assert torch.isfinite(model(**batch).loss)
    # A cut inside the only image, before the answer, leaves nothing to learn: dropped, counted and logged.
    one = records()[1]
    first = ConversationDataset([one], tok, num_image_tokens=n_tok, image_preprocess=preprocess(model),
                                image_dir=image_dir)
    start = first[0]["input_ids"].tolist().index(tok.convert_tokens_to_ids("<image>"))
    with caplog.at_level(logging.WARNING, logger="medm.data.dataset"):
        empty = ConversationDataset([one, two], tok, num_image_tokens=n_tok, image_preprocess=preprocess(model),
                                    max_length=start + n_tok // 2)
    assert len(empty) == 0 and empty.num_dropped == 2 and empty.lengths == []
    assert "dropped 2 of 2 record(s)" in caplog.text


def test_template_errors_are_collected_for_every_record(tiny_model):
    model, _ = tiny_model
    from medm.models.builder import add_media_tokens
    from medm.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer("chatml")
    add_media_tokens(tok)
    tok.chat_template = ("{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    with pytest.raises(TemplateError, match=r"(?s)2 of 2 record\(s\).*'text'.*'one'") as e:
        ConversationDataset(records()[:2], tok, num_image_tokens=4, image_preprocess=preprocess(model))
    assert "no end-of-turn" in str(e.value)


def test_media_without_an_encoder_is_an_error(tiny_model):
    _, tok = tiny_model
    with pytest.raises(ValueError, match="record 'one' has images.*2D vision encoder"):
        ConversationDataset(records(), tok, num_image_tokens=0)
    vol = parse_record({"id": "ct", "image3d": ["ct.npy"], "conversations": [
        {"from": "human", "value": "<image3d>\nDescribe."}, {"from": "gpt", "value": "Normal."}]}, "x")
    with pytest.raises(ValueError, match="record 'ct' has 3D volumes"):
        ConversationDataset([vol], tok, num_image_tokens=16)


def test_volume_hook(tiny_model):
    _, tok = tiny_model
    vol = parse_record({"id": "ct", "image3d": ["/data/ct.npy"], "conversations": [
        {"from": "human", "value": "<image3d>\nDescribe."}, {"from": "gpt", "value": "Normal."}]}, "x")
    seen = []

    def load_volume(path):
        seen.append(path)
        return torch.ones(1, 4, 8, 8)

    item = ConversationDataset([vol], tok, num_image_tokens=16, num_image3d_tokens=3, volume_preprocess=load_volume,
                               image_dir="/other")[0]
    assert seen == ["/data/ct.npy"] and item["pixel_values_3d"].shape == (1, 1, 4, 8, 8)
    assert (item["input_ids"] == tok.convert_tokens_to_ids("<image3d>")).sum() == 3
    assert item["pixel_values"] is None


def test_build_dataset_reads_the_model_config(tiny_model, tmp_path):
    model, tok = tiny_model
    image_dir = make_images(tmp_path)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RAW))
    ds = build_dataset(DataArgs(path=str(path), image_dir=image_dir), model, tok)
    assert len(ds) == 3 and ds[1]["pixel_values"].shape == (1, 3, 32, 32)
    assert "You are Qwen" in tok.decode(ds[0]["input_ids"])  # the model's (native) template
    # Overrides: the caption-pretraining template and a system prompt.
    pre = build_dataset(DataArgs(path=[str(path)], image_dir=image_dir, template="pretrain"), model, tok)
    assert tok.decode(pre[1]["input_ids"]) == "<image>" * model.num_image_tokens + "liver<|im_end|>"
    sys_ds = build_dataset(DataArgs(path=str(path), image_dir=image_dir, system_prompt="Be brief."), model, tok)
    assert tok.decode(sys_ds[0]["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    with pytest.raises(ValueError, match="data.path"):
        build_dataset(DataArgs(), model, tok)


def test_vqa_rad_batch_runs_through_the_tiny_model(shared_data, tiny_model, tmp_path):
    root = shared_data / "vqa_rad"
    if not (root / "split" / "trainset.json").is_file():
        pytest.skip("VQA-RAD split not present")
    rows = json.loads((root / "split" / "trainset.json").read_text())[:8]
    raw = [{"id": f"vqarad-{r['qid']}", "image": [r["image_name"]],
            "conversations": [{"from": "human", "value": f"<image>\n{r['question']}"},
                              {"from": "gpt", "value": str(r["answer"])}],
            "answer_type": r["answer_type"], "image_organ": r["image_organ"]} for r in rows]
    path = tmp_path / "vqa_rad_train.json"
    path.write_text(json.dumps(raw))
    model, tok = tiny_model
    ds = build_dataset(DataArgs(path=str(path), image_dir=str(root / "images")), model, tok)
    assert len(ds) == 8 and set(ds.modalities) == {"image"}
    items = [ds[i] for i in range(4)]
    for item, row in zip(items, rows):
        assert tok.decode(item["input_ids"][item["labels"] != IGNORE_INDEX]) == f"{row['answer']}<|im_end|>"
    batch = DataCollator(tok)(items)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    out = model(**batch)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("family, end", [("llama", "<|eot_id|>"), ("phi3", "<|end|>")])
def test_other_llm_families_train_on_their_native_format(family, end, tmp_path):
    from medm.models import build_model
    from medm.models.tiny import tiny_model_config

    torch.manual_seed(0)
    model, tok = build_model(tiny_model_config(family=family))
    image_dir = make_images(tmp_path)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(RAW))
    ds = build_dataset(DataArgs(path=str(path), image_dir=image_dir), model, tok)
    items = [ds[i] for i in range(len(ds))]
    for item, raw in zip(items, RAW):
        answers = [t["value"] + end for t in raw["conversations"] if t["from"] == "gpt"]
        assert tok.decode(item["input_ids"][item["labels"] != IGNORE_INDEX]) == "".join(answers)
    out = model(**DataCollator(tok)(items))
    assert torch.isfinite(out.loss)
