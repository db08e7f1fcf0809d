"""What every vision encoder provides: features, their geometry, and its own preprocessing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from medm.data.images import DEFAULT_MAX_PIXELS

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass
class ImagePreprocess:
    """Image -> normalised tensor for one encoder; shared by the dataset, inference and playground.

    Args:
        image_size: (H, W) the encoder takes.
        mean, std: per-channel normalisation, one value per output channel.
        resize: `squash` (resize to H x W), `pad` (pad to square with the mean colour first, as LLaVA's
            `pad` aspect mode, which keeps anatomy undistorted) or `crop` (resize the short side, keeping the aspect
            ratio, then centre-crop H x W: CLIP's image processor, LLaVA's `square` aspect mode).
        resample: `bicubic` | `bilinear` | `nearest`.
        max_pixels: largest square canvas `pad` may make (a 20000x1 image pads to 400 megapixels: an aspect-ratio
            bomb that passes the file's own pixel limit); None: no limit.
    """

    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "squash"
    resample: str = "bicubic"
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    @property
    def channels(self) -> int:
        return len(self.mean)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any mode) -> (C, H, W) float32.

        Raises:
            ValueError: `pad` would make a canvas above `max_pixels` (checked before anything is allocated).
        """
        if self.resize == "pad":
            w, h = image.size
            side = max(w, h)
            if self.max_pixels is not None and side * side > self.max_pixels:
                raise ValueError(f"padding this {w}x{h} image to a square (vision.resize: pad) makes a {side}x{side} "
                                 f"= {side * side:,} pixel canvas, above the limit of {self.max_pixels:,} (an "
                                 "extreme aspect ratio; crop the image or use resize: squash)")
        mode = "L" if self.channels == 1 else "RGB"
        image = image.convert(mode)
        if self.resize == "pad":
            w, h = image.size
            side = max(w, h)
            fill = tuple(int(255 * m) for m in self.mean) if mode == "RGB" else int(255 * self.mean[0])
            canvas = Image.new(mode, (side, side), fill)
            canvas.paste(image, ((side - w) // 2, (side - h) // 2))
            image = canvas
        elif self.resize not in ("squash", "crop"):
            raise ValueError(f"unknown resize mode {self.resize!r}; known: squash, pad, crop")
        h, w = self.image_size
        if self.resize == "crop":
            # transformers' shortest-edge resize (long side floored) and centre crop, as CLIPImageProcessor does
            iw, ih = image.size
            side = max(h, w)
            short, long = min(iw, ih), max(iw, ih)
            nw, nh = (side, int(side * long / short)) if iw <= ih else (int(side * long / short), side)
            image = image.resize((nw, nh), _RESAMPLE[self.resample])
            top, left = (nh - h) // 2, (nw - w) // 2
            image = image.crop((left, top, left + w, top + h))
        else:
            image = image.resize((w, h), _RESAMPLE[self.resample])
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return (x - mean) / std

    def blank(self) -> torch.Tensor:
        """A (C, H, W) tensor of a black image, for image-reliance checks."""
        return self(Image.new("L", self.image_size[::-1], 0))


class VisionEncoder(nn.Module):
    """Base class: `forward(pixel_values (B, C, H, W)) -> (B, N, D)`.

    Subclasses set `hidden_size`, `grid` (patch grid, e.g. (4, 4)) and `num_prefix_tokens` (leading
    non-grid tokens kept in the output, e.g. 1 for CLS with `select_feature: cls_patch`), so
    `num_tokens = num_prefix_tokens + prod(grid)` is known before anything runs. A negative `num_prefix_tokens`
    means that many leading grid tokens were dropped (`select_feature: skip_first` on a tower without a CLS
    token): the output is then no full grid, which only connectors that need none accept (`mlp`, `attention_pool`
    with `layout: medm-vl`).
    """

    hidden_size: int
    grid: tuple[int, ...]
    num_prefix_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + math.prod(self.grid)

    @classmethod
    def resolve_config(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """Fill every architecture setting (from `path` where given) so the config alone rebuilds it."""
        return dict(cfg)

    @classmethod
    def preprocessor(cls, cfg: dict[str, Any]) -> ImagePreprocess:
        """The encoder's image preprocessing, from its resolved config alone (no weights needed)."""
        raise NotImplementedError

    @classmethod
    def tiny(cls, section: dict[str, Any] | None = None) -> dict[str, Any]:
        """Settings of a tiny, offline twin (random weights, seconds to build) merged over the encoder's section
        (`section`: the config section it replaces, for settings the twin keeps), for tests and `tiny_overrides`."""
        raise NotImplementedError(f"vision encoder {getattr(cls, 'registry_name', cls.__name__)!r} has no tiny preset")

    def load_pretrained(self, path: str) -> None:
        """Load weights from a local directory or file (or hub id where the network allows)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load pretrained weights")

    def unused_parameter_names(self) -> list[str]:
        """Names (relative to the encoder) of parameters the features never reach, e.g. the layers after
        `select_layer` and a final norm; a stage that trains the encoder keeps them frozen (no gradient would reach
        them, and DDP refuses such parameters)."""
        return []


SELECT_FEATURES = ("patch", "cls_patch", "skip_first")


def num_prefix_tokens(select_feature: str, num_cls: int) -> int:
    """Leading non-grid tokens `select_features` keeps (negative: grid tokens it drops) for a tower with `num_cls`
    class tokens."""
    return {"patch": 0, "cls_patch": num_cls, "skip_first": num_cls - 1}[select_feature]


def select_features(hidden: torch.Tensor, select_feature: str, num_cls: int) -> torch.Tensor:
    """(B, T, D) -> (B, N, D): `patch` drops the `num_cls` leading tokens, `cls_patch` keeps all, `skip_first` drops
    the first token whatever it is (LLaVA's `default` and TinyLLaVA's `patch` strategies: on a tower without a CLS
    token, such as SigLIP, that is the top-left patch)."""
    if select_feature == "patch":
        return hidden[:, num_cls:]
    if select_feature == "cls_patch":
        return hidden
    if select_feature == "skip_first":
        return hidden[:, 1:]
    raise ValueError(f"unknown select_feature {select_feature!r}; known: {', '.join(SELECT_FEATURES)}")
