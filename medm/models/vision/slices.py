"""Any 2D encoder run slice by slice over a volume (`vision3d.name: slices`), as MedM-VL-CT-Chest runs SigLIP
over 32 axial slices.

The volume is preprocessed to `(C, num_slices, H, W)` with the 2D encoder's size, channels and mean / std; each
of the `num_slices` slices goes through the 2D encoder, and their tokens are concatenated. The grid is
`(num_slices, h, w)`, so 3D connectors (`spatial_pool` with a per-axis stride, `attention_pool`) see the volume's
layout.
"""

from __future__ import annotations

from typing import Any

import torch

from medm.config import to_dict
from medm.data._medm_vl_ct import MedMVLVolumePreprocess
from medm.data.volumes import VolumePreprocess, parse_volume_args
from medm.models.vision._base import VisionEncoder
from medm.registry import VISION


def _inner_section(encoder: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(encoder, dict) or not encoder.get("name"):
        raise ValueError("vision encoder 'slices' needs `encoder`: a mapping with the 2D encoder's `name` (e.g. "
                         f"siglip) and its keys, got {encoder!r}")
    if encoder["name"] == "slices":
        raise ValueError("vision encoder 'slices': `encoder` must be a 2D encoder, not 'slices' itself")
    return encoder["name"], {k: v for k, v in encoder.items() if k != "name"}


@VISION.register("slices")
class SliceEncoder(VisionEncoder):
    """A registered 2D encoder applied to each of `num_slices` slices; features concatenated slice by slice.

    Args:
        encoder: the 2D encoder: `name` (registry name, e.g. `siglip`, `clip`, `open_clip`, `timm`) plus that
            encoder's keys. Its preprocessing settings (`image_mean`, `image_std`) apply to every slice; each
            slice is resized to its input size (no padding).
        num_slices: N, the depth the volume is resized to; one 2D pass per slice.
        path: weights of the 2D encoder, loaded by the model builder through the 2D encoder's `load_pretrained`;
            default: `encoder.path`.
        volume: volume reading and preprocessing (`medm.data.volumes.VolumeArgs` keys). After it, each slice is
            copied to the 2D encoder's channels (3 for RGB encoders) and normalised with its mean / std.
        medm_vl_ct: `hu` or `stored`: read MedM-VL's CT `.npy` volumes with MedM-VL's own steps instead of
            `volume`'s (`medm.data._medm_vl_ct`; set by `medm import medm-vl`); null: `volume`.

    Output `(B, N * P + N * h * w, D)`: the P prefix tokens of every slice first (with the 2D encoder's
    `select_feature: cls_patch`; P = 0 with `patch`), slice order, then the grid tokens, slice-major and row-major
    within a slice, so the rows after the prefix are the `(N, h, w)` grid flattened row-major.
    """

    def __init__(self, encoder: dict[str, Any], num_slices: int = 32, path: str | None = None,
                 volume: dict | None = None, medm_vl_ct: str | None = None):
        super().__init__()
        del path, volume  # weights come via load_pretrained; `volume` is read by `preprocessor(cfg)`
        if medm_vl_ct not in (None, "hu", "stored"):
            raise ValueError(f"vision encoder 'slices': medm_vl_ct must be hu, stored or null, got {medm_vl_ct!r}")
        name, settings = _inner_section(encoder)
        if not isinstance(num_slices, int) or num_slices < 1:
            raise ValueError(f"vision encoder 'slices': num_slices must be a positive int, got {num_slices!r}")
        self.encoder = VISION.build(name, **settings)
        if len(self.encoder.grid) != 2:
            raise ValueError(f"vision encoder 'slices': {name!r} has a {len(self.encoder.grid)}-D grid "
                             f"{self.encoder.grid}; it must be a 2D encoder")
        if self.encoder.num_prefix_tokens < 0:
            raise ValueError(f"vision encoder 'slices': {name!r} with select_feature skip_first drops a patch of "
                             "every slice, so the slices' tokens form no grid; use patch or cls_patch")
        self.num_slices = num_slices
        self.slice_prefix = self.encoder.num_prefix_tokens
        self.hidden_size = self.encoder.hidden_size
        self.grid = (num_slices, *self.encoder.grid)
        self.num_prefix_tokens = num_slices * self.slice_prefix

    @classmethod
    def tiny(cls, section: dict[str, Any] | None = None) -> dict[str, Any]:
        # the tiny clip over 4 slices of 32x32: grid 4x4x4
        return {"encoder": {"name": "clip", **VISION.get("clip").tiny()}, "num_slices": 4}

    @classmethod
    def resolve_config(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """The 2D encoder's settings resolved by its own `resolve_config`; `path` defaults to `encoder.path`."""
        cfg = dict(cfg)
        name, _ = _inner_section(cfg.get("encoder"))
        inner = VISION.get(name).resolve_config(dict(cfg["encoder"]))
        cfg["encoder"] = {"name": name, **{k: v for k, v in inner.items() if k != "name"}}
        if cfg.get("path") is None and inner.get("path"):
            cfg["path"] = inner["path"]
        cfg.setdefault("num_slices", 32)
        cfg["volume"] = to_dict(parse_volume_args(cfg.get("volume"), "vision3d.volume"))
        return cfg

    @classmethod
    def preprocessor(cls, cfg: dict[str, Any]):
        """Path -> (C, num_slices, H, W): volume preprocessing, then the 2D encoder's channels and mean / std."""
        cfg = cls.resolve_config(cfg)
        name, _ = _inner_section(cfg["encoder"])
        image = VISION.get(name).preprocessor(cfg["encoder"])
        args = (cfg["volume"], (cfg["num_slices"], *image.image_size))
        kwargs = {"channels": image.channels, "mean": image.mean, "std": image.std}
        if cfg.get("medm_vl_ct"):
            return MedMVLVolumePreprocess(cfg["medm_vl_ct"], "slices", *args, **kwargs)
        return VolumePreprocess(*args, **kwargs)

    def load_pretrained(self, path: str) -> None:
        """The 2D encoder's weights, in whatever form that encoder loads."""
        self.encoder.load_pretrained(path)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, C, N, H, W) -> (B, num_tokens, hidden_size)."""
        b, c, n, h, w = pixel_values.shape
        if n != self.num_slices:
            raise ValueError(f"slices: expected {self.num_slices} slices (B, C, N, H, W), got {n}")
        x = pixel_values.transpose(1, 2).reshape(b * n, c, h, w)
        feats = self.encoder(x)  # (B * N, P + h*w, D)
        t, d = feats.shape[1], feats.shape[2]
        feats = feats.reshape(b, n, t, d)
        p = self.slice_prefix
        grid = feats[:, :, p:].reshape(b, n * (t - p), d)
        return torch.cat([feats[:, :, :p].reshape(b, n * p, d), grid], dim=1) if p else grid
