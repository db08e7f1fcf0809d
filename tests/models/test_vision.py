"""2D vision encoders (clip, siglip, open_clip, timm ViT and CNN): geometry, layer choice, preprocessing, weights."""

import json

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionModel, SiglipVisionModel

from medm.models import build_model, load_model, save_model
from medm.models.tiny import tiny_model_config, tiny_vision
from medm.registry import CONNECTOR, VISION

# Tiny CNN: timm's `test_resnet` at 64 px; stage -2 (layer3, stride 16) gives a 4x4 grid of 192 channels.
TIMM_CNN = {"model_name": "test_resnet", "image_size": 64}
# name -> (registry name, settings, leading prefix tokens kept by `cls_patch`)
ENCODERS = {
    "clip": ("clip", tiny_vision("clip"), 1),
    "siglip": ("siglip", tiny_vision("siglip"), 0),
    "open_clip": ("open_clip", tiny_vision("open_clip"), 1),
    "timm_vit": ("timm", tiny_vision("timm"), 1),
    "timm_cnn": ("timm", TIMM_CNN, 0),
}
# A tiny open_clip text tower, only to write full CLIP checkpoints the way open_clip does.
TINY_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def make(key, seed=0, **overrides):
    """(encoder class, resolved config, encoder in eval mode) for an ENCODERS entry."""
    name, settings, _ = ENCODERS[key]
    cls = VISION.get(name)
    cfg = cls.resolve_config({**settings, **overrides})
    torch.manual_seed(seed)
    return cls, cfg, cls(**cfg).eval()


def pixels(enc_cfg_cls, batch=2, seed=1):
    cls, cfg = enc_cfg_cls
    h, w = cls.preprocessor(cfg).image_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _open_clip_blocks(visual, px, n_blocks):
    """Reference: open_clip's own embedding + the first `n_blocks` residual blocks, (B, 1 + h*w, D)."""
    x = visual._embeds(px)
    for blk in visual.transformer.resblocks[:n_blocks]:
        x = blk(x)
    return x


def _timm_vit_blocks(model, px, n_blocks):
    """Reference: timm ViT embedding + the first `n_blocks` blocks, (B, prefix + h*w, D)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(px))))
    for blk in model.blocks[:n_blocks]:
        x = blk(x)
    return x


@pytest.mark.parametrize("key", list(ENCODERS))
def test_output_shape_is_the_promised_geometry(key):
    cls, cfg, enc = make(key)
    px = pixels((cls, cfg))
    with torch.no_grad():
        out = enc(px)
    assert enc.num_tokens == enc.num_prefix_tokens + enc.grid[0] * enc.grid[1]
    assert out.shape == (2, enc.num_tokens, enc.hidden_size)
    assert enc.grid == (4, 4)
    assert enc.hidden_size == (192 if key == "timm_cnn" else 32)


@pytest.mark.parametrize("key", list(ENCODERS))
def test_select_feature_patch_vs_cls_patch(key):
    n_prefix = ENCODERS[key][2]
    cls, cfg, patch = make(key, select_feature="patch")
    _, _, both = make(key, select_feature="cls_patch")
    both.load_state_dict(patch.state_dict(), strict=True)
    px = pixels((cls, cfg))
    with torch.no_grad():
        a, b = patch(px), both(px)
    assert patch.num_prefix_tokens == 0 and a.shape[1] == 16
    assert both.num_prefix_tokens == n_prefix and b.shape[1] == 16 + n_prefix
    # The prefix tokens come first; the grid tokens are the same either way.
    torch.testing.assert_close(b[:, n_prefix:], a, rtol=0, atol=0)


@pytest.mark.parametrize("key", ["clip", "siglip"])
def test_skip_first_drops_the_first_token_cls_or_not(key):
    """LLaVA's `default` / TinyLLaVA's `patch`: CLIP loses its CLS (= `patch`), SigLIP its top-left patch."""
    cls, cfg, enc = make(key, select_feature="skip_first")
    px = pixels((cls, cfg))
    with torch.no_grad():
        out = enc(px)
        ref = enc.model(pixel_values=px, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(out, ref[:, 1:], rtol=0, atol=0)
    assert out.shape[1] == enc.num_tokens == 16 + ENCODERS[key][2] - 1
    assert enc.num_prefix_tokens == (0 if key == "clip" else -1)


def test_only_the_mlp_connector_takes_features_missing_a_patch():
    enc = VISION.build("siglip", **tiny_vision("siglip"), select_feature="skip_first")
    mlp = CONNECTOR.build("mlp", in_dim=32, out_dim=48, grid=enc.grid, num_prefix_tokens=enc.num_prefix_tokens)
    assert mlp.num_tokens == 15 and mlp(torch.randn(2, 15, 32)).shape == (2, 15, 48)
    geometry = {"in_dim": 32, "out_dim": 48, "grid": enc.grid, "num_prefix_tokens": enc.num_prefix_tokens}
    # MedM-VL's attention pooling attends without positions: 15 tokens are as good as 16.
    pool = CONNECTOR.build("attention_pool", **geometry, layout="medm-vl", num_queries=4)
    assert pool(torch.randn(2, 15, 32)).shape == (2, 4, 48)
    for name, kw in (("spatial_pool", {}), ("attention_pool", {"layout": "qwen", "num_queries": 4})):
        with pytest.raises(ValueError, match=rf"connector '{name}' needs the encoder's full patch grid \(4, 4\)"):
            CONNECTOR.build(name, **geometry, **kw)
    with pytest.raises(ValueError, match="drops a patch of every slice"):
        VISION.build("slices", encoder={"name": "siglip", **tiny_vision("siglip"), "select_feature": "skip_first"},
                     num_slices=2)
    with pytest.raises(ValueError, match="unknown select_feature 'first'; known: patch, cls_patch, skip_first"):
        VISION.build("siglip", **tiny_vision("siglip"), select_feature="first")


@pytest.mark.parametrize("key,model_class", [("clip", CLIPVisionModel), ("siglip", SiglipVisionModel)])
@pytest.mark.parametrize("layer", [-1, -2, 1])
def test_select_layer_hf_is_hidden_states_index(key, model_class, layer):
    cls, cfg, enc = make(key, select_layer=layer, select_feature="cls_patch")
    px = pixels((cls, cfg))
    with torch.no_grad():
        ref = enc.model(pixel_values=px, output_hidden_states=True).hidden_states[layer]
        out = enc(px)
    assert isinstance(enc.model, model_class)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_siglip_last_layer_is_before_post_layernorm():
    cls, cfg, enc = make("siglip", select_layer=-1)
    px = pixels((cls, cfg))
    with torch.no_grad():
        res = enc.model(pixel_values=px, output_hidden_states=True)
        out = enc(px)
    assert len(res.hidden_states) == cfg["config"]["num_hidden_layers"] + 1
    torch.testing.assert_close(out, res.hidden_states[-1], rtol=0, atol=0)
    torch.testing.assert_close(enc.model.post_layernorm(out), res.last_hidden_state)
    assert not torch.allclose(out, res.last_hidden_state)


@pytest.mark.parametrize("layer,n_blocks", [(-1, 2), (-2, 1), (0, 1), (1, 2)])
def test_select_layer_open_clip_is_block_output(layer, n_blocks):
    cls, cfg, enc = make("open_clip", select_layer=layer, select_feature="cls_patch")
    px = pixels((cls, cfg))
    with torch.no_grad():
        ref = _open_clip_blocks(enc.visual, px, n_blocks)
        out = enc(px)
        # The reference is open_clip's own path: its pooled output follows from the last block's tokens.
        last = _open_clip_blocks(enc.visual, px, 2)
        torch.testing.assert_close(enc.visual(px), enc.visual.ln_post(last)[:, 0] @ enc.visual.proj)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


OPEN_CLIP_TOWERS = {
    "modified_resnet": {"embed_dim": 32, "vision_cfg": {"layers": [1, 1, 1, 1], "width": 8, "image_size": 64,
                                                        "head_width": 8}},
    "timm_vit_trunk": {"embed_dim": 32, "vision_cfg": {"timm_model_name": "test_vit", "image_size": 160,
                                                       "timm_pool": "", "timm_proj": "linear"}},
}


@pytest.mark.parametrize("tower", list(OPEN_CLIP_TOWERS))
def test_open_clip_resnet_and_timm_towers(tower):
    """open_clip's other image towers: the stage map of a ModifiedResNet, the block tokens of a timm trunk."""
    cls, cfg, enc = make("open_clip", model_cfg=OPEN_CLIP_TOWERS[tower], select_feature="cls_patch")
    px = pixels((cls, cfg))
    with torch.no_grad():
        out = enc(px)
        if tower == "modified_resnet":
            v = enc.visual
            ref = v.layer3(v.layer2(v.layer1(v.stem(px)))).flatten(2).transpose(1, 2)  # stage -2 of 5
        else:
            trunk = enc.visual.trunk
            ref = _timm_vit_blocks(trunk, px, len(trunk.blocks) - 1)
    assert out.shape == (2, enc.num_tokens, enc.hidden_size)
    assert enc.num_prefix_tokens == (0 if tower == "modified_resnet" else 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("layer,n_blocks", [(-1, 2), (-2, 1), (0, 1)])
def test_select_layer_timm_vit_is_block_output(layer, n_blocks):
    cls, cfg, enc = make("timm_vit", select_layer=layer, select_feature="cls_patch")
    px = pixels((cls, cfg))
    with torch.no_grad():
        ref = _timm_vit_blocks(enc.model, px, n_blocks)
        out = enc(px)
        torch.testing.assert_close(enc.model.forward_features(px), enc.model.norm(_timm_vit_blocks(enc.model, px, 2)))
    assert enc.model.num_prefix_tokens == 1
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("layer,stages,grid,channels", [(-1, 4, (2, 2), 96), (-2, 3, (4, 4), 192), (2, 2, (8, 8), 48)])
def test_select_layer_timm_cnn_is_stage_map(layer, stages, grid, channels):
    cls, cfg, enc = make("timm_cnn", select_layer=layer)
    px = pixels((cls, cfg))
    m = enc.model
    with torch.no_grad():
        x = m.maxpool(m.act1(m.bn1(m.conv1(px))))
        for stage in [m.layer1, m.layer2, m.layer3, m.layer4][:stages]:
            x = stage(x)
        out = enc(px)
    assert enc.grid == grid and enc.hidden_size == channels and x.shape[1:] == (channels, *grid)
    # Row-major flattening: token i*w + j is grid cell (i, j).
    torch.testing.assert_close(out, x.flatten(2).transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(out[:, grid[1] + 1], x[:, :, 1, 1], rtol=0, atol=0)


@pytest.mark.parametrize("key,mean", [
    ("siglip", (0.5, 0.5, 0.5)),
    ("open_clip", open_clip.OPENAI_DATASET_MEAN),
    ("timm_vit", timm.get_pretrained_cfg("vit_base_patch16_224").mean),  # timm's data config for the model
    ("timm_cnn", timm.get_pretrained_cfg("test_resnet").mean),
])
def test_preprocessor_shape_and_normalisation(key, mean):
    cls, cfg, _ = make(key)
    pre = cls.preprocessor(cfg)
    size = 64 if key == "timm_cnn" else 32
    assert pre.image_size == (size, size)
    np.testing.assert_allclose(pre.mean, mean, rtol=1e-6)
    std = torch.tensor(pre.std).view(3, 1, 1)
    rgb = pre(Image.new("RGB", (50, 30), (255, 0, 128)))
    gray = pre(Image.new("L", (30, 50), 200))
    assert rgb.shape == gray.shape == (3, size, size) and rgb.dtype == torch.float32
    expected_rgb = (torch.tensor([1.0, 0.0, 128 / 255]).view(3, 1, 1) - torch.tensor(mean).view(3, 1, 1)) / std
    expected_gray = (200 / 255 - torch.tensor(mean).view(3, 1, 1)) / std
    torch.testing.assert_close(rgb, expected_rgb.expand(3, size, size), atol=1e-5, rtol=0)
    torch.testing.assert_close(gray, expected_gray.expand(3, size, size), atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", list(ENCODERS))
def test_resolved_config_alone_rebuilds_the_encoder(key):
    cls, cfg, enc = make(key)
    saved = json.loads(json.dumps(cfg))  # what config.json keeps: plain values only
    assert cls.resolve_config(saved) == saved  # nothing left to fill in
    _, _, again = make(key, seed=123, **saved)
    again.load_state_dict(enc.state_dict(), strict=True)
    assert (again.hidden_size, again.grid, again.num_prefix_tokens) == (enc.hidden_size, enc.grid,
                                                                         enc.num_prefix_tokens)
    px = pixels((cls, cfg))
    with torch.no_grad():
        torch.testing.assert_close(again(px), enc(px), rtol=0, atol=0)


def test_open_clip_model_name_resolves_to_full_architecture_offline():
    cls = VISION.get("open_clip")
    cfg = cls.resolve_config({"model_name": "ViT-B-16-SigLIP"})
    lib = open_clip.get_model_config("ViT-B-16-SigLIP")
    assert cfg["model_cfg"]["vision_cfg"] == lib["vision_cfg"] and cfg["model_cfg"]["embed_dim"] == lib["embed_dim"]
    assert "text_cfg" not in cfg["model_cfg"]  # only the image tower is built and saved
    assert cfg["image_mean"] == [0.5, 0.5, 0.5]  # what its pretrained tags use
    assert cls.resolve_config({"model_name": "ViT-B-16"})["image_mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    with torch.device("meta"):  # geometry only: no memory for a real-size tower
        enc = cls(**{**cfg, "model_name": None}, select_feature="cls_patch")
    assert (enc.hidden_size, enc.grid, enc.num_prefix_tokens) == (768, (14, 14), 0)
    with pytest.raises(ValueError, match="image_mean"):  # ViT-L-14's tags disagree (OpenAI vs 0.5)
        cls.resolve_config({"model_name": "ViT-L-14"})
    with pytest.raises(ValueError, match="unknown open_clip model_name 'ViT-Nope'"):
        cls.resolve_config({"model_name": "ViT-Nope"})


def test_timm_resolve_fills_size_and_normalisation_from_timm():
    cls = VISION.get("timm")
    cfg = cls.resolve_config({"model_name": "resnet18"})
    assert cfg["image_size"] == [224, 224] and cfg["image_mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN)
    with pytest.raises(ValueError, match="unknown timm model_name 'resnet_nope'"):
        cls.resolve_config({"model_name": "resnet_nope"})
    with pytest.raises(ValueError, match="set `image_mean`"):
        cls.resolve_config({"model_name": "resnet18", "model_args": {"in_chans": 1}})


@pytest.mark.parametrize("key,model_class", [("clip", CLIPVisionModel), ("siglip", SiglipVisionModel)])
def test_load_pretrained_hf_directory(tmp_path, key, model_class):
    cls, cfg, src = make(key, seed=1)
    src.model.save_pretrained(tmp_path)
    _, _, dst = make(key, seed=2)
    px = pixels((cls, cfg))
    with torch.no_grad():
        assert not torch.allclose(dst(px), src(px))
        dst.load_pretrained(str(tmp_path))
        torch.testing.assert_close(dst(px), src(px), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["safetensors_dir", "torch_file"])
def test_load_pretrained_open_clip_checkpoint(tmp_path, layout):
    cls, cfg, dst = make("open_clip", seed=2)
    torch.manual_seed(1)
    clip = open_clip.model.CLIP(embed_dim=cfg["model_cfg"]["embed_dim"], vision_cfg=cfg["model_cfg"]["vision_cfg"],
                                text_cfg=TINY_TEXT_CFG).eval()
    if layout == "safetensors_dir":
        save_file(clip.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
        path = tmp_path
    else:
        path = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, path)
    dst.load_pretrained(str(path))
    px = pixels((cls, cfg))
    with torch.no_grad():
        ref = _open_clip_blocks(clip.visual, px, 1)[:, 1:]  # select_layer -2 of 2 blocks, patch tokens
        torch.testing.assert_close(dst(px), ref, rtol=0, atol=0)
    save_file({"text.token_embedding.weight": torch.zeros(2, 2)}, str(tmp_path / "text_only.safetensors"))
    with pytest.raises(ValueError, match=r"no `visual\.\*` weights"):
        dst.load_pretrained(str(tmp_path / "text_only.safetensors"))


@pytest.mark.parametrize("key", ["timm_vit", "timm_cnn"])
@pytest.mark.parametrize("layout", ["safetensors_dir", "torch_file"])
def test_load_pretrained_timm_weights(tmp_path, key, layout):
    cls, cfg, dst = make(key, seed=2)
    torch.manual_seed(1)
    # A full timm model as saved by timm, classifier included (the encoder has none and skips it).
    full = timm.create_model(cfg["model_name"], pretrained=False, **cfg["model_args"]).eval()
    if layout == "safetensors_dir":
        save_file(full.state_dict(), str(tmp_path / "model.safetensors"))
        path = tmp_path
    else:
        path = tmp_path / "weights.pth"
        torch.save(full.state_dict(), path)
    dst.load_pretrained(str(path))
    px = pixels((cls, cfg))
    with torch.no_grad():
        ref = full.forward_intermediates(px, indices=[-2], intermediates_only=True)[0]
        torch.testing.assert_close(dst(px), ref.flatten(2).transpose(1, 2), rtol=0, atol=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no timm weights"):
        dst.load_pretrained(str(tmp_path / "empty"))


def test_load_pretrained_timm_rejects_other_architecture(tmp_path):
    _, cfg, dst = make("timm_vit")
    other = timm.create_model(cfg["model_name"], pretrained=False, **{**cfg["model_args"], "depth": 1})
    save_file(other.state_dict(), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        dst.load_pretrained(str(tmp_path))


@pytest.mark.parametrize("key", list(ENCODERS))
def test_backward_reaches_weights_and_pixels(key):
    cls, cfg, enc = make(key)
    enc.train()
    px = pixels((cls, cfg)).requires_grad_()
    enc(px).square().mean().backward()
    grads = [p.grad for p in enc.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert px.grad is not None and px.grad.abs().sum() > 0


@pytest.mark.parametrize("key", ["open_clip", "timm_vit", "timm_cnn"])
def test_bad_selection_is_a_clear_error_at_build(key):
    with pytest.raises(ValueError, match="unknown select_feature 'cls'"):
        make(key, select_feature="cls")
    with pytest.raises(ValueError, match="select_layer=7"):
        make(key, select_layer=7)
    with pytest.raises(ValueError, match="select_layer must be an integer"):
        make(key, select_layer="-2")


@pytest.mark.parametrize("key", ["clip", "siglip"])
def test_bad_selection_hf(key):
    with pytest.raises(ValueError, match="select_layer 7 out of range"):
        make(key, select_layer=7)
    with pytest.raises(ValueError, match="unknown select_feature 'cls'"):
        make(key, select_feature="cls")


@pytest.mark.parametrize("vision", ["siglip", "open_clip", "timm", "timm_cnn"])
def test_build_model_and_checkpoint_round_trip(tmp_path, vision):
    cfg = tiny_model_config(vision="timm" if vision == "timm_cnn" else vision)
    if vision == "timm_cnn":
        cfg["vision"] = {"name": "timm", **TIMM_CNN}
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    model.eval()
    n = model.vision.num_tokens
    image_id = tok.convert_tokens_to_ids("<image>")
    ids = torch.tensor([[image_id] * n + tok("Is there a lesion?")["input_ids"]])
    pre = VISION.get(model.config.vision["name"]).preprocessor(model.config.vision)
    px = pre(Image.new("L", (40, 40), 90)).unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px)
    assert out.logits.shape == (1, ids.shape[1], len(tok))
    assert out.image_features.shape == (1, n, model.config.text_config.hidden_size)
    save_model(model, tok, str(tmp_path))
    again, _ = load_model(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=ids, pixel_values=px).logits, out.logits, rtol=0, atol=0)


def test_build_model_loads_vision_path(tmp_path):
    """`vision.path` is the weights file: the builder loads it into the encoder."""
    _, enc_cfg, _ = make("timm_vit")
    torch.manual_seed(5)
    full = timm.create_model(enc_cfg["model_name"], pretrained=False, **enc_cfg["model_args"])
    save_file(full.state_dict(), str(tmp_path / "vit.safetensors"))
    cfg = tiny_model_config(vision="timm")
    cfg["vision"]["path"] = str(tmp_path / "vit.safetensors")
    model, _ = build_model(cfg)
    torch.testing.assert_close(model.vision.model.pos_embed, full.pos_embed, rtol=0, atol=0)


@pytest.mark.parametrize("name, select_layer, unused", [
    ("clip", -1, ["post_layernorm"]), ("clip", -2, ["encoder.layers.1", "post_layernorm"]),
    ("clip", 0, ["encoder.layers.0", "encoder.layers.1", "post_layernorm"]),
    ("siglip", -2, ["encoder.layers.1", "post_layernorm"]),  # the tiny SigLIP has no head (vision_use_head false)
])
def test_hf_towers_name_the_parameters_their_features_never_reach(name, select_layer, unused):
    cls = VISION.get(name)
    enc = cls(**{**cls.resolve_config(tiny_vision(name)), "select_layer": select_layer})
    expected = [f"model.{m}.{n}" for m in unused for n, _ in enc.model.get_submodule(m).named_parameters()]
    assert enc.unused_parameter_names() == expected
    # Exactly those get no gradient from the features.
    enc(torch.randn(1, 3, 32, 32)).sum().backward()
    assert sorted(n for n, p in enc.named_parameters() if p.grad is None) == sorted(expected)
    # An architecture whose layout medm does not know claims nothing (tests/models/test_hf_encoder.py builds one).
    enc.architecture = None
    assert enc.unused_parameter_names() == []
