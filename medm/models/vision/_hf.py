"""transformers vision towers: the generic encoder (`vision.name: hf`, any ViT-style vision config) and the base of
its named presets (`clip`, `siglip`), which pin the config and model classes."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from medm.models.vision._base import (
    SELECT_FEATURES,
    ImagePreprocess,
    VisionEncoder,
    num_prefix_tokens,
    select_features,
)

_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class HFArchitecture:
    """Where a transformers vision model keeps its parts (what `hidden_states` cannot tell).

    Args:
        layers: the transformer blocks whose outputs `hidden_states` holds.
        after: modules applied after the blocks, outside `hidden_states` (final norm, pooler, head): the features
            never reach them.
        mean, std: the default image normalisation, when `path` has no preprocessor_config.json.
        idle: other parameters an image never uses (DINOv2's `mask_token`, for masked-image pretraining only).
    """

    layers: str
    after: tuple[str, ...] = ()
    mean: tuple[float, ...] = _HALF
    std: tuple[float, ...] = _HALF
    idle: tuple[str, ...] = ()


# The architectures whose layout medm knows, by transformers `model_type`. Another ViT-style model builds and runs
# all the same (token counts are measured); it only claims no unused parameters and defaults to mean/std 0.5.
HF_ARCHITECTURES: dict[str, HFArchitecture] = {
    "clip_vision_model": HFArchitecture("encoder.layers", ("post_layernorm",), _CLIP_MEAN, _CLIP_STD),
    "siglip_vision_model": HFArchitecture("encoder.layers", ("post_layernorm", "head")),
    "dinov2": HFArchitecture("encoder.layer", ("layernorm",), _IMAGENET_MEAN, _IMAGENET_STD,
                             ("embeddings.mask_token",)),
    "dinov2_with_registers": HFArchitecture("encoder.layer", ("layernorm",), _IMAGENET_MEAN, _IMAGENET_STD,
                                            ("embeddings.mask_token",)),
    "vit": HFArchitecture("layers", ("layernorm", "pooler")),
    "deit": HFArchitecture("layers", ("layernorm", "pooler"), _IMAGENET_MEAN, _IMAGENET_STD),
}

# The tiny architecture (tests, `tiny_overrides`): a 32 px image in 8 px patches (a 4x4 grid), width 32, 2 blocks;
# each key is used where the config class has it (DINOv2 sizes its MLP by `mlp_ratio`, CLIP by `intermediate_size`).
_TINY = {"hidden_size": 32, "intermediate_size": 64, "mlp_ratio": 2, "num_hidden_layers": 2, "num_attention_heads": 2,
         "image_size": 32, "patch_size": 8, "num_channels": 3}


def _preprocessor_json(path: str | None) -> dict[str, Any]:
    if path and os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            return json.load(f)
    return {}


def _pair(value: Any, key: str, model_type: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"vision config {key} {value!r} ({model_type}): medm takes a ViT-style tower with an int or "
                     "[height, width] image_size and patch_size")


class HFEncoder(VisionEncoder):
    """A transformers vision tower built from its config by `AutoModel`; features are `hidden_states[select_layer]`.

    Args:
        config: the vision config as a dict (`image_size`, `patch_size`, `hidden_size`, ...); filled from `path`
            when missing.
        path: local directory or hub id of pretrained weights (a full CLIP / SigLIP checkpoint: the vision part is
            used).
        model_type: the transformers `model_type` of the vision config (`dinov2`, `vit`, `clip_vision_model`,
            `siglip_vision_model`, ...); read from `path` when missing.
        select_layer: index into `hidden_states` (0: the embeddings, -1: the last layer, -2: the one before).
        select_feature: `patch` (the grid: CLS and register tokens dropped), `cls_patch` (those first, then the
            grid) or `skip_first` (every token after the first, CLS or not: LLaVA's `default` / TinyLLaVA's `patch`
            strategy, which on SigLIP drops the top-left patch, which leaves no full grid: the `mlp` connector and
            `attention_pool` with `layout: medm-vl` take that, the pooling ones refuse it).
        image_mean: per-channel mean; default from `path`'s preprocessor, else the tower's.
        image_std: per-channel std; default from `path`'s preprocessor, else the tower's.
        resize: `squash` | `pad` | `crop` (see `ImagePreprocess`).
        resample: `bicubic` | `bilinear` | `nearest`.
    """

    model_type: str | None = None  # a preset pins it; the generic encoder takes it from its config section
    num_cls_tokens: int  # leading non-grid tokens of `hidden_states`: a preset's class attribute, else measured

    def __init__(self, config: dict[str, Any], path: str | None = None, model_type: str | None = None,
                 select_layer: int = -2, select_feature: str = "patch", image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, resize: str = "squash", resample: str = "bicubic"):
        super().__init__()
        del path, image_mean, image_std, resize, resample  # weights load later; preprocessing: `preprocessor(cfg)`
        if select_feature not in SELECT_FEATURES:
            raise ValueError(f"unknown select_feature {select_feature!r}; known: {', '.join(SELECT_FEATURES)}")
        cfg = self.hf_config(config, model_type)
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.model = self._model_class(cfg)(cfg)
        self.architecture = HF_ARCHITECTURES.get(cfg.model_type)
        size = _pair(getattr(cfg, "image_size", None), "image_size", cfg.model_type)
        patch = _pair(getattr(cfg, "patch_size", None), "patch_size", cfg.model_type)
        self.hidden_size = cfg.hidden_size
        self.grid = (size[0] // patch[0], size[1] // patch[1])
        if not isinstance(getattr(type(self), "num_cls_tokens", None), int):
            self.num_cls_tokens = self._measure_prefix(cfg, size)
        self.num_prefix_tokens = num_prefix_tokens(select_feature, self.num_cls_tokens)
        n_layers = cfg.num_hidden_layers
        if not -(n_layers + 1) <= select_layer <= n_layers:
            raise ValueError(f"select_layer {select_layer} out of range for {n_layers} layers")

    # ---- the transformers classes ----------------------------------------------------------------------------
    @classmethod
    def hf_config(cls, config: dict[str, Any], model_type: str | None = None) -> PretrainedConfig:
        """The transformers config of this tower: the preset's class, or `AutoConfig` for `model_type`."""
        config = dict(config)
        model_type = cls.model_type or model_type or config.get("model_type")
        if model_type is None:
            raise ValueError(f"vision encoder {cls.registry_name!r}: set `model_type` (the transformers vision "
                             "model_type, e.g. dinov2, vit) or `path` (a checkpoint whose config.json names it)")
        config.pop("model_type", None)
        try:
            return AutoConfig.for_model(model_type, **config)
        except ValueError as e:
            raise ValueError(f"vision encoder {cls.registry_name!r}: model_type {model_type!r}: {e}") from None

    @classmethod
    def _model_class(cls, cfg: PretrainedConfig) -> type[PreTrainedModel]:
        if type(cfg) not in MODEL_MAPPING:
            raise ValueError(f"vision encoder {cls.registry_name!r}: transformers' AutoModel builds no model from a "
                             f"{type(cfg).__name__} (model_type {cfg.model_type!r})")
        return MODEL_MAPPING[type(cfg)]

    def _measure_prefix(self, cfg: PretrainedConfig, size: tuple[int, int]) -> int:
        """Leading non-grid tokens (CLS, distillation, registers) of `hidden_states`, measured on the meta device
        (shapes only, nothing computed), so any architecture's count is right."""
        # DeepSpeed ZeRO-3 partitions parameters into empty tensors and keeps the real shape in `ds_shape`.
        fake = {name: torch.empty(getattr(t, "ds_shape", t.shape), dtype=t.dtype, device="meta")
                for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]}
        x = torch.zeros(1, cfg.num_channels, *size, device="meta")
        with torch.no_grad():
            out = functional_call(self.model, fake, (x,), {"output_hidden_states": True}, strict=False)
        prefix = out.hidden_states[0].shape[1] - math.prod(self.grid)
        if out.hidden_states[0].ndim != 3 or prefix < 0:
            raise ValueError(f"vision encoder {self.registry_name!r} ({cfg.model_type}): "
                             f"{out.hidden_states[0].shape[1]} tokens for a {self.grid} patch grid; not a ViT-style "
                             "tower")
        return prefix

    # ---- config and preprocessing ----------------------------------------------------------------------------
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
            if cls.model_type is None:
                if cfg.get("model_type") not in (None, hf.model_type):
                    raise ValueError(f"vision.model_type {cfg['model_type']!r}, but vision.path {path!r} holds a "
                                     f"{hf.model_type!r} vision config")
                cfg["model_type"] = hf.model_type
            cfg["config"] = {k: v for k, v in hf.to_diff_dict().items() if k not in ("transformers_version",)}
        elif cls.model_type is None and not cfg.get("model_type"):
            cfg["model_type"] = cls.hf_config(cfg["config"]).model_type  # the config's own `model_type`
        pre = _preprocessor_json(path)
        arch = cls._architecture(cfg)
        cfg.setdefault("image_mean", pre.get("image_mean", list(arch.mean)))
        cfg.setdefault("image_std", pre.get("image_std", list(arch.std)))
        return cfg

    @classmethod
    def _architecture(cls, cfg: dict[str, Any]) -> HFArchitecture:
        model_type = cls.model_type or cfg.get("model_type") or cfg.get("config", {}).get("model_type")
        return HF_ARCHITECTURES.get(model_type, HFArchitecture(""))

    @classmethod
    def preprocessor(cls, cfg: dict[str, Any]) -> ImagePreprocess:
        hf = cls.hf_config(cfg["config"], cfg.get("model_type"))
        arch = cls._architecture(cfg)
        mean = cfg.get("image_mean") or arch.mean
        std = cfg.get("image_std") or arch.std
        size = _pair(getattr(hf, "image_size", None), "image_size", hf.model_type)
        return ImagePreprocess(size, tuple(mean), tuple(std), cfg.get("resize", "squash"),
                               cfg.get("resample", "bicubic"))

    @classmethod
    def tiny(cls, section: dict[str, Any] | None = None) -> dict[str, Any]:
        """Tiny settings (a 4x4 grid of width 32, 2 blocks) for this tower; the generic encoder keeps the section's
        `model_type`."""
        model_type = cls.model_type or (section or {}).get("model_type")
        if model_type is None:
            raise ValueError(f"a tiny {cls.registry_name!r} encoder needs vision.model_type (a tiny twin reads no "
                             "`path`)")
        known = cls.hf_config({}, model_type).to_dict()
        out: dict[str, Any] = {"config": {k: v for k, v in _TINY.items() if k in known}}
        return out if cls.model_type else {"model_type": model_type, **out}

    # ---- weights and features ----------------------------------------------------------------------------------
    def load_pretrained(self, path: str) -> None:
        loaded = type(self.model).from_pretrained(path, config=self.model.config)
        self.model.load_state_dict(loaded.state_dict())

    def unused_parameter_names(self) -> list[str]:
        """The blocks after `select_layer` (`hidden_states[i]` is block i-1's output), the modules after the blocks
        and the idle parameters; nothing for an architecture not in `HF_ARCHITECTURES` (its layout is unknown)."""
        if self.architecture is None:
            return []
        layers_path = self.architecture.layers
        layers = self.model.get_submodule(layers_path)
        used = self.select_layer % (len(layers) + 1)
        paths = [f"{layers_path}.{i}" for i in range(used, len(layers))]
        paths += [p for p in self.architecture.after if isinstance(getattr(self.model, p, None), torch.nn.Module)]
        names = [f"{p}.{n}" for p in paths for n, _ in self.model.get_submodule(p).named_parameters()]
        params = dict(self.model.named_parameters())
        return [f"model.{n}" for n in [*self.architecture.idle, *names] if n in params]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, C, H, W) -> (B, N, D)."""
        out = self.model(pixel_values=pixel_values.to(self.model.dtype), output_hidden_states=True)
        return select_features(out.hidden_states[self.select_layer], self.select_feature, self.num_cls_tokens)


class HFVisionEncoder(HFEncoder):
    """A named preset of `HFEncoder` (`clip`, `siglip`): it pins the transformers config and model classes (so its
    section needs no `model_type`, and importers / exporters match it by class) and its CLS token count."""

    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    num_cls_tokens: int = 0

    def __init__(self, config: dict[str, Any], path: str | None = None, select_layer: int = -2,
                 select_feature: str = "patch", image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, resize: str = "squash", resample: str = "bicubic"):
        super().__init__(config, path, None, select_layer, select_feature, image_mean, image_std, resize, resample)

    @classmethod
    def hf_config(cls, config: dict[str, Any], model_type: str | None = None) -> PretrainedConfig:
        return cls.config_class(**config)

    @classmethod
    def _model_class(cls, cfg: PretrainedConfig) -> type[PreTrainedModel]:
        return cls.model_class
