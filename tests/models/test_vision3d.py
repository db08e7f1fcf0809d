"""3D encoders: vit3d (M3D-CLIP and MedM-CLIP-CT checkpoints against reference forwards of their source code) and
slices (a 2D encoder over the slices of a volume); geometry at real size on the meta device."""

import math

import pytest
import torch
from einops.layers.torch import Rearrange
from safetensors.torch import save_file
from torch import nn

from medm.models.tiny import tiny_vision
from medm.registry import CONNECTOR, VISION

TINY = tiny_vision("vit3d")  # 16x32x32 input, patch 4x8x8, grid 4x4x4, hidden 32, 2 layers, 2 heads
MEDM_CT = {"norm": "post", "act": "relu", "qkv_bias": True, "cls_pos_embed": True, "patch_order": "hwdc",
           "patch_norm": True, "checkpoint_format": "medm-clip-ct"}
# Vision-tower names from the notes (docs: shared/notes/3d-clip-weights.md), without the `vision_encoder.` prefix.
M3D_KEYS = ("cls_token", "patch_embedding.position_embeddings", "patch_embedding.patch_embeddings.1.",
            "blocks.", "norm.")
M3D_BLOCK_PARTS = ("norm1.", "attn.qkv.weight", "attn.out_proj.", "norm2.", "mlp.linear1.", "mlp.linear2.")


def vit3d(seed=0, **overrides):
    torch.manual_seed(seed)
    cls = VISION.get("vit3d")
    return cls(**{k: v for k, v in cls.resolve_config({**TINY, **overrides}).items() if k != "name"}).eval()


def volume(batch=2, seed=1, size=(16, 32, 32), channels=1):
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(seed))


# ---- reference towers written from the source code of the two checkpoints ----------------------------------------
class M3DViT(nn.Module):
    """M3D-CLIP's vision tower: MONAI PatchEmbeddingBlock (perceptron) + TransformerBlocks, its forward copied."""

    def __init__(self, img=(16, 32, 32), patch=(4, 8, 8), hidden=32, mlp=64, layers=2, heads=2):
        super().__init__()
        from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock

        self.patch_embedding = PatchEmbeddingBlock(1, img, patch, hidden, heads, proj_type="perceptron",
                                                   pos_embed_type="learnable")
        self.blocks = nn.ModuleList(TransformerBlock(hidden, mlp, heads, 0.0, qkv_bias=False) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))

    def forward(self, x):
        x = self.patch_embedding(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        hidden_states_out = []
        for blk in self.blocks:
            x = blk(x)
            hidden_states_out.append(x)
        return self.norm(x), hidden_states_out

    def checkpoint(self):
        """The state dict with exactly the notes' names (MONAI >= 1.4 adds `norm_cross_attn`, M3D has none)."""
        return {k: v for k, v in self.state_dict().items() if "cross_attn" not in k}


class MedMCTViT(nn.Module):
    """MedM-CLIP-CT's vision tower: vit-pytorch patch embedding + nn.TransformerEncoderLayer (post-norm, ReLU)."""

    def __init__(self, img=(16, 32, 32), patch=(4, 8, 8), hidden=32, mlp=64, layers=2, heads=2):
        super().__init__()
        pf, p1, p2 = patch
        patch_dim = pf * p1 * p2
        n = math.prod(s // p for s, p in zip(img, patch))
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (f pf) (h p1) (w p2) -> b (f h w) (p1 p2 pf c)", p1=p1, p2=p2, pf=pf),
            nn.LayerNorm(patch_dim), nn.Linear(patch_dim, hidden), nn.LayerNorm(hidden))
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, hidden))
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden))
        self.transformer_layers = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, heads, mlp, dropout=0.0, batch_first=True) for _ in range(layers))
        self.mlp_head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden))

    def forward(self, x):
        x = self.to_patch_embedding(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embedding
        hidden_states = []
        for layer in self.transformer_layers:
            x = layer(x)
            hidden_states.append(x)
        return hidden_states


def _randomize(module, seed):
    """Non-trivial values everywhere (LayerNorm weights too), so a wrong mapping cannot match by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_weight = p.ndim == 1 and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if is_norm_weight else 0.0))
    return module


def _write(state, path, extra=True):
    """A full CLIP checkpoint: the vision tower under `vision_encoder.`, plus text-side keys the loader skips."""
    full = {"vision_encoder." + k: v.contiguous() for k, v in state.items()}
    if extra:
        full["language_encoder.embeddings.word_embeddings.weight"] = torch.randn(10, 8)
        full["mm_vision_proj.weight"] = torch.randn(8, 32)
        full["logit_scale"] = torch.tensor(2.0)
    if str(path).endswith(".safetensors"):
        save_file(full, str(path))
    else:
        torch.save(full, path)
    return path


# ---- vit3d ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("select_feature, prefix", [("patch", 0), ("cls_patch", 1)])
def test_vit3d_tiny_geometry(select_feature, prefix):
    enc = vit3d(select_feature=select_feature)
    with torch.no_grad():
        out = enc(volume())
    assert enc.grid == (4, 4, 4)
    assert enc.num_prefix_tokens == prefix
    assert enc.num_tokens == prefix + 64
    assert out.shape == (2, enc.num_tokens, 32)


@pytest.mark.parametrize("fmt", ["m3d", "medm-clip-ct"])
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_vit3d_matches_source_forward(tmp_path, fmt, suffix):
    torch.manual_seed(3)
    ref = _randomize(M3DViT() if fmt == "m3d" else MedMCTViT(), seed=4).eval()
    state = ref.checkpoint() if fmt == "m3d" else ref.state_dict()
    file = _write(state, tmp_path / f"clip{suffix}")
    x = volume(seed=5)
    with torch.no_grad():
        if fmt == "m3d":
            normed, hidden = ref(x)
        else:
            hidden = ref(x)
    settings = {"checkpoint_format": "m3d"} if fmt == "m3d" else MEDM_CT
    for select_layer in (-1, 0):
        for select_feature, drop in (("patch", 1), ("cls_patch", 0)):
            enc = vit3d(seed=9, select_layer=select_layer, select_feature=select_feature, **settings)
            enc.load_pretrained(str(file))
            with torch.no_grad():
                ours = enc(x)
            torch.testing.assert_close(ours, hidden[select_layer][:, drop:], atol=2e-5, rtol=1e-4)
    if fmt == "m3d":  # LaMed's use: the normed last block
        enc = vit3d(seed=9, checkpoint_format="m3d", final_norm=True, select_feature="cls_patch")
        enc.load_pretrained(str(file))
        with torch.no_grad():
            torch.testing.assert_close(enc(x), normed, atol=2e-5, rtol=1e-4)


def test_vit3d_checkpoint_format_requires_its_architecture():
    with pytest.raises(ValueError, match=r"'m3d' is the architecture with norm: 'pre' \(got 'post'\)"):
        vit3d(checkpoint_format="m3d", norm="post")
    with pytest.raises(ValueError, match=r"act: 'relu' \(got 'gelu'\)"):
        vit3d(**{**MEDM_CT, "act": "gelu"})
    with pytest.raises(ValueError, match="unknown checkpoint_format 'lamed'"):
        vit3d(checkpoint_format="lamed")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        vit3d(patch_size=[3, 8, 8])
    with pytest.raises(ValueError, match="select_layer 2 out of range for 2 layers"):
        vit3d(select_layer=2)
    with pytest.raises(ValueError, match="permutation of 'dhwc'"):
        vit3d(patch_order="dhww")


def test_vit3d_load_errors_name_the_file_and_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="vit3d weights not found"):
        vit3d(checkpoint_format="m3d").load_pretrained(str(tmp_path / "nope.bin"))
    with pytest.raises(FileNotFoundError, match="no vit3d weights"):
        vit3d(checkpoint_format="m3d").load_pretrained(str(tmp_path))
    # Another patch size: 4x8x8 = 256 patches, so position embeddings of another length.
    other = _write(M3DViT(patch=(4, 4, 4)).checkpoint(), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"other.safetensors: weight shapes do not fit this vit3d.*"
                                         r"pos_embed: file \(1, 256, 32\) vs model \(1, 64, 32\)"):
        vit3d(checkpoint_format="m3d", image_size=[16, 32, 32]).load_pretrained(str(other))
    # A MedM-CLIP-CT file read as M3D: nothing maps.
    medm = _write(MedMCTViT().state_dict(), tmp_path / "medm.safetensors")
    with pytest.raises(ValueError, match=r"medm.safetensors: not 'm3d' weights of this vit3d: missing"):
        vit3d(checkpoint_format="m3d").load_pretrained(str(medm))
    # Input of another size than the position embeddings were made for.
    with pytest.raises(ValueError, match=r"expected volumes of size \(16, 32, 32\)"):
        vit3d()(volume(size=(16, 32, 16)))


def test_vit3d_real_geometry_on_meta_device():
    """M3D-CLIP's tower: 1x32x256x256 in 4x16x16 patches -> 8x16x16 = 2048 tokens; 87.4M parameters; every
    key of both published checkpoints maps onto a weight of the same shape (no memory, no compute)."""
    cls = VISION.get("vit3d")
    with torch.device("meta"):
        enc = cls(checkpoint_format="m3d", final_norm=True)
        medm = cls(**MEDM_CT)
        m3d_ref = M3DViT(img=(32, 256, 256), patch=(4, 16, 16), hidden=768, mlp=3072, layers=12, heads=12)
        medm_ref = MedMCTViT(img=(32, 256, 256), patch=(4, 16, 16), hidden=768, mlp=3072, layers=12, heads=12)
    assert enc.grid == (8, 16, 16) and enc.num_tokens == 2048 and enc.hidden_size == 768
    assert sum(p.numel() for p in enc.parameters()) == 87_389_184  # M3D-CLIP's vision tower: 87.4M
    for ref, model, n_keys in ((m3d_ref.checkpoint(), enc, 138), (medm_ref.state_dict(), medm, 156)):
        assert len(ref) == n_keys  # the layouts in the notes
        converted, skipped = model.convert_checkpoint({"vision_encoder." + k: v for k, v in ref.items()})
        own = model.state_dict()
        assert sorted(converted) == sorted(own)
        assert all(converted[k].shape == own[k].shape for k in own)
        assert all("mlp_head" in s for s in skipped)
    # Token counts of the 3D connectors on this grid.
    pool = CONNECTOR.build("spatial_pool", in_dim=768, out_dim=2048, grid=enc.grid, stride=2)
    assert pool.out_grid == (4, 8, 8) and pool.num_tokens == 256
    with torch.device("meta"):
        both = cls(checkpoint_format="m3d", select_feature="cls_patch")
        attn = CONNECTOR.build("attention_pool", in_dim=768, out_dim=2048, grid=both.grid,
                               num_prefix_tokens=both.num_prefix_tokens, num_queries=256, num_heads=8)
    assert both.num_tokens == 2049 and attn.num_tokens == 256
    keep = CONNECTOR.build("spatial_pool", in_dim=768, out_dim=2048, grid=both.grid,
                           num_prefix_tokens=both.num_prefix_tokens, stride=[1, 4, 4], prefix="keep")
    assert keep.num_tokens == 1 + 8 * 4 * 4


def test_vit3d_gradient_checkpointing_gives_the_same_gradients():
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    x = volume(batch=1)
    grads = []
    for ckpt in (False, True):
        enc = vit3d(seed=2).train()
        enc.gradient_checkpointing = ckpt
        enc._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        enc(x).square().mean().backward()
        grads.append(enc.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# ---- slices ---------------------------------------------------------------------------------------------------------
def slices(seed=0, **overrides):
    torch.manual_seed(seed)
    cls = VISION.get("slices")
    cfg = tiny_vision("slices")
    cfg["encoder"].update(overrides.pop("encoder", {}))
    cfg = cls.resolve_config({**cfg, **overrides})
    return cls, cfg, cls(**cfg).eval()


@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
def test_slices_runs_the_2d_encoder_on_each_slice(select_feature):
    cls, cfg, enc = slices(encoder={"select_feature": select_feature})
    p = 1 if select_feature == "cls_patch" else 0
    assert enc.grid == (4, 4, 4) and enc.num_prefix_tokens == 4 * p and enc.hidden_size == 32
    x = volume(batch=2, size=(4, 32, 32), channels=3)
    with torch.no_grad():
        out = enc(x)
        per_slice = [enc.encoder(x[:, :, i]) for i in range(4)]  # (B, P + 16, D) each
    assert out.shape == (2, enc.num_tokens, 32) and enc.num_tokens == 4 * p + 64
    expected = torch.cat([s[:, :p] for s in per_slice] + [s[:, p:] for s in per_slice], dim=1)
    torch.testing.assert_close(out, expected)


def test_slices_preprocessor_is_volume_then_2d_normalisation(tmp_path):
    import numpy as np

    cls, cfg, enc = slices()
    pre = cls.preprocessor(cfg)
    vol = np.full((6, 20, 24), 255, dtype=np.uint8)
    vol[3:] = 0
    np.save(tmp_path / "ct.npy", vol)
    x = pre(str(tmp_path / "ct.npy"))
    # tiny clip: 3 channels of 32x32, 4 slices; OpenAI CLIP's mean / std.
    assert x.shape == (3, 4, 32, 32)
    mean = torch.tensor(cfg["encoder"]["image_mean"]).view(3, 1, 1, 1)
    std = torch.tensor(cfg["encoder"]["image_std"]).view(3, 1, 1, 1)
    # Back to [0, 1]: intensity auto takes a volume without air for MR (percentiles): 255 -> 1, 0 -> 0.
    raw = x * std + mean
    torch.testing.assert_close(raw[:, 0], torch.full((3, 32, 32), 1.0))
    torch.testing.assert_close(raw[:, -1], torch.full((3, 32, 32), 0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(pre.blank(), ((torch.zeros(3, 4, 32, 32) - mean) / std))


def test_slices_rejects_bad_inner_encoders():
    with pytest.raises(ValueError, match="needs `encoder`"):
        VISION.get("slices")(encoder={"config": {}})
    with pytest.raises(ValueError, match="must be a 2D encoder"):
        VISION.get("slices")(encoder={"name": "vit3d", **TINY})


def test_slices_real_geometry_on_meta_device():
    """MedM-VL-CT-Chest: SigLIP at 384 px, patch 14 (27x27) on 32 slices; a [2, 3, 3] pool gives 16x9x9 tokens."""
    cfg = {"encoder": {"name": "siglip", "config": {"image_size": 384, "patch_size": 14, "hidden_size": 1152,
                                                    "intermediate_size": 4304, "num_hidden_layers": 27,
                                                    "num_attention_heads": 16, "vision_use_head": False}},
           "num_slices": 32}
    cls = VISION.get("slices")
    cfg = cls.resolve_config(cfg)
    with torch.device("meta"):
        enc = cls(**cfg)
    assert enc.grid == (32, 27, 27) and enc.num_tokens == 32 * 729 and enc.hidden_size == 1152
    pool = CONNECTOR.build("spatial_pool", in_dim=1152, out_dim=2048, grid=enc.grid, stride=[2, 3, 3])
    assert pool.num_tokens == 16 * 9 * 9
    pre = cls.preprocessor(cfg)
    assert pre.size == (32, 384, 384) and pre.channels == 3 and pre.mean == (0.5, 0.5, 0.5)
