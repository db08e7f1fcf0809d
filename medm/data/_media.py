"""A record's media through a model's own preprocessing, with every failure an error that names the file.

Training (`ConversationDataset`) and `medm data validate --model` both go through `image_tensor` / `volume_tensor`,
so a file that validates against a model is one that model's training reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from medm.config import ConfigError, model_section
from medm.data.images import ImageLoadError, load_image, verify_image
from medm.data.volumes import VolumeLoadError, verify_volume
from medm.models import parse_model_args
from medm.models.checkpoint import checkpoint_kind
from medm.registry import KIND, VISION

__all__ = ["ModelMedia", "check_media", "image_tensor", "load_model_media", "volume_tensor"]

# Errors a preprocessing step (PIL, torch, MONAI) raises on input it cannot handle.
_STEP_ERRORS = (ValueError, RuntimeError, IndexError, TypeError, ZeroDivisionError)


def image_tensor(preprocess: Callable, path: str) -> torch.Tensor:
    """(C, H, W) from an image file through `preprocess`; raises ImageLoadError naming the file."""
    image = load_image(path)
    try:
        return preprocess(image)
    except ImageLoadError:
        raise
    except _STEP_ERRORS as e:
        raise ImageLoadError(path, f"preprocessing failed ({type(e).__name__}: {e})") from e


def volume_tensor(preprocess: Callable, path: str, modality: Any = None) -> torch.Tensor:
    """(C, D, H, W) from a volume through `preprocess` (a `VolumePreprocess` or any path -> tensor hook), with the
    record's `modality` when it has one; raises VolumeLoadError naming the file."""
    try:
        return preprocess(path, modality=str(modality)) if modality else preprocess(path)
    except VolumeLoadError:
        raise
    except _STEP_ERRORS as e:
        raise VolumeLoadError(path, f"preprocessing failed ({type(e).__name__}: {e})") from e


@dataclass
class ModelMedia:
    """A model's 2D and 3D preprocessing, as its training applies them (None: the model takes no such input)."""

    source: str
    image: Callable | None = None
    volume: Callable | None = None


def load_model_media(path: str) -> ModelMedia:
    """The media preprocessing of a model config (model YAML, or a train YAML with a `model` section) or a
    checkpoint directory (its config.json).

    Raises:
        ValueError / OSError: unreadable config, unknown encoder, or a Qwen-VL model (its processor decides).
    """
    if os.path.isdir(path):
        file = os.path.join(path, "config.json")
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
        kind = checkpoint_kind(path)
        if KIND.get(kind).own_processor:
            raise ValueError(f"{path}: a {kind} checkpoint; its processor prepares images, so --model checks only "
                             "models whose encoders do")
        sections = {k: cfg.get(k) for k in ("vision", "vision3d")}
    else:
        sections = _yaml_sections(path)
    out = ModelMedia(path)
    for slot in ("vision", "vision3d"):
        section = sections.get(slot)
        if not section:
            continue
        cls = VISION.get(section["name"])
        resolved = cls.resolve_config(section) if hasattr(cls, "resolve_config") else dict(section)
        resolved = {"name": section["name"], **{k: v for k, v in resolved.items() if k != "name"}}
        setattr(out, "image" if slot == "vision" else "volume", cls.preprocessor(resolved))
    return out


def _yaml_sections(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a model or train config (a YAML mapping)")
    # a train config: only its model section matters here (the training settings are `medm train`'s to check)
    model = parse_model_args(*model_section(data, path)) if "model" in data else parse_model_args(data, path)
    if KIND.get(model.kind).own_processor:
        raise ConfigError(f"{path}: model kind {model.kind!r}; its processor prepares images, so --model checks only "
                          "models whose encoders do")
    return {"vision": model.vision, "vision3d": model.vision3d}


def check_media(key: str, path: str, media: ModelMedia | None = None, modality: Any = None) -> None:
    """Raise ImageLoadError / VolumeLoadError unless the file decodes; with a model's `media`, unless it also goes
    through that model's preprocessing (`key`: "image" or "image3d")."""
    if media is None:
        (verify_image if key == "image" else verify_volume)(path)
    elif key == "image":
        if media.image is None:
            raise ImageLoadError(path, f"the model {media.source!r} has no 2D vision encoder")
        image_tensor(media.image, path)
    else:
        if media.volume is None:
            raise VolumeLoadError(path, f"the model {media.source!r} has no 3D vision encoder")
        volume_tensor(media.volume, path, modality)
