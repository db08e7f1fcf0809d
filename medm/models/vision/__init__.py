"""Vision encoders, one file each; importing this package registers them."""

from medm.models.vision import clip, open_clip, siglip, slices, timm, vit3d  # noqa: F401
from medm.models.vision._base import ImagePreprocess, VisionEncoder

__all__ = ["ImagePreprocess", "VisionEncoder"]
