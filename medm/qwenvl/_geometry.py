"""One image as the Qwen-VL vision tower sees it: its size from the header, and the geometry `smart_resize` gives it
(kept by the dataset and the record store to size each image's tokens before any pixel is decoded)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from medm.data.images import is_dicom, load_image

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class ImageGeometry:
    """One image as the vision tower sees it.

    Attributes:
        original: (width, height) as stored (boxes in records are pixels of this size).
        resized: (width, height) after upscaling tiny images and `smart_resize` (multiples of patch * merge).
        patch, merge: the processor's patch size and spatial merge size.
    """

    original: Size
    resized: Size
    patch: int
    merge: int

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """(1, H / patch, W / patch): the `image_grid_thw` row of this image."""
        return 1, self.resized[1] // self.patch, self.resized[0] // self.patch

    @property
    def num_tokens(self) -> int:
        """LLM tokens (`<|image_pad|>` ids) of this image."""
        _, gh, gw = self.grid_thw
        return gh * gw // self.merge ** 2


def image_size(path: str) -> Size:
    """(width, height) of an image file as `medm.data.images.load_image` returns it, from the header where it can
    (EXIF orientation applied); DICOM files are decoded."""
    if is_dicom(path):
        return load_image(path).size
    try:
        with Image.open(path) as im:
            w, h = im.size
            # EXIF orientations 5-8 rotate by 90 degrees: load_image's exif_transpose swaps the sides.
            return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)
    except OSError:
        return load_image(path).size  # raises ImageLoadError with the reason
