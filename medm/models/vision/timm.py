"""Any timm image model as a vision encoder (`vision.name: timm`): ViTs and CNNs alike."""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from timm.models import load_state_dict
from torch import nn

from medm.models.vision._base import ImagePreprocess, VisionEncoder
from medm.models.vision._features import check_select_feature, check_select_layer, probe_geometry, to_tokens
from medm.registry import VISION

logger = logging.getLogger(__name__)

# Weight files of a timm model directory (as on the hub), in order of preference.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def create_timm_model(model_name: str, model_args: dict[str, Any] | None) -> nn.Module:
    """`timm.create_model` with random weights and no classifier (unless `model_args` sets `num_classes`)."""
    try:
        return timm.create_model(model_name, pretrained=False, **{"num_classes": 0, **(model_args or {})})
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown timm model_name {model_name!r} (see timm.list_models())") from None
        raise


def timm_layer(model: nn.Module, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output of block / stage `index` of a timm model (any index `forward_intermediates` accepts).

    Returns:
        spatial: (B, C, h, w), before the final norm; prefix: (B, P, C) class / register tokens of a ViT, else None.
    """
    kwargs = {}
    # ViT-style models take `return_prefix_tokens`; CNNs have no prefix tokens and no such argument.
    if "return_prefix_tokens" in inspect.signature(model.forward_intermediates).parameters:
        kwargs["return_prefix_tokens"] = True
    out = model.forward_intermediates(x, indices=[index], stop_early=True, intermediates_only=True,
                                      output_fmt="NCHW", **kwargs)[0]
    return out if isinstance(out, tuple) else (out, None)


def _size2(size: int | list[int] | tuple[int, ...]) -> list[int]:
    return [size, size] if isinstance(size, int) else [int(s) for s in size]


@VISION.register("timm")
class TimmEncoder(VisionEncoder):
    """A timm model; features are the output of one block (ViT) or stage (CNN), flattened to tokens.

    ViTs give the tokens of block `select_layer` before the final norm, with their prefix (class / register)
    tokens kept by `cls_patch`; CNNs give the stage's (B, C, h, w) map as (B, h*w, C) in row-major order.

    Args:
        model_name: timm architecture name, e.g. `vit_base_patch16_224`, `resnet50`, `convnext_tiny`.
        model_args: keyword arguments for `timm.create_model` (e.g. `img_size`, `patch_size`, `embed_dim`,
            `depth`, `num_heads`, `in_chans`). The classifier is dropped (`num_classes: 0`) unless set here.
        path: local timm weights (`.safetensors`, or a `torch.save` state dict, loaded with `weights_only`),
            or a directory holding `model.safetensors` / `pytorch_model.bin`. Loaded by the model builder;
            `timm` pretrained downloads are never used.
        image_size: (H, W) or one int; default `model_args.img_size`, else the model's data config size.
        select_layer: index into the model's `forward_intermediates` outputs: one per block for a ViT, one per
            feature stage for a CNN (`len(model.feature_info)`), counted from 0; negative counts from the end
            (-1: last block / stage, -2: the one before). Unlike HF `hidden_states`, 0 is the first block.
        select_feature: `patch` (grid tokens only) or `cls_patch` (prefix tokens first, then the grid).
        image_mean, image_std: normalisation; default from the model's timm data config.
        resize: `squash` | `pad` | `crop` (see `ImagePreprocess`). resample: `bicubic` | `bilinear` | `nearest`.
    """

    def __init__(self, model_name: str, model_args: dict[str, Any] | None = None, path: str | None = None,
                 image_size: int | list[int] | None = None, select_layer: int = -2, select_feature: str = "patch",
                 image_mean: list[float] | None = None, image_std: list[float] | None = None,
                 resize: str = "squash", resample: str = "bicubic"):
        super().__init__()
        del path, image_mean, image_std, resize, resample  # weights come via load_pretrained; the rest: preprocessor
        check_select_feature(select_feature)
        check_select_layer(select_layer)
        self.model_name = model_name
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.model = create_timm_model(model_name, model_args)
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(f"timm model {model_name!r} has no forward_intermediates, so medm cannot take "
                             "features from its layers; pick another architecture")
        size = _size2(image_size) if image_size is not None else _default_size(self.model, model_args)
        channels = (model_args or {}).get("in_chans", 3)
        try:
            hidden, grid, n_prefix = probe_geometry(self.model, self._layer, tuple(size), channels)
        except (AssertionError, RuntimeError, ValueError, IndexError) as e:
            raise ValueError(f"timm model {model_name!r}: no features for select_layer={select_layer} at image "
                             f"size {size[0]}x{size[1]}: {e}") from None
        self.hidden_size = hidden
        self.grid = grid
        self.num_prefix_tokens = n_prefix if select_feature == "cls_patch" else 0

    def _layer(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return timm_layer(model, x, self.select_layer)

    @classmethod
    def tiny(cls, section: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"model_name": "vit_base_patch16_224", "image_size": 32, "model_args": {
            "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}}

    @classmethod
    def resolve_config(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        cfg = dict(cfg)
        if not cfg.get("model_name"):
            raise ValueError("vision encoder 'timm' needs `model_name` (a timm architecture, e.g. resnet50)")
        model_args = dict(cfg.get("model_args") or {})
        cfg["model_args"] = model_args
        # Built on the meta device: the data config is all we need, so this costs no memory and no init.
        with torch.device("meta"):
            model = create_timm_model(cfg["model_name"], model_args)
        data = resolve_model_data_config(model)
        if cfg.get("image_size") is None:
            cfg["image_size"] = _default_size(model, model_args)
        else:
            cfg["image_size"] = _size2(cfg["image_size"])
        channels = model_args.get("in_chans", 3)
        for key, default in (("image_mean", data["mean"]), ("image_std", data["std"])):
            if cfg.get(key) is None:
                if len(default) != channels:
                    raise ValueError(f"timm model {cfg['model_name']!r} with in_chans={channels}: its default {key} "
                                     f"{list(default)} has {len(default)} values; set `{key}` ({channels} values)")
                cfg[key] = [float(v) for v in default]
        return cfg

    @classmethod
    def preprocessor(cls, cfg: dict[str, Any]) -> ImagePreprocess:
        cfg = cls.resolve_config(cfg)
        return ImagePreprocess(tuple(cfg["image_size"]), tuple(cfg["image_mean"]), tuple(cfg["image_std"]),
                               cfg.get("resize", "squash"), cfg.get("resample", "bicubic"))

    def load_pretrained(self, path: str) -> None:
        """Load timm-format weights; keys the encoder lacks (e.g. the dropped classifier) are skipped and logged.

        Raises:
            FileNotFoundError: no weights file at `path`.
            ValueError: the file lacks some of the encoder's weights (another architecture).
        """
        file = _weights_file(path)
        state = load_state_dict(file, weights_only=True)
        result = self.model.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise ValueError(f"{file}: not weights of timm model {self.model_name!r}: missing "
                             f"{len(result.missing_keys)} keys, e.g. {result.missing_keys[:5]}")
        if result.unexpected_keys:
            logger.info("%s: skipped %d keys the encoder does not use, e.g. %s", file, len(result.unexpected_keys),
                        result.unexpected_keys[:5])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, C, H, W) -> (B, num_tokens, hidden_size)."""
        dtype = next(self.model.parameters()).dtype
        spatial, prefix = self._layer(self.model, pixel_values.to(dtype))
        return to_tokens(spatial, prefix if self.select_feature == "cls_patch" else None)


def _default_size(model: nn.Module, model_args: dict[str, Any] | None) -> list[int]:
    if (model_args or {}).get("img_size") is not None:
        return _size2(model_args["img_size"])
    return _size2(tuple(resolve_model_data_config(model)["input_size"][1:]))


def _weights_file(path: str) -> str:
    if os.path.isdir(path):
        for name in _WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path}: no timm weights ({' or '.join(_WEIGHT_FILES)}) in this directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"timm weights not found: {path}")
    return path
