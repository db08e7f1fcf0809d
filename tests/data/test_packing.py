"""medm.data.packing: best-fit packs cover every sample once within capacity; packed rows restart positions per
sample and never attend across samples, so the loss (and its gradient) equals the unpacked batch's; packing trains
through `medm train` with `data.packing: true`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from medm.data.annotations import parse_record
from medm.data.collator import DataCollator
from medm.data.dataset import ConversationDataset
from medm.data.packing import PackedDataset, PackingCollator, pack_lengths
from medm.data.templates import IGNORE_INDEX
from medm.registry import VISION

QA = [("Is there a lesion?", "Yes."), ("Which organ is shown?", "The liver."),
      ("Describe the image.", "A grayscale scan with an organ outline and a bright round lesion."),
      ("Is the heart enlarged?", "No."), ("Where is the lesion?", "The lesion is in the upper left."),
      ("How many lesions are there?", "two")]


def raw_records(n_text: int = 2):
    out = []
    for i, (q, a) in enumerate(QA):
        rec = {"id": f"r{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        if i >= n_text:
            rec["image"] = [f"{i % 2}.png"]
        out.append(rec)
    return out


def make_dataset(model, tok, tmp_path, max_length=256):
    for k, colour in ((0, (200, 30, 30)), (1, (20, 90, 200))):
        Image.new("RGB", (36, 28), colour).save(tmp_path / f"{k}.png")
    records = [parse_record(r, "x", for_training=True) for r in raw_records()]
    pre = VISION.get(model.config.vision["name"]).preprocessor(model.config.vision)
    return ConversationDataset(records, tok, num_image_tokens=model.num_image_tokens, image_preprocess=pre,
                               image_dir=str(tmp_path), max_length=max_length)


def test_best_fit_packs_cover_every_sample_within_capacity():
    lengths = [7, 3, 5, 2, 9, 1, 4, 6, 8, 5]
    packs = pack_lengths(lengths, 10)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 10 for p in packs)
    # 50 tokens in packs of 10: best-fit decreasing finds the 5 full packs.
    assert len(packs) == 5 and pack_lengths(lengths, 10) == packs
    with pytest.raises(ValueError, match="sample 4 has 9 tokens, more than the pack capacity 8"):
        pack_lengths(lengths, 8)


def test_packed_items_restart_positions_and_mask_first_labels(tiny_model, tmp_path):
    model, tok = tiny_model
    ds = make_dataset(model, tok, tmp_path)
    packed = PackedDataset(ds, capacity=2 * max(ds.lengths))
    assert sorted(i for p in packed.packs for i in p) == list(range(len(ds)))
    assert len(packed) < len(ds) and packed.num_samples == len(ds)
    item = packed[0]
    members = packed.packs[0]
    assert item["seq_lengths"] == [ds.lengths[i] for i in members] and item["length"] == sum(item["seq_lengths"])
    start = 0
    for i, n in zip(members, item["seq_lengths"]):
        ref = ds[i]
        assert torch.equal(item["input_ids"][start:start + n], ref["input_ids"])
        assert torch.equal(item["position_ids"][start:start + n], torch.arange(n))
        assert item["labels"][start] == IGNORE_INDEX
        assert torch.equal(item["labels"][start + 1:start + n], ref["labels"][1:])
        start += n
    n_images = sum(ds[i]["pixel_values"] is not None for i in members)
    assert (item["pixel_values"] is None) == (n_images == 0)


def test_collator_rows_positions_and_flash_boundaries(tiny_model):
    _, tok = tiny_model
    a = {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([5, 6, 7]), "pixel_values": None}
    b = {"input_ids": torch.tensor([8, 9]), "labels": torch.tensor([-100, 9]), "pixel_values": None}
    from medm.data.packing import pack_items

    batch = PackingCollator(tok, flash_kwargs=True)([pack_items([a, b]), b])
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 9, -100, -100, -100]]
    assert batch["input_ids"][1, 2:].tolist() == [tok.pad_token_id] * 3
    # Boundaries over the flattened rows: 3 | 2 | 2 | pad 3.
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 10] and batch["max_length_q"] == 3
    assert batch["cu_seq_lens_q"].dtype == torch.int32


@pytest.mark.parametrize("attn,flash_kwargs", [("sdpa", False), ("eager", False), ("sdpa_varlen", False),
                                                ("sdpa_varlen", True)])
def test_packed_loss_and_gradients_equal_unpacked(tiny_model, tmp_path, attn, flash_kwargs):
    """sdpa_varlen: sample boundaries from the position ids, or from the collator's cu_seq_lens."""
    model, tok = tiny_model
    model.llm.config._attn_implementation = attn
    ds = make_dataset(model, tok, tmp_path)
    items = [ds[i] for i in range(len(ds))]
    unpacked = DataCollator(tok)(items)
    packed_ds = PackedDataset(ds, capacity=2 * max(ds.lengths))
    assert len(packed_ds) < len(ds)  # some rows really hold several samples
    packs = [packed_ds[i] for i in range(len(packed_ds))]
    packed = PackingCollator(tok, flash_kwargs=flash_kwargs)(packs)
    # Same supervised tokens (the first label of a sample is never a target, so masking it changes no count).
    assert int((unpacked["labels"][:, 1:] != IGNORE_INDEX).sum()) == int((packed["labels"] != IGNORE_INDEX).sum())

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    ref, ref_grads = loss_and_grads(unpacked)
    got, got_grads = loss_and_grads(packed)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == got_grads.keys()
    for name in ("llm.model.layers.0.self_attn.q_proj.weight", "connector.mlp.0.weight"):
        key = next(k for k in ref_grads if k.startswith(name.rsplit(".", 1)[0]))
        torch.testing.assert_close(got_grads[key], ref_grads[key], rtol=1e-4, atol=1e-6)


def test_cross_sample_attention_is_blocked(tiny_model):
    """Changing the first sample of a row must not change the logits of the second."""
    model, tok = tiny_model
    from medm.data.packing import pack_items

    def sample(ids):
        t = torch.tensor(ids)
        return {"input_ids": t, "labels": t, "pixel_values": None}

    second = sample([11, 12, 13, 14])
    col = PackingCollator(tok)
    with torch.no_grad():
        x = model(**col([pack_items([sample([3, 4, 5]), second])])).logits[0, 3:]
        y = model(**col([pack_items([sample([7, 8, 9]), second])])).logits[0, 3:]
        alone = model(input_ids=second["input_ids"][None]).logits[0]
    torch.testing.assert_close(x, y)
    torch.testing.assert_close(x, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "sdpa_varlen"])
def test_medm_train_with_packing(tmp_path, attn):
    """`data.packing: true` trains through run_training: packs are built, the loss is finite and falls; with
    sdpa_varlen the collator gives the attention its cu_seq_lens."""
    from medm.models.tiny import tiny_model_config
    from medm.train.args import parse_train_config
    from medm.train.trainer import run_training

    for k, colour in ((0, (200, 30, 30)), (1, (20, 90, 200))):
        Image.new("RGB", (36, 28), colour).save(tmp_path / f"{k}.png")
    (tmp_path / "train.json").write_text(json.dumps(raw_records() * 2))
    model = tiny_model_config()
    model["llm"]["attn_implementation"] = attn
    cfg = parse_train_config({
        "model": model, "stage": {},
        "data": {"path": str(tmp_path / "train.json"), "image_dir": str(tmp_path), "max_length": 128,
                 "packing": True},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "per_device_train_batch_size": 2,
                  "learning_rate": 3e-3, "warmup_steps": 0, "lr_scheduler_type": "constant", "logging_steps": 1,
                  "save_strategy": "no", "report_to": [], "disable_tqdm": True, "device": "cpu",
                  "plot_loss": False}})
    trainer = run_training(cfg)
    assert isinstance(trainer.train_dataset, PackedDataset)
    assert isinstance(trainer.data_collator, PackingCollator)
    assert trainer.data_collator.flash_kwargs == (attn == "sdpa_varlen")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
