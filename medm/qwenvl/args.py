"""`QwenVLArgs`: the `qwenvl:` section of a model config whose `kind` is `qwen-vl`; how a checkpoint of the kind is
recognised (`is_qwenvl_checkpoint`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from medm.config import ConfigError, arg

# Model types (HF `config.model_type`) medm builds as the qwen-vl kind; medm.qwenvl.model maps each to its classes.
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
NAME = "qwen-vl"  # the kind's name: `model.kind` in the YAML, `config.medm.kind` in a checkpoint

# How each model writes a box; records hold the canonical pixel [x1, y1, x2, y2] of the original image
# (medm.qwenvl.boxes converts both ways).
BOX_FORMATS = {
    "tokens1000": "Qwen2-VL: <|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>, "
                  "coordinates on a 0-1000 grid over the image",
    "json_resized": 'Qwen2.5-VL: [{"bbox_2d": [x1, y1, x2, y2], "label": ...}] in pixels of the resized image the '
                    "vision tower sees (the processor's smart_resize)",
    "json1000": 'Qwen3-VL: [{"bbox_2d": [x1, y1, x2, y2], "label": ...}] on a 0-1000 grid over the image',
}


@dataclass
class QwenVLArgs:
    path: str | None = arg(None, "local directory or hub id of a pretrained Qwen-VL model (weights and processor); "
                                 "null: random init from `config`")
    config: dict | None = arg(None, "HF config as a mapping with `model_type` (qwen2_vl, qwen2_5_vl, qwen3_vl), with "
                                    "`text_config` and `vision_config`; used when `path` is null (tiny presets)")
    model_type: str | None = arg(None, "the model class (qwen2_vl, qwen2_5_vl, qwen3_vl) of the checkpoint at `path`: "
                                       "checked when it loads, and the architecture of its tiny offline twin; "
                                       "with `config`, taken from there")
    processor: str | None = arg(None, "processor directory or hub id; default: `path`")
    tiny_processor: bool = arg(False, "build the processor offline: a tiny BPE tokenizer trained in-process with the "
                                      "Qwen special tokens, and an image processor from `config`'s patch / merge "
                                      "sizes and min_pixels / max_pixels (tests and the demo)")
    box_format: str | None = arg(None, "how this model writes grounding boxes: " + "; ".join(
        f"{k} ({v})" for k, v in BOX_FORMATS.items()))
    min_pixels: int = arg(32 * 32, "smallest image area (pixels) the processor resizes to; LLaMA-Factory's default "
                                   "32x32")
    max_pixels: int = arg(768 * 768, "largest image area (pixels) the processor resizes to (bounds the image tokens: "
                                     "one per (patch x merge)^2 pixels); LLaMA-Factory's default 768x768")
    dtype: str = arg("float32", "weights dtype: float32, bfloat16, float16")
    attn_implementation: str = arg("sdpa", "eager, sdpa, or flash_attention_2 (GPU, needs flash-attn)")
    trust_remote_code: bool = arg(False, "run model code shipped with the checkpoint; off unless you trust it")
    lora_target_modules: list | None = arg(None, "LoRA targets in the language model (name suffixes); null: q_proj, "
                                                 "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")

    def check(self, where: str) -> None:
        """Raise ConfigError (naming `where` and the field) for settings that cannot build a model."""
        if (self.path is None) == (self.config is None):
            raise ConfigError(f"{where}: set exactly one of `path` (pretrained) or `config` (random init)")
        if self.model_type is not None and self.model_type not in MODEL_TYPES:
            raise ConfigError(f"{where}.model_type: {self.model_type!r}; supported: {', '.join(MODEL_TYPES)}")
        if self.config is not None:
            model_type = self.config.get("model_type") if isinstance(self.config, dict) else None
            if model_type not in MODEL_TYPES:
                raise ConfigError(f"{where}.config.model_type: {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
            if self.model_type not in (None, model_type):
                raise ConfigError(f"{where}: model_type {self.model_type!r} but config.model_type {model_type!r}")
            if not self.tiny_processor and self.processor is None:
                raise ConfigError(f"{where}: a random-init `config` needs `processor` (a directory or hub id) or "
                                  "`tiny_processor: true`")
        if self.box_format not in BOX_FORMATS:
            raise ConfigError(f"{where}.box_format: {self.box_format!r}; set one of: " + "; ".join(
                f"{k} ({v})" for k, v in BOX_FORMATS.items()))
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(f"{where}: need 0 < min_pixels <= max_pixels, got {self.min_pixels} and "
                              f"{self.max_pixels}")


def is_qwenvl_checkpoint(path: str) -> bool:
    """True when `path`'s config.json was written by a qwen-vl model of medm (`config.medm.kind`)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        return False
    with open(cfg_file) as f:
        medm = json.load(f).get("medm")
    return isinstance(medm, dict) and medm.get("kind") == NAME
