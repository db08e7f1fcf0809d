"""Vision encoders, one file each: `medm.registry` imports every public module of this folder at first lookup."""

from medm.models.vision._base import ImagePreprocess, VisionEncoder

__all__ = ["ImagePreprocess", "VisionEncoder"]
