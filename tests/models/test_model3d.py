"""Models with a 3D tower: token counts of every 3D encoder / connector pair, a mixed 2D + 3D + text batch from the
dataset through forward and backward, a 3D training step, save / load, and weights loaded from `path`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from medm.data.collator import DataCollator
from medm.data.dataset import DataArgs, build_dataset
from medm.models import build_model, load_model, save_model
from medm.models.tiny import tiny_model_config, tiny_vision
from medm.registry import VISION

# (encoder, encoder overrides, connector, expected <image3d> tokens) on the tiny 4x4x4 grids.
PAIRS = {
    "vit3d-pool": ("vit3d", {}, {"name": "spatial_pool", "stride": 2}, 2 * 2 * 2),
    "vit3d-cls-pool-keep": ("vit3d", {"select_feature": "cls_patch"},
                            {"name": "spatial_pool", "stride": [1, 2, 2], "prefix": "keep"}, 1 + 4 * 2 * 2),
    "vit3d-attn": ("vit3d", {}, {"name": "attention_pool", "num_queries": 8, "num_heads": 2}, 8),
    "vit3d-mlp": ("vit3d", {}, {"name": "mlp", "type": "mlp2x_gelu"}, 64),
    "slices-pool": ("slices", {}, {"name": "spatial_pool", "stride": [1, 2, 2]}, 4 * 2 * 2),
    "slices-attn": ("slices", {}, {"name": "attention_pool", "num_queries": 8, "num_heads": 2}, 8),
}


def config3d(encoder="vit3d", overrides=None, connector=None, with_2d=True, **volume):
    cfg = tiny_model_config(vision="clip" if with_2d else None)
    cfg["vision3d"] = {"name": encoder, **tiny_vision(encoder), **(overrides or {})}
    if volume:
        cfg["vision3d"]["volume"] = volume
    cfg["connector3d"] = connector or {"name": "spatial_pool", "stride": 2}
    return cfg


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def write_ct(path, seed=0, shape=(12, 40, 36)):
    """A CT-like .npy volume in HU, depth first."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(-800, 50, size=shape)
    vol[3:9, 10:30, 8:28] = rng.normal(40, 20, size=(6, 20, 20))  # soft tissue
    np.save(path, vol.astype(np.int16))
    return str(path)


@pytest.mark.parametrize("key", list(PAIRS))
def test_every_3d_pair_emits_the_promised_token_count(key, tmp_path):
    encoder, overrides, connector, expected = PAIRS[key]
    model, _ = build(config3d(encoder, overrides, connector, with_2d=False))
    assert model.num_image3d_tokens == expected
    pre = VISION.get(encoder).preprocessor(model.config.vision3d)
    x = torch.stack([pre(write_ct(tmp_path / "a.npy")), pre(write_ct(tmp_path / "b.npy", seed=1))])
    channels, size = (3, (4, 32, 32)) if encoder == "slices" else (1, (16, 32, 32))
    assert x.shape == (2, channels, *size)
    with torch.no_grad():
        feats = model.eval().get_image3d_features(x)
    assert feats.shape == (2, expected, model.config.text_config.hidden_size)


def _mixed_data(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "cxr.png")
    write_ct(tmp_path / "ct.npy")
    records = [
        {"id": "2d", "image": ["cxr.png"], "conversations": [
            {"from": "human", "value": "<image>\nIs there a lesion?"}, {"from": "gpt", "value": "No."}]},
        {"id": "3d", "image3d": ["ct.npy"], "conversations": [
            {"from": "human", "value": "<image3d>\nWhich organ is shown?"}, {"from": "gpt", "value": "liver"}]},
        {"id": "text", "conversations": [
            {"from": "human", "value": "Is the heart enlarged?"}, {"from": "gpt", "value": "No."}]},
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    return DataArgs(path=str(tmp_path / "train.json"), image_dir=str(tmp_path))


def test_mixed_2d_3d_text_batch_from_the_dataset_runs_forward_and_backward(tmp_path):
    model, tok = build(config3d(connector={"name": "spatial_pool", "stride": 2}))
    ds = build_dataset(_mixed_data(tmp_path), model, tok)
    assert ds.modalities == ["image", "image3d", "text"]
    batch = DataCollator(tok)([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert batch["pixel_values_3d"].shape == (1, 1, 16, 32, 32)
    ids = batch["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == model.num_image_tokens
    assert int((ids == model.config.image3d_token_id).sum()) == model.num_image3d_tokens == 8
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss)
    assert out.image_features.shape[0] == 1 and out.image3d_features.shape == (1, 8, 64)
    out.loss.backward()
    for name in ("connector", "connector3d", "vision3d"):
        params = list(getattr(model, name).parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
    patch = next(p for n, p in model.vision.named_parameters() if "patch_embedding" in n)
    assert patch.grad.abs().sum() > 0
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_3d_training_steps_lower_the_loss(tmp_path):
    model, tok = build(config3d(with_2d=False, connector={"name": "spatial_pool", "stride": 2}), seed=1)
    data = _mixed_data(tmp_path)
    # Only the 3D record: build_dataset needs a 2D tower for the image record.
    records = [r for r in json.loads((tmp_path / "train.json").read_text()) if r["id"] == "3d"]
    (tmp_path / "train.json").write_text(json.dumps(records))
    ds = build_dataset(data, model, tok)
    batch = DataCollator(tok)([ds[0], ds[0]])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = model.vision3d.patch_embed.proj.weight.detach().clone()
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.75 * losses[0], losses
    assert not torch.equal(model.vision3d.patch_embed.proj.weight, before)  # the 3D tower trains too


def test_save_load_keeps_the_3d_tower_and_its_preprocessing(tmp_path):
    model, tok = build(config3d(with_2d=False, intensity="minmax", orientation="LPS"))
    save_model(model.eval(), tok, str(tmp_path / "ckpt"))
    loaded, tok2 = load_model(str(tmp_path / "ckpt"))
    assert loaded.config.vision3d == model.config.vision3d
    assert loaded.config.vision3d["volume"]["intensity"] == "minmax"
    pre = VISION.get("vit3d").preprocessor(loaded.config.vision3d)
    assert pre.size == (16, 32, 32) and pre.args.orientation == "LPS"
    x = pre(write_ct(tmp_path / "ct.npy"))[None]
    ids = tok2("<image3d>" * loaded.num_image3d_tokens + "Which organ?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, pixel_values_3d=x).logits,
                                   loaded.eval()(input_ids=ids, pixel_values_3d=x).logits, atol=0, rtol=0)


def test_builder_loads_vit3d_weights_from_path(tmp_path):
    """`vision3d.path` with `checkpoint_format: m3d`: the builder maps M3D-CLIP's names onto the encoder."""
    model, _ = build(config3d(with_2d=False, overrides={"checkpoint_format": "m3d"}))
    native = model.vision3d.state_dict()
    to_m3d = {"pos_embed": "patch_embedding.position_embeddings",
              "patch_embed.proj.": "patch_embedding.patch_embeddings.1.", ".attn.proj.": ".attn.out_proj.",
              ".mlp.fc1.": ".mlp.linear1.", ".mlp.fc2.": ".mlp.linear2."}
    g = torch.Generator().manual_seed(7)
    source = {}
    for k, v in native.items():
        name = k
        for a, b in to_m3d.items():
            name = name.replace(a, b)
        source["vision_encoder." + name] = torch.randn(v.shape, generator=g)
    save_file(source, str(tmp_path / "m3d.safetensors"))
    cfg = config3d(with_2d=False, overrides={"checkpoint_format": "m3d", "path": str(tmp_path / "m3d.safetensors")})
    loaded, _ = build(cfg, seed=5)
    assert loaded.config.vision3d["path"] == str(tmp_path / "m3d.safetensors")
    vit = loaded.vision3d
    torch.testing.assert_close(vit.blocks[1].mlp.fc2.weight, source["vision_encoder.blocks.1.mlp.linear2.weight"])
    torch.testing.assert_close(vit.pos_embed, source["vision_encoder.patch_embedding.position_embeddings"])
