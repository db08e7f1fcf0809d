"""Any open_clip architecture's image tower as a vision encoder (`vision.name: open_clip`)."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.factory import get_model_config, load_state_dict, parse_model_name
from open_clip.model import _build_vision_tower, resize_pos_embed
from open_clip.pretrained import download_pretrained_from_hf, get_pretrained_cfg, list_pretrained_tags_by_model
from open_clip.timm_model import TimmModel
from torch import nn

from medm.models.vision._base import ImagePreprocess, VisionEncoder
from medm.models.vision._features import check_select_feature, check_select_layer, probe_geometry, to_tokens
from medm.models.vision.timm import timm_layer
from medm.registry import VISION

# The parts of an open_clip model config the image tower is built from; the text tower is never built.
_VISION_KEYS = ("embed_dim", "quick_gelu", "vision_cfg")
# Weight files of an open_clip model directory (as on the hub), in order of preference.
_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_CONFIG_FILE = "open_clip_config.json"


def _config_json(model_name: str) -> dict[str, Any] | None:
    """`open_clip_config.json` of a `local-dir:PATH` or `hf-hub:ID` model name; None for a library name."""
    schema, ident = parse_model_name(model_name)
    if schema is None:
        return None
    file = os.path.join(ident, _CONFIG_FILE) if schema == "local-dir" else download_pretrained_from_hf(
        ident, filename=_CONFIG_FILE)
    with open(file) as f:
        return json.load(f)


def _model_cfg(model_name: str) -> dict[str, Any]:
    found = _config_json(model_name)
    cfg = found.get("model_cfg", found) if found is not None else get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model_name {model_name!r}; see open_clip.list_models(), or use "
                         f"'local-dir:PATH' for a directory with {_CONFIG_FILE}")
    return {k: copy.deepcopy(cfg[k]) for k in _VISION_KEYS if k in cfg}


def _default_norm(model_name: str | None) -> tuple[list[float], list[float]]:
    """Mean/std for a model name: its config's `preprocess_cfg`, or what all its pretrained tags agree on."""
    if model_name is None:
        return list(OPENAI_DATASET_MEAN), list(OPENAI_DATASET_STD)
    found = _config_json(model_name)
    if found is not None:
        pre = found.get("preprocess_cfg", {})
        return list(pre.get("mean", OPENAI_DATASET_MEAN)), list(pre.get("std", OPENAI_DATASET_STD))
    norms = {}
    for tag in list_pretrained_tags_by_model(model_name):
        pre = get_pretrained_cfg(model_name, tag)
        norms.setdefault((tuple(pre.get("mean", OPENAI_DATASET_MEAN)), tuple(pre.get("std", OPENAI_DATASET_STD))),
                         []).append(tag)
    if len(norms) > 1:
        listing = "; ".join(f"{', '.join(tags)}: mean {list(m)} std {list(s)}" for (m, s), tags in norms.items())
        raise ValueError(f"open_clip model {model_name!r}: its pretrained weights use different normalisations "
                         f"({listing}); set `image_mean` and `image_std` for the weights you load")
    mean, std = next(iter(norms)) if norms else (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    return list(mean), list(std)


def _image_size(model_cfg: dict[str, Any]) -> tuple[int, int]:
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@VISION.register("open_clip")
class OpenCLIPEncoder(VisionEncoder):
    """The image tower of an open_clip model (ViT, ModifiedResNet or timm trunk); the text tower is never built.

    Features are the output of one transformer block (ViT; prefix class token kept by `cls_patch`) or one stage
    (CNN; the (B, C, h, w) map flattened row-major to (B, h*w, C)), before the final norm.

    Args:
        model_name: open_clip architecture, e.g. `ViT-B-16`, `ViT-B-16-quickgelu` (OpenAI weights need the
            `-quickgelu` variant), `ViT-B-16-SigLIP`, `RN50`; its JSON config ships with open_clip, so nothing is
            downloaded. `local-dir:PATH` reads `PATH/open_clip_config.json`. Also picks the default mean/std.
        model_cfg: the architecture as a dict (`embed_dim`, `vision_cfg`, `quick_gelu`); filled from `model_name`
            when missing, and used as is when given.
        path: local open_clip weights: a `.safetensors` / `torch.save` file of a full CLIP state dict (only the
            `visual.*` keys are used) or a directory holding `open_clip_model.safetensors` /
            `open_clip_pytorch_model.bin`. Loaded by the model builder.
        select_layer: index into the tower's `forward_intermediates` outputs: one per transformer block (ViT), or
            per stage (ModifiedResNet: stem + 4 layers; timm trunk: its feature stages), counted from 0; negative
            counts from the end (-1: last block, -2: the one before). Unlike HF `hidden_states`, 0 is block 1.
        select_feature: `patch` (grid tokens) or `cls_patch` (class token first, then the grid).
        image_mean, image_std: default from `model_name` (the normalisation all its pretrained tags share),
            else OpenAI CLIP's.
        resize: `squash` | `pad` | `crop` (see `ImagePreprocess`). resample: `bicubic` | `bilinear` | `nearest`.
    """

    def __init__(self, model_name: str | None = None, model_cfg: dict[str, Any] | None = None, path: str | None = None,
                 select_layer: int = -2, select_feature: str = "patch", image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, resize: str = "squash", resample: str = "bicubic"):
        super().__init__()
        del path, image_mean, image_std, resize, resample  # weights come via load_pretrained; the rest: preprocessor
        check_select_feature(select_feature)
        check_select_layer(select_layer)
        if model_cfg is None:
            if model_name is None:
                raise ValueError("vision encoder 'open_clip' needs `model_name` or `model_cfg`")
            model_cfg = _model_cfg(model_name)
        vision_cfg = dict(model_cfg["vision_cfg"])
        if vision_cfg.get("timm_model_pretrained"):
            raise ValueError(f"open_clip {model_name or 'model_cfg'}: vision_cfg.timm_model_pretrained would download "
                             "weights; set it false and give the weights as `path`")
        self.model_name = model_name
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.visual = _build_vision_tower(model_cfg.get("embed_dim", 512), vision_cfg,
                                          quick_gelu=model_cfg.get("quick_gelu", False))
        size = _image_size(model_cfg)
        try:
            hidden, grid, n_prefix = probe_geometry(self.visual, self._layer, size)
        except (AssertionError, RuntimeError, ValueError, IndexError) as e:
            raise ValueError(f"open_clip {model_name or 'model_cfg'}: no features for select_layer={select_layer} "
                             f"at image size {size[0]}x{size[1]}: {e}") from None
        self.hidden_size = hidden
        self.grid = grid
        self.num_prefix_tokens = n_prefix if select_feature == "cls_patch" else 0

    def _layer(self, visual: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(visual, TimmModel):
            # open_clip's adapter around a timm trunk only forwards some arguments; ask the trunk itself.
            return timm_layer(visual.trunk, x, self.select_layer)
        out = visual.forward_intermediates(x, indices=[self.select_layer], stop_early=True, intermediates_only=True,
                                           output_fmt="NCHW", output_extra_tokens=True)
        prefix = out.get("image_intermediates_prefix")
        return out["image_intermediates"][0], None if prefix is None else prefix[0]

    @classmethod
    def tiny(cls, section: dict[str, Any] | None = None) -> dict[str, Any]:
        # model_name null: the architecture is model_cfg alone (a real preset's model_name would pick its mean/std)
        return {"model_name": None, "model_cfg": {"embed_dim": 32, "quick_gelu": False, "vision_cfg": {
            "image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0}}}

    @classmethod
    def resolve_config(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        cfg = dict(cfg)
        if cfg.get("model_cfg") is None:
            if not cfg.get("model_name"):
                raise ValueError("vision encoder 'open_clip' needs `model_name` (e.g. ViT-B-16) or `model_cfg`")
            cfg["model_cfg"] = _model_cfg(cfg["model_name"])
        if cfg.get("image_mean") is None or cfg.get("image_std") is None:
            mean, std = _default_norm(cfg.get("model_name"))
            cfg["image_mean"] = mean if cfg.get("image_mean") is None else cfg["image_mean"]
            cfg["image_std"] = std if cfg.get("image_std") is None else cfg["image_std"]
        return cfg

    @classmethod
    def preprocessor(cls, cfg: dict[str, Any]) -> ImagePreprocess:
        cfg = cls.resolve_config(cfg)
        return ImagePreprocess(_image_size(cfg["model_cfg"]), tuple(cfg["image_mean"]), tuple(cfg["image_std"]),
                               cfg.get("resize", "squash"), cfg.get("resample", "bicubic"))

    def load_pretrained(self, path: str) -> None:
        """Load the `visual.*` weights of an open_clip checkpoint (position embeddings resized to this tower).

        Raises:
            FileNotFoundError: no weights file at `path`.
            ValueError: the file has no `visual.*` weights.
            RuntimeError: the weights do not fit this architecture (missing keys or shapes, from torch).
        """
        file = _weights_file(path)
        state = load_state_dict(file, weights_only=True)
        state = {k: v for k, v in state.items() if k.startswith("visual.")}
        if not state:
            raise ValueError(f"{file}: no `visual.*` weights; expected an open_clip CLIP state dict")
        resize_pos_embed(state, self)  # reads `self.visual`, like an open_clip CLIP model
        self.load_state_dict(state, strict=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, 3, H, W) -> (B, num_tokens, hidden_size)."""
        dtype = next(self.visual.parameters()).dtype
        spatial, prefix = self._layer(self.visual, pixel_values.to(dtype))
        return to_tokens(spatial, prefix if self.select_feature == "cls_patch" else None)


def _weights_file(path: str) -> str:
    if os.path.isdir(path):
        for name in _WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path}: no open_clip weights ({' or '.join(_WEIGHT_FILES)}) in this directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"open_clip weights not found: {path}")
    return path

