"""Shared code for encoders that are transformers vision models (CLIP, SigLIP)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from medm.models.vision._base import (
    SELECT_FEATURES,
    ImagePreprocess,
    VisionEncoder,
    num_prefix_tokens,
    select_features,
)


def _preprocessor_json(path: str | None) -> dict[str, Any]:
    if path and os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            return json.load(f)
    return {}


class HFVisionEncoder(VisionEncoder):
    """A transformers vision tower; features are `hidden_states[select_layer]`.

    Args:
        config: the vision config as a dict (`image_size`, `patch_size`, `hidden_size`, ...); filled from `path`
            when missing.
        path: local directory or hub id of pretrained weights (a full CLIP / SigLIP checkpoint: the vision part is
            used).
        select_layer: index into `hidden_states` (0: the embeddings, -1: the last layer, -2: the one before).
        select_feature: `patch` (the grid: CLS dropped), `cls_patch` (CLS first, then the grid) or `skip_first`
            (every token after the first, CLS or not: LLaVA's `default` / TinyLLaVA's `patch` strategy, which on
            SigLIP drops the top-left patch, which leaves no full grid: the `mlp` connector and `attention_pool`
            with `layout: medm-vl` take that, the pooling ones refuse it).
        image_mean: per-channel mean; default from `path`'s preprocessor, else the tower's.
        image_std: per-channel std; default from `path`'s preprocessor, else the tower's.
        resize: `squash` | `pad` | `crop` (see `ImagePreprocess`).
        resample: `bicubic` | `bilinear` | `nearest`.
    """

    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    layers_path: str = "encoder.layers"  # the transformer blocks whose outputs `hidden_states` holds
    after_layers: tuple[str, ...] = ()  # modules applied after the blocks, outside `hidden_states` (final norm, head)
    num_cls_tokens: int = 0
    default_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    default_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __init__(self, config: dict[str, Any], path: str | None = None, select_layer: int = -2,
                 select_feature: str = "patch", image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, resize: str = "squash", resample: str = "bicubic"):
        super().__init__()
        del image_mean, image_std, resize, resample  # preprocessing settings, read by `preprocessor(cfg)`
        if select_feature not in SELECT_FEATURES:
            raise ValueError(f"unknown select_feature {select_feature!r}; known: {', '.join(SELECT_FEATURES)}")
        cfg = self.config_class(**config)
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.model = self.model_class(cfg)
        self.hidden_size = cfg.hidden_size
        side = cfg.image_size // cfg.patch_size
        self.grid = (side, side)
        self.num_prefix_tokens = num_prefix_tokens(select_feature, self.num_cls_tokens)
        n_layers = cfg.num_hidden_layers
        if not -(n_layers + 1) <= select_layer <= n_layers:
            raise ValueError(f"select_layer {select_layer} out of range for {n_layers} layers")

    @classmethod
    def resolve_config(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        cfg = dict(cfg)
        path = cfg.get("path")
        if not cfg.get("config"):
            if not path:
                raise ValueError(f"vision encoder {cls.registry_name!r} needs `path` or `config`")
            hf = AutoConfig.from_pretrained(path, trust_remote_code=False)
            # A full CLIP/SigLIP checkpoint has a text tower too; keep the vision part.
            hf = getattr(hf, "vision_config", hf)
            cfg["config"] = {k: v for k, v in hf.to_diff_dict().items() if k not in ("transformers_version",)}
        pre = _preprocessor_json(path)
        cfg.setdefault("image_mean", pre.get("image_mean", list(cls.default_mean)))
        cfg.setdefault("image_std", pre.get("image_std", list(cls.default_std)))
        return cfg

    @classmethod
    def preprocessor(cls, cfg: dict[str, Any]) -> ImagePreprocess:
        size = cls.config_class(**cfg["config"]).image_size
        mean = cfg.get("image_mean") or cls.default_mean
        std = cfg.get("image_std") or cls.default_std
        return ImagePreprocess((size, size), tuple(mean), tuple(std), cfg.get("resize", "squash"),
                               cfg.get("resample", "bicubic"))

    def load_pretrained(self, path: str) -> None:
        loaded = self.model_class.from_pretrained(path, config=self.model.config)
        self.model.load_state_dict(loaded.state_dict())

    def unused_parameter_names(self) -> list[str]:
        """The blocks after `select_layer` (`hidden_states[i]` is block i-1's output) and `after_layers`; nothing
        when the tower has no `layers_path` (a subclass that did not say where its blocks are)."""
        try:
            layers = self.model.get_submodule(self.layers_path)
        except AttributeError:
            return []
        used = self.select_layer % (len(layers) + 1)
        paths = [f"{self.layers_path}.{i}" for i in range(used, len(layers))]
        paths += [p for p in self.after_layers if isinstance(getattr(self.model, p, None), torch.nn.Module)]
        return [f"model.{p}.{n}" for p in paths for n, _ in self.model.get_submodule(p).named_parameters()]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, C, H, W) -> (B, N, D)."""
        out = self.model(pixel_values=pixel_values.to(self.model.dtype), output_hidden_states=True)
        return select_features(out.hidden_states[self.select_layer], self.select_feature, self.num_cls_tokens)
