"""Connectors: token counts, pooling values, attention layouts (MedM-VL 1:1), position embeddings, end to end."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medm.config import ConfigError
from medm.models import build_model, load_model, parse_model_args, save_model
from medm.models.connectors._posembed import sincos_pos_embed
from medm.models.connectors.attention_pool import AttentionPoolConnector
from medm.models.connectors.spatial_pool import SpatialPoolConnector
from medm.models.tiny import TINY_CONNECTOR, tiny_model_config
from medm.registry import CONNECTOR


def _grid_features(x: torch.Tensor) -> torch.Tensor:
    """(B, D, *grid) -> (B, prod(grid), D), row-major like a ViT's patch flattening."""
    return x.flatten(2).transpose(1, 2)


def _mha_by_hand(q, k, v, mha: nn.MultiheadAttention) -> torch.Tensor:
    """Batch-first multi-head attention written out from `mha`'s weights: (B, Lq, E), (B, Lk, E) -> (B, Lq, E)."""
    e, h = mha.embed_dim, mha.num_heads
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)

    def heads(x, w, b):
        return (x @ w.T + b).unflatten(-1, (h, e // h)).transpose(1, 2)  # (B, h, L, e/h)

    qh, kh, vh = heads(q, wq, bq), heads(k, wk, bk), heads(v, wv, bv)
    att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(e // h), dim=-1)
    out = (att @ vh).transpose(1, 2).flatten(2)
    return out @ mha.out_proj.weight.T + mha.out_proj.bias


def _mae_2d_sincos(dim: int, h: int, w: int) -> np.ndarray:
    """MAE / Qwen-VL `get_2d_sincos_pos_embed` (non-square written out): w half first, then h."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)


# ---- spatial_pool ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid, stride, out_grid", [
    ((4, 4), 2, (2, 2)),
    ((8, 16, 16), 2, (4, 8, 8)),  # M3D-CLIP geometry: 256 tokens, as MedM-VL
    ((2, 4, 6), [1, 2, 3], (2, 2, 2)),
    ((6,), 3, (2,)),
])
def test_spatial_pool_shapes_and_num_tokens(grid, stride, out_grid):
    con = SpatialPoolConnector(8, 12, grid, stride=stride)
    x = torch.randn(2, math.prod(grid), 8)
    assert con.out_grid == out_grid
    assert con.num_tokens == math.prod(out_grid)
    assert con(x).shape == (2, con.num_tokens, 12)


def test_spatial_pool_m3d_geometry_is_256_tokens():
    con = CONNECTOR.build("spatial_pool", in_dim=16, out_dim=32, grid=(8, 16, 16), stride=2)
    assert con.num_tokens == 256
    assert con(torch.randn(1, 2048, 16)).shape == (1, 256, 32)


def test_spatial_pool_reads_the_grid_row_major():
    # grid (2, 4), D = 1: rows [0 1 2 3] and [4 5 6 7]; 2x2 windows average {0,1,4,5} and {2,3,6,7}.
    con = SpatialPoolConnector(1, 4, (2, 4), stride=2)
    x = torch.arange(8.0).view(1, 8, 1)
    assert con.pool(x).flatten().tolist() == [2.5, 4.5]


@pytest.mark.parametrize("pool, grid, ref", [
    ("avg", (4, 6), F.avg_pool2d),
    ("avg", (4, 4, 6), F.avg_pool3d),
    ("max", (4, 6), F.max_pool2d),
    ("max", (4, 4, 6), F.max_pool3d),
    ("avg", (6,), F.avg_pool1d),
])
def test_spatial_pool_values_match_torch(pool, grid, ref):
    torch.manual_seed(0)
    con = SpatialPoolConnector(5, 7, grid, pool=pool, stride=2)
    x = torch.randn(3, 5, *grid)
    expected = _grid_features(ref(x, kernel_size=2, stride=2))
    pooled = con.pool(_grid_features(x))
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(con(_grid_features(x)), con.mlp(expected))


def test_spatial_pool_per_axis_stride_keeps_depth():
    torch.manual_seed(0)
    con = SpatialPoolConnector(3, 4, (2, 4, 4), stride=[1, 2, 2])
    x = torch.randn(1, 3, 2, 4, 4)
    expected = _grid_features(F.avg_pool3d(x, kernel_size=(1, 2, 2), stride=(1, 2, 2)))
    torch.testing.assert_close(con.pool(_grid_features(x)), expected)
    assert con.num_tokens == 8


def test_spatial_pool_prefix_drop_and_keep():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    cls = torch.randn(2, 1, 3)
    feats = torch.cat([cls, _grid_features(x)], dim=1)  # CLS first, as `select_feature: cls_patch`
    pooled = _grid_features(F.avg_pool2d(x, 2))

    drop = SpatialPoolConnector(3, 6, (4, 4), num_prefix_tokens=1, prefix="drop")
    assert drop.num_tokens == 4
    torch.testing.assert_close(drop.pool(feats), pooled)
    assert drop(feats).shape == (2, 4, 6)

    keep = SpatialPoolConnector(3, 6, (4, 4), num_prefix_tokens=1, prefix="keep")
    assert keep.num_tokens == 5
    torch.testing.assert_close(keep.pool(feats), torch.cat([cls, pooled], dim=1))
    out = keep(feats)
    assert out.shape == (2, 5, 6)
    torch.testing.assert_close(out[:, :1], keep.mlp(cls))


def test_spatial_pool_uneven_grid():
    with pytest.raises(ValueError, match=r"grid \(5, 5\) is not divisible by stride \(2, 2\).*uneven"):
        SpatialPoolConnector(2, 4, (5, 5), stride=2)
    floor = SpatialPoolConnector(2, 4, (5, 5), stride=2, uneven="floor")
    ceil = SpatialPoolConnector(2, 4, (5, 5), stride=2, uneven="ceil")
    assert (floor.num_tokens, ceil.num_tokens) == (4, 9)
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(floor.pool(_grid_features(x)), _grid_features(F.avg_pool2d(x, 2)))
    out = ceil.pool(_grid_features(x)).transpose(1, 2).reshape(1, 2, 3, 3)
    # Edge windows pool only the patches they cover: no zero padding dilutes the average.
    torch.testing.assert_close(out[..., 2, 2], x[..., 4, 4])
    torch.testing.assert_close(out[..., 0, 2], x[..., 0:2, 4].mean(-1))
    torch.testing.assert_close(out[..., 0, 0], x[..., 0:2, 0:2].mean((-1, -2)))


@pytest.mark.parametrize("kwargs, message", [
    ({"pool": "median"}, "unknown pool 'median'; known: avg, max"),
    ({"prefix": "merge"}, "unknown prefix 'merge'"),
    ({"uneven": "round"}, "unknown uneven 'round'"),
    ({"stride": [2, 2, 2]}, "one per axis of grid"),
    ({"stride": 0}, "positive int"),
    ({"stride": 8}, "larger than grid"),
    ({"mlp_type": "conv"}, "unknown MLP type 'conv'"),
])
def test_spatial_pool_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpatialPoolConnector(4, 4, (4, 4), **kwargs)


def test_spatial_pool_rejects_wrong_token_count():
    con = SpatialPoolConnector(4, 4, (4, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"expected features \(B, 17, D\).*got \(1, 16, 4\)"):
        con(torch.randn(1, 16, 4))


# ---- sin-cos position embeddings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("grid, dim", [((4, 4), 16), ((3, 5), 8), ((2, 3, 4), 32), ((2, 3, 4), 12), ((7,), 6)])
def test_sincos_deterministic_and_distinct(grid, dim):
    a, b = sincos_pos_embed(grid, dim), sincos_pos_embed(grid, dim)
    assert a.shape == (math.prod(grid), dim)
    assert torch.equal(a, b)
    dist = torch.cdist(a, a) + torch.eye(a.shape[0]) * 1e3
    assert dist.min() > 1e-3, "two grid positions share an embedding"


def test_sincos_2d_equals_mae_and_qwen_vl():
    ours = sincos_pos_embed((3, 5), 16)
    torch.testing.assert_close(ours, torch.from_numpy(_mae_2d_sincos(16, 3, 5)).float())


def test_sincos_3d_layout_and_padding():
    # 32 channels over 3 axes: 10 per axis (w, h, d), 2 zero channels at the end.
    emb = sincos_pos_embed((2, 3, 4), 32).view(2, 3, 4, 32)
    assert torch.equal(emb[..., 30:], torch.zeros(2, 3, 4, 2))
    # The w block depends on w only, the d block on d only.
    assert torch.equal(emb[0, 0, :, :10], emb[1, 2, :, :10])
    assert torch.equal(emb[:, 0, 0, 20:30], emb[:, 2, 3, 20:30])
    assert not torch.equal(emb[0, 0, 0, 20:30], emb[1, 0, 0, 20:30])


def test_sincos_too_narrow():
    with pytest.raises(ValueError, match="needs width >= 6"):
        sincos_pos_embed((2, 2, 2), 4)


# ---- attention_pool ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["qwen", "medm-vl"])
@pytest.mark.parametrize("grid, num_queries", [((4, 4), 4), ((4, 4), 5), ((2, 4, 4), 8), ((2, 4, 4), 6)])
def test_attention_pool_shapes(layout, grid, num_queries):
    con = AttentionPoolConnector(16, 24, grid, num_queries=num_queries, num_heads=2, layout=layout)
    assert con.num_tokens == num_queries
    assert con(torch.randn(3, math.prod(grid), 16)).shape == (3, num_queries, 24)


def test_attention_pool_default_is_256_queries_8_heads():
    con = CONNECTOR.build("attention_pool", in_dim=32, out_dim=48, grid=(8, 16, 16))
    assert con.num_tokens == 256 and con.attn.num_heads == 8 and con.layout == "qwen"
    assert con(torch.randn(1, 2048, 32)).shape == (1, 256, 48)


@pytest.mark.parametrize("grid, num_queries, query_grid", [
    ((4, 4), 4, (2, 2)), ((4, 4), 16, (4, 4)), ((4, 4), 5, None),
    ((2, 4, 4), 8, (2, 2, 2)), ((2, 4, 4), 64, (4, 4, 4)), ((2, 4, 4), 16, None),
])
def test_attention_pool_query_positions_only_for_square_or_cube(grid, num_queries, query_grid):
    con = AttentionPoolConnector(24, 8, grid, num_queries=num_queries, num_heads=2)
    assert con.query_grid == query_grid
    qpos = con.query_pos_embed()
    if query_grid is None:
        assert qpos is None
    else:
        torch.testing.assert_close(qpos, sincos_pos_embed(query_grid, 24))


@pytest.mark.parametrize("width, prefix", [(None, 0), (16, 1)])
def test_attention_pool_qwen_forward_by_hand(width, prefix):
    torch.manual_seed(0)
    grid, in_dim = (2, 2, 4), 24
    con = AttentionPoolConnector(in_dim, 12, grid, num_prefix_tokens=prefix, num_queries=8, num_heads=4,
                                 width=width).eval()
    w = width or in_dim
    for p in con.parameters():  # move LayerNorms off identity so the test sees them
        nn.init.normal_(p, std=0.3)
    feats = torch.randn(2, prefix + 16, in_dim)

    kv = feats @ con.kv_proj.weight.T if width else feats
    kv = F.layer_norm(kv, (w,), con.ln_kv.weight, con.ln_kv.bias, eps=1e-6)
    kpos = torch.cat([torch.zeros(prefix, w), sincos_pos_embed(grid, w)])
    q = F.layer_norm(con.query, (w,), con.ln_q.weight, con.ln_q.bias, eps=1e-6) + sincos_pos_embed((2, 2, 2), w)
    out = _mha_by_hand(q.expand(2, -1, -1), kv + kpos, kv, con.attn)
    out = F.layer_norm(out, (w,), con.ln_post.weight, con.ln_post.bias, eps=1e-6)
    expected = con.mlp(out)
    with torch.no_grad():
        torch.testing.assert_close(con(feats), expected, atol=1e-5, rtol=1e-4)


def test_attention_pool_qwen_kv_proj_and_keys_see_positions():
    con = AttentionPoolConnector(24, 8, (4, 4), num_queries=4, num_heads=2, width=16)
    assert isinstance(con.kv_proj, nn.Linear) and con.kv_proj.bias is None
    assert tuple(con.kv_proj.weight.shape) == (16, 24)
    assert isinstance(AttentionPoolConnector(24, 8, (4, 4), num_queries=4, num_heads=2).kv_proj, nn.Identity)
    # Identical features at every patch: only the position embedding tells the keys apart, so the
    # output must change when the grid (and thus the keys' positions) is read differently.
    torch.manual_seed(0)
    a = AttentionPoolConnector(16, 8, (4, 4), num_queries=4, num_heads=2).eval()
    b = AttentionPoolConnector(16, 8, (2, 8), num_queries=4, num_heads=2).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


class _MedMVLAttnPooling(nn.Module):
    """MedM-VL's `AttnPooling` as in their repo (lvlm/model/connector/attn_pooling.py), written independently."""

    def __init__(self, d_enc, d_llm, n_queries=256, n_head=8):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_enc))
        self.attn = nn.MultiheadAttention(embed_dim=d_enc, num_heads=n_head, batch_first=True)
        self.connector = nn.Sequential(nn.Linear(d_enc, d_llm), nn.GELU(), nn.Linear(d_llm, d_llm))

    def forward(self, x):
        q = self.query.unsqueeze(0).repeat(x.shape[0], 1, 1)
        x, _ = self.attn(q, x, x)
        return self.connector(x)


def test_attention_pool_medm_vl_state_dict_keys():
    con = AttentionPoolConnector(32, 48, (2, 4, 4), num_queries=16, layout="medm-vl")
    sd = con.state_dict()
    assert list(sd) == ["query", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                        "attn.out_proj.bias", "connector.0.weight", "connector.0.bias", "connector.2.weight",
                        "connector.2.bias"]
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["query"] == (16, 32) and shapes["attn.in_proj_weight"] == (96, 32)
    assert shapes["connector.0.weight"] == (48, 32) and shapes["connector.2.weight"] == (48, 48)
    assert con.attn.num_heads == 8 and con.attn.batch_first


def test_attention_pool_medm_vl_matches_their_module():
    torch.manual_seed(0)
    ref = _MedMVLAttnPooling(32, 48, n_queries=16).eval()
    con = AttentionPoolConnector(32, 48, (2, 4, 4), num_queries=16, layout="medm-vl").eval()
    con.load_state_dict(ref.state_dict(), strict=True)  # their checkpoint keys load unchanged
    feats = torch.randn(2, 32, 32)
    with torch.no_grad():
        ours = con(feats)
        torch.testing.assert_close(ours, ref(feats))
        by_hand = con.connector(_mha_by_hand(con.query.expand(2, -1, -1), feats, feats, con.attn))
        torch.testing.assert_close(ours, by_hand, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"layout": "perceiver"}, "unknown layout 'perceiver'; known: qwen, medm-vl"),
    ({"num_heads": 5}, "num_heads 5 must divide the attention width 16"),
    ({"num_queries": 0}, "num_queries must be >= 1"),
    ({"layout": "medm-vl", "width": 8}, "`width` must be null"),
    ({"mlp_type": "mlp2x_tanh"}, "unknown activation 'tanh'"),
    ({"width": 2, "num_heads": 1}, "needs width >= 4"),
    ({"width": 0}, "width must be >= 1 or null"),  # two sin-cos channels per grid axis at least
])
def test_attention_pool_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttentionPoolConnector(16, 8, (4, 4), **{"num_queries": 4, **kwargs})


# ---- every connector: gradients, builder, end to end ---------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs", [
    ("spatial_pool", {"prefix": "keep"}),
    ("spatial_pool", {"pool": "max"}),
    ("attention_pool", {"num_queries": 4, "num_heads": 2}),
    ("attention_pool", {"num_queries": 5, "num_heads": 2, "width": 8}),
    ("attention_pool", {"num_queries": 4, "num_heads": 2, "layout": "medm-vl"}),
])
def test_backward_reaches_every_parameter(name, kwargs):
    torch.manual_seed(0)
    con = CONNECTOR.build(name, in_dim=16, out_dim=8, grid=(2, 4, 4), num_prefix_tokens=1, **kwargs)
    con(torch.randn(2, 33, 16)).square().sum().backward()
    no_grad = [n for n, p in con.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize("name, kwargs", [
    ("spatial_pool", {"uneven": "ceil", "stride": [2, 3, 3]}),
    ("spatial_pool", {"pool": "max", "prefix": "keep"}),
    ("attention_pool", {"num_queries": 8, "num_heads": 2}),
    ("attention_pool", {"num_queries": 8, "num_heads": 2, "layout": "medm-vl"}),
])
def test_bfloat16_models_run_and_keep_their_dtype(name, kwargs):
    con = CONNECTOR.build(name, in_dim=16, out_dim=8, grid=(4, 4, 4), num_prefix_tokens=1, **kwargs)
    x = torch.randn(2, 65, 16)
    out = con.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (2, con.num_tokens, 8)
    torch.testing.assert_close(out.float(), con.float()(x), atol=0.1, rtol=0.1)


def test_every_registered_connector_has_a_tiny_preset():
    assert set(CONNECTOR.names()) <= set(TINY_CONNECTOR)


def test_yaml_keys_are_the_constructor_arguments():
    cfg = tiny_model_config(connector={"name": "spatial_pool", "pool": "max", "stride": [2, 2], "bogus": 1})
    with pytest.raises(ConfigError, match=r"connector.bogus: unknown key for 'spatial_pool'; valid keys: name, pool, "
                                          r"stride, mlp_type, prefix, uneven"):
        parse_model_args(cfg)
    cfg = tiny_model_config(connector={"name": "attention_pool", "heads": 2})
    with pytest.raises(ConfigError, match=r"connector.heads: unknown key for 'attention_pool'; did you mean "
                                          r"num_heads\?"):
        parse_model_args(cfg)


# Tiny CLIP: 32 px images, patch 8 -> a 4x4 grid of 32-wide features.
@pytest.mark.parametrize("connector, tokens", [
    ({"name": "spatial_pool", **TINY_CONNECTOR["spatial_pool"]}, 4),
    ({"name": "spatial_pool", "pool": "max", "stride": [1, 2], "mlp_type": "linear"}, 8),
    ({"name": "attention_pool", **TINY_CONNECTOR["attention_pool"]}, 4),
    ({"name": "attention_pool", "num_queries": 3, "num_heads": 2, "layout": "medm-vl"}, 3),
])
def test_end_to_end_in_tiny_model(connector, tokens):
    torch.manual_seed(0)
    model, tok = build_model(tiny_model_config(connector=connector))
    model.eval()
    n = model.num_image_tokens
    assert n == model.connector.num_tokens == tokens
    ids = tok("<image>" * n + "Is there a lesion?", return_tensors="pt").input_ids
    px = torch.randn(1, 3, 32, 32)
    out = model(input_ids=ids, pixel_values=px, labels=ids)
    assert out.image_features.shape == (1, n, model.config.text_config.hidden_size)
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="tokens and image features do not match"):
        model(input_ids=ids[:, 1:], pixel_values=px)


@pytest.mark.parametrize("name", ["spatial_pool", "attention_pool"])
def test_save_and_reload_gives_the_same_features(name, tmp_path):
    # Position embeddings are computed, not stored: a reload (HF builds on the meta device) must still match.
    torch.manual_seed(0)
    model, tok = build_model(tiny_model_config(connector={"name": name, **TINY_CONNECTOR[name]}))
    save_model(model, tok, str(tmp_path))
    again, _ = load_model(str(tmp_path))
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.eval().get_image_features(px), model.eval().get_image_features(px))
    assert again.num_image_tokens == model.num_image_tokens
