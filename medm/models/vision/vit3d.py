"""A native 3D ViT (`vision3d.name: vit3d`) in the M3D-CLIP geometry, loading M3D-CLIP or MedM-CLIP-CT weights.

Input `(B, C, D, H, W)` is cut into `patch_size` patches; token order is the patch grid `(gd, gh, gw)` row-major.
The two published towers differ in switches that are all config fields (defaults are M3D-CLIP's):

| field           | M3D-CLIP (MONAI ViT) | MedM-CLIP-CT (vit-pytorch + nn.TransformerEncoderLayer) |
|-----------------|----------------------|---------------------------------------------------------|
| `patch_order`   | `dhwc`               | `hwdc`  (order of the values inside a flattened patch)  |
| `patch_norm`    | false                | true    (LayerNorm before and after the patch Linear)   |
| `cls_pos_embed` | false (patches only) | true    (CLS prepended first, then + pos embed)         |
| `norm`          | `pre`                | `post`                                                  |
| `act`           | `gelu` (exact)       | `relu`                                                  |
| `qkv_bias`      | false                | true                                                    |
| `final_norm`    | its `norm`, optional | false   (it has none)                                   |

Their inputs (the `volume:` settings to match, see `medm.data.volumes`): M3D-CLIP takes volumes min-max scaled to
[0, 1] (`intensity: minmax`); MedM-CLIP-CT standardises the raw volume, then crops the foreground and resizes
(`intensity: standardize`, `standardize: [55.6982188356434, 66.1943479570918]`, `crop_foreground: true`).

`checkpoint_format` says which names a weights file uses (`m3d`, `medm-clip-ct`, or `native`: this module's own
`state_dict`) and requires the matching switches above, so a file is never loaded into the wrong architecture.
Both checkpoints keep the vision tower under `vision_encoder.`; their text tower, projections, `logit_scale` and
MedM-CLIP-CT's `mlp_head` are skipped.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from medm.config import to_dict
from medm.data._medm_vl_ct import MedMVLVolumePreprocess
from medm.data.volumes import VolumePreprocess, parse_volume_args
from medm.models.vision._base import VisionEncoder, select_features
from medm.models.vision._features import check_select_feature, check_select_layer
from medm.registry import VISION

logger = logging.getLogger(__name__)

_ACT = {"gelu": nn.GELU, "relu": nn.ReLU}
_NORM = ("pre", "post")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CHECKPOINT_PREFIX = "vision_encoder."

# The architecture switches each checkpoint format implies (checked at construction).
FORMAT_SWITCHES: dict[str, dict[str, Any]] = {
    "m3d": {"patch_order": "dhwc", "patch_norm": False, "cls_pos_embed": False, "norm": "pre", "act": "gelu",
            "qkv_bias": False, "class_token": True},
    "medm-clip-ct": {"patch_order": "hwdc", "patch_norm": True, "cls_pos_embed": True, "norm": "post", "act": "relu",
                     "qkv_bias": True, "class_token": True, "final_norm": False},
    "native": {},
}

# Source name (after `vision_encoder.`) -> native name, as (regex, replacement) tried in order.
_RENAMES: dict[str, list[tuple[str, str]]] = {
    "m3d": [
        (r"cls_token", "cls_token"),
        (r"patch_embedding\.position_embeddings", "pos_embed"),
        (r"patch_embedding\.patch_embeddings\.1\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
        (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
        (r"blocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (r"blocks\.(\d+)\.mlp\.linear1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (r"blocks\.(\d+)\.mlp\.linear2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"norm\.(weight|bias)", r"norm.\1"),
    ],
    "medm-clip-ct": [
        (r"cls_token", "cls_token"),
        (r"pos_embedding", "pos_embed"),
        (r"to_patch_embedding\.1\.(weight|bias)", r"patch_embed.norm_in.\1"),
        (r"to_patch_embedding\.2\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"to_patch_embedding\.3\.(weight|bias)", r"patch_embed.norm_out.\1"),
        (r"transformer_layers\.(\d+)\.self_attn\.in_proj_weight", r"blocks.\1.attn.qkv.weight"),
        (r"transformer_layers\.(\d+)\.self_attn\.in_proj_bias", r"blocks.\1.attn.qkv.bias"),
        (r"transformer_layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (r"transformer_layers\.(\d+)\.linear1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (r"transformer_layers\.(\d+)\.linear2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"transformer_layers\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    ],
}


def _triple(value: int | list[int] | tuple[int, ...], name: str) -> tuple[int, int, int]:
    out = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"vit3d: {name} must be one positive int or three (D, H, W), got {value!r}")
    return out


class PatchEmbed3D(nn.Module):
    """(B, C, D, H, W) -> (B, gd*gh*gw, hidden): flatten each patch in `order`, [LayerNorm], Linear, [LayerNorm].

    `order` is a permutation of `dhwc` naming how the values inside one patch are flattened: `dhwc` is
    einops `b c (gd pd) (gh ph) (gw pw) -> b (gd gh gw) (pd ph pw c)`.
    """

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int, order: str,
                 norm: bool, eps: float):
        super().__init__()
        if sorted(order) != sorted("dhwc"):
            raise ValueError(f"vit3d: patch_order {order!r} must be a permutation of 'dhwc'")
        self.patch_size = patch_size
        # Axes of the (B, C, gd, pd, gh, ph, gw, pw) view: the grid first, then the patch values in `order`.
        self.perm = (0, 2, 4, 6) + tuple({"c": 1, "d": 3, "h": 5, "w": 7}[a] for a in order)
        patch_dim = in_channels * math.prod(patch_size)
        self.norm_in = nn.LayerNorm(patch_dim, eps=eps) if norm else None
        self.proj = nn.Linear(patch_dim, hidden_size)
        self.norm_out = nn.LayerNorm(hidden_size, eps=eps) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        pd, ph, pw = self.patch_size
        x = x.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw).permute(*self.perm)
        x = x.reshape(b, (d // pd) * (h // ph) * (w // pw), -1)
        if self.norm_in is not None:
            x = self.norm_in(x)
        x = self.proj(x)
        return self.norm_out(x) if self.norm_out is not None else x


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv Linear (rows [q | k | v] x head x head_dim) and `proj`."""

    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as both sources
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_dim)
        self.act = _ACT[act]()
        self.fc2 = nn.Linear(mlp_dim, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm `x + attn(norm1(x))`, `x + mlp(norm2(x))`; or post-norm `norm1(x + attn(x))`, `norm2(x + mlp(x))`
    (PyTorch's `nn.TransformerEncoderLayer` with `norm_first=False`)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int, act: str, qkv_bias: bool, pre_norm: bool,
                 eps: float):
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.attn = Attention(hidden_size, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = Mlp(hidden_size, mlp_dim, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


@VISION.register("vit3d")
class ViT3DEncoder(VisionEncoder):
    """A 3D ViT over `(B, C, D, H, W)` volumes; features are the output of block `select_layer`.

    Args:
        image_size: input `(D, H, W)` (one int for a cube); M3D-CLIP: 32 x 256 x 256.
        patch_size: `(pd, ph, pw)`; M3D-CLIP: 4 x 16 x 16, a grid of 8 x 16 x 16 = 2048 patches.
        in_channels: input channels C.
        hidden_size, num_layers, num_heads, mlp_dim: transformer size (M3D-CLIP: 768, 12, 12, 3072).
        norm: `pre` or `post` (LayerNorm placement in the blocks). act: `gelu` (exact) or `relu`.
        qkv_bias: bias on the fused qkv projection.
        class_token: prepend a learned CLS token.
        cls_pos_embed: the position embedding has a slot for CLS (added after prepending it); false: patches only
            (CLS is prepended after the position embedding).
        patch_order: how values inside a patch are flattened for the patch Linear, a permutation of `dhwc`.
        patch_norm: LayerNorm on the flattened patch and on its embedding (vit-pytorch's patch embedding).
        final_norm: a final LayerNorm applied to the output of the last block (when `select_layer` picks it), as
            LaMed uses M3D-CLIP; MedM-VL takes the last block before that norm (false).
        layer_norm_eps: epsilon of every LayerNorm.
        select_layer: which block's output, counted from 0 (the first block); negative counts from the end
            (-1: last block). As MedM-VL's `hidden_states[select_layer]` over the block outputs.
        select_feature: `patch` (grid tokens) or `cls_patch` (CLS first, then the grid).
        checkpoint_format: names in the weights file: `m3d`, `medm-clip-ct` or `native`; see the module docstring.
        path: local weights: `.safetensors` or a `torch.save` state dict (loaded with `weights_only`), or a directory
            with `model.safetensors` / `pytorch_model.bin`. Loaded by the model builder.
        volume: volume reading and preprocessing (`medm.data.volumes.VolumeArgs` keys); the output size is
            `image_size`.
        medm_vl_ct: `hu` or `stored`: read MedM-VL's CT `.npy` volumes with MedM-VL's own dataset and processor
            steps for this `checkpoint_format` (`m3d`, `medm-clip-ct`; `medm.data._medm_vl_ct`) instead of
            `volume`'s; set by `medm import medm-vl`. null: `volume`.
    """

    def __init__(self, image_size: int | list[int] = (32, 256, 256), patch_size: int | list[int] = (4, 16, 16),
                 in_channels: int = 1, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 mlp_dim: int = 3072, norm: str = "pre", act: str = "gelu", qkv_bias: bool = False,
                 class_token: bool = True, cls_pos_embed: bool = False, patch_order: str = "dhwc",
                 patch_norm: bool = False, final_norm: bool = False, layer_norm_eps: float = 1e-5,
                 select_layer: int = -1, select_feature: str = "patch", checkpoint_format: str = "native",
                 path: str | None = None, volume: dict | None = None, medm_vl_ct: str | None = None):
        super().__init__()
        del path, volume  # weights come via load_pretrained; `volume` is read by `preprocessor(cfg)`
        if medm_vl_ct not in (None, "hu", "stored") or (medm_vl_ct and checkpoint_format == "native"):
            raise ValueError(f"vit3d: medm_vl_ct must be hu, stored or null, with checkpoint_format m3d or "
                             f"medm-clip-ct; got {medm_vl_ct!r} with {checkpoint_format!r}")
        check_select_feature(select_feature)
        check_select_layer(select_layer)
        image_size, patch_size = _triple(image_size, "image_size"), _triple(patch_size, "patch_size")
        if any(s % p for s, p in zip(image_size, patch_size)):
            raise ValueError(f"vit3d: image_size {image_size} is not divisible by patch_size {patch_size}")
        if norm not in _NORM:
            raise ValueError(f"vit3d: unknown norm {norm!r}; known: {', '.join(_NORM)}")
        if act not in _ACT:
            raise ValueError(f"vit3d: unknown act {act!r}; known: {', '.join(_ACT)}")
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"vit3d: num_heads {num_heads} must divide hidden_size {hidden_size}")
        if cls_pos_embed and not class_token:
            raise ValueError("vit3d: cls_pos_embed needs class_token: true")
        if not -num_layers <= select_layer < num_layers:
            raise ValueError(f"vit3d: select_layer {select_layer} out of range for {num_layers} layers "
                             f"({-num_layers}..{num_layers - 1})")
        if checkpoint_format not in FORMAT_SWITCHES:
            raise ValueError(f"vit3d: unknown checkpoint_format {checkpoint_format!r}; known: "
                             f"{', '.join(FORMAT_SWITCHES)}")
        given = {"patch_order": patch_order, "patch_norm": patch_norm, "cls_pos_embed": cls_pos_embed, "norm": norm,
                 "act": act, "qkv_bias": qkv_bias, "class_token": class_token, "final_norm": final_norm}
        wrong = {k: v for k, v in FORMAT_SWITCHES[checkpoint_format].items() if given[k] != v}
        if wrong:
            listing = ", ".join(f"{k}: {v!r} (got {given[k]!r})" for k, v in wrong.items())
            raise ValueError(f"vit3d: checkpoint_format {checkpoint_format!r} is the architecture with {listing}")
        self.image_size, self.patch_size = image_size, patch_size
        self.checkpoint_format = checkpoint_format
        self.select_layer = select_layer % num_layers
        self.select_feature = select_feature
        self.cls_pos_embed = cls_pos_embed
        self.num_cls = 1 if class_token else 0
        self.hidden_size = hidden_size
        self.grid = tuple(s // p for s, p in zip(image_size, patch_size))
        self.num_prefix_tokens = self.num_cls if select_feature == "cls_patch" else 0
        self.gradient_checkpointing = False  # set by transformers' gradient_checkpointing_enable()

        self.patch_embed = PatchEmbed3D(patch_size, in_channels, hidden_size, patch_order, patch_norm, layer_norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if class_token else None
        n_pos = math.prod(self.grid) + (1 if cls_pos_embed else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, hidden_size))
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, mlp_dim, act, qkv_bias, norm == "pre",
                                          layer_norm_eps) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if final_norm else None
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            if self.cls_token is not None:
                nn.init.trunc_normal_(self.cls_token, std=0.02)

    # ---- config and preprocessing -----------------------------------------------------------------------------
    @classmethod
    def tiny(cls, section: dict[str, Any] | None = None) -> dict[str, Any]:
        # a 16x32x32 volume in 4x8x8 patches: grid 4x4x4 = 64
        return {"image_size": [16, 32, 32], "patch_size": [4, 8, 8], "hidden_size": 32, "num_layers": 2,
                "num_heads": 2, "mlp_dim": 64}

    @classmethod
    def resolve_config(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """Every architecture and volume setting filled in (defaults written out), so the saved config alone
        rebuilds the encoder and its preprocessing even if a default changes later."""
        out = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
               if k not in ("self", "path", "volume")}
        out.update(cfg)
        for key in ("image_size", "patch_size"):
            out[key] = list(_triple(out[key], key))
        out["volume"] = to_dict(parse_volume_args(cfg.get("volume"), "vision3d.volume"))
        return out

    @classmethod
    def preprocessor(cls, cfg: dict[str, Any]):
        """The volume preprocessing: path -> (in_channels, D, H, W) float32 (`medm.data.volumes.VolumePreprocess`)."""
        cfg = cls.resolve_config(cfg)
        if cfg.get("medm_vl_ct"):
            return MedMVLVolumePreprocess(cfg["medm_vl_ct"], cfg["checkpoint_format"], cfg["volume"],
                                          cfg["image_size"], channels=int(cfg["in_channels"]))
        return VolumePreprocess(cfg["volume"], cfg["image_size"], channels=int(cfg["in_channels"]))

    # ---- weights ------------------------------------------------------------------------------------------------
    def convert_checkpoint(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Source state dict -> (native state dict, skipped source keys), by `checkpoint_format`."""
        if self.checkpoint_format == "native":
            return dict(state), []
        rules = [(re.compile(p + r"$"), r) for p, r in _RENAMES[self.checkpoint_format]]
        out, skipped = {}, []
        for key, value in state.items():
            if not key.startswith(CHECKPOINT_PREFIX):
                skipped.append(key)
                continue
            name = key[len(CHECKPOINT_PREFIX):]
            for pattern, repl in rules:
                if pattern.match(name):
                    out[pattern.sub(repl, name)] = value
                    break
            else:
                skipped.append(key)
        if self.norm is None:  # M3D-CLIP's final norm, unused when final_norm is false
            skipped += [CHECKPOINT_PREFIX + "norm." + k for k in ("weight", "bias") if out.pop("norm." + k, None)
                        is not None]
        return out, skipped

    def load_pretrained(self, path: str) -> None:
        """Load vision weights in `checkpoint_format` from a local file or directory.

        Raises:
            FileNotFoundError: no weights file at `path`.
            ValueError: weights missing or of another shape (names the keys and shapes).
        """
        file = _weights_file(path)
        if file.endswith(".safetensors"):
            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        converted, skipped = self.convert_checkpoint(state)
        own = self.state_dict()
        missing = [k for k in own if k not in converted]
        if missing:
            raise ValueError(f"{file}: not {self.checkpoint_format!r} weights of this vit3d: missing {len(missing)} "
                             f"of {len(own)} weights, e.g. {missing[:5]}")
        extra = [k for k in converted if k not in own]
        if extra:
            raise ValueError(f"{file}: weights the vit3d does not have (more layers?): {extra[:5]}")
        shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in converted.items()
                  if tuple(v.shape) != tuple(own[k].shape)]
        if shapes:
            raise ValueError(f"{file}: weight shapes do not fit this vit3d (image_size, patch_size, hidden_size?): "
                             f"{'; '.join(shapes[:5])}")
        self.load_state_dict(converted, strict=True)
        if skipped:
            logger.info("%s: skipped %d keys outside the vision tower, e.g. %s", file, len(skipped), skipped[:5])

    # ---- forward ------------------------------------------------------------------------------------------------
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, num_cls + N, hidden): patches, CLS and position embeddings."""
        if tuple(pixel_values.shape[2:]) != self.image_size:
            raise ValueError(f"vit3d: expected volumes of size {self.image_size} (D, H, W), got "
                             f"{tuple(pixel_values.shape[2:])}")
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype))
        if self.cls_token is None:
            return x + self.pos_embed
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if self.cls_pos_embed:
            return torch.cat([cls, x], dim=1) + self.pos_embed
        return torch.cat([cls, x + self.pos_embed], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, C, D, H, W) -> (B, num_tokens, hidden_size)."""
        x = self.embed(pixel_values)
        for block in self.blocks[:self.select_layer + 1]:  # later blocks do not change the selected output
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(block.__call__, x)
            else:
                x = block(x)
        if self.norm is not None and self.select_layer == len(self.blocks) - 1:
            x = self.norm(x)
        return select_features(x, self.select_feature, self.num_cls)


def _weights_file(path: str) -> str:
    if os.path.isdir(path):
        for name in _WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path}: no vit3d weights ({' or '.join(_WEIGHT_FILES)}) in this directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vit3d weights not found: {path}")
    return path
