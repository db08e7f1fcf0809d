"""The playground's slice viewer: a volume windowed for display, one axial slice at a time.

The display volume comes from the dataset's own `VolumePreprocess` (reading, orientation, windowing, resizing),
set for viewing: radiological axial view (`orientation: LPS`: slice 0 is the most inferior, rows run anterior ->
posterior, columns patient right -> left), one display slice per stored slice, and in-plane pixels of equal size
in mm (so anisotropic voxels do not stretch the picture), at most `MAX_SIDE` pixels a side. The window is a CT
preset of `medm.data.images.WINDOW_PRESETS` (Hounsfield units) or `DEFAULT_WINDOW` (min-max over the volume, for
MR, `.npy` volumes already in 0..255, or a first look).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medm.data.images import WINDOW_PRESETS
from medm.data.volumes import VolumeArgs, VolumePreprocess, read_volume_header

__all__ = ["DEFAULT_WINDOW", "MAX_SIDE", "WINDOW_CHOICES", "SliceViewer", "display_size", "window_volume"]

DEFAULT_WINDOW = "default"
# (label, value) pairs for the window selector; the values are WINDOW_PRESETS names.
WINDOW_CHOICES: list[tuple[str, str]] = [("default (file's own / min-max)", DEFAULT_WINDOW)] + [
    (name.replace("_", " "), name) for name in WINDOW_PRESETS]
# Longest in-plane side of a displayed slice, in pixels.
MAX_SIDE = 512


def display_size(path: str | Path, max_side: int = MAX_SIDE) -> tuple[int, int, int]:
    """(D, H, W) to view a volume at: every stored slice along the superior-inferior axis, square in-plane pixels.

    For NIfTI and DICOM series the depth is the number of voxels along the axis nearest to superior-inferior (the
    affine's orientation) and the in-plane size follows the physical extent in mm at the finest in-plane voxel
    size; a `.npy` volume has no geometry and keeps its stored (D, H, W). Either way H and W shrink to fit
    `max_side`.

    Raises:
        VolumeLoadError: the volume cannot be read (names the file and the reason).
    """
    from nibabel.orientations import io_orientation  # defers nibabel

    header = read_volume_header(path)  # shape and geometry only: the voxels are read once, by window_volume
    shape, affine = header.shape3d, header.affine
    if affine is None:
        depth, rows, cols = shape
        height, width = float(rows), float(cols)
    else:
        voxel_mm = np.linalg.norm(affine[:3, :3], axis=0)
        counts, extent_mm = [0, 0, 0], [0.0, 0.0, 0.0]
        # Row i of the orientation: the RAS axis (0 = left-right, 1 = posterior-anterior, 2 = inferior-superior)
        # that array axis i runs along.
        for i, (axis, _flip) in enumerate(io_orientation(affine)):
            counts[int(axis)] = shape[i]
            extent_mm[int(axis)] = shape[i] * voxel_mm[i]
        depth = counts[2]
        finest = min(extent_mm[0] / counts[0], extent_mm[1] / counts[1])
        height, width = extent_mm[1] / finest, extent_mm[0] / finest
    scale = min(1.0, max_side / max(height, width))
    return int(depth), max(1, round(height * scale)), max(1, round(width * scale))


def window_volume(path: str | Path, size: tuple[int, int, int], window: str = DEFAULT_WINDOW,
                  cache_dir: str | None = None) -> np.ndarray:
    """The volume as (D, H, W) uint8 for display, through `VolumePreprocess` with the given window.

    Args:
        size: the display (D, H, W), from `display_size`.
        window: a `WINDOW_PRESETS` name (CT, HU), or `DEFAULT_WINDOW` for min-max over the volume.
        cache_dir: `VolumePreprocess`'s disk cache, so switching back to a window is quick.
    """
    if window == DEFAULT_WINDOW:
        args = VolumeArgs(orientation="LPS", intensity="minmax", cache_dir=cache_dir)
    else:
        args = VolumeArgs(orientation="LPS", intensity="window", window=window, cache_dir=cache_dir)
    x = VolumePreprocess(args, size=size, channels=1)(path)  # (1, D, H, W) in [0, 1]
    return np.rint(x[0].clamp(0.0, 1.0).numpy() * 255.0).astype(np.uint8)


@dataclass
class SliceViewer:
    """A volume prepared for viewing: its display voxels, the window they were made with and the slice shown.

    Args:
        path: the volume file or DICOM series folder.
        name: what the user called it (the uploaded file's name), for captions and messages.
        size: display (D, H, W).
        voxels: (D, H, W) uint8 at `window`.
        index: the slice shown, 0 = most inferior.
    """

    path: str
    name: str
    size: tuple[int, int, int]
    window: str
    voxels: np.ndarray
    index: int
    cache_dir: str | None = None

    @classmethod
    def open(cls, path: str | Path, name: str | None = None, window: str = DEFAULT_WINDOW,
             cache_dir: str | None = None) -> SliceViewer:
        """Read and window a volume; the middle slice is shown first. Raises VolumeLoadError."""
        size = display_size(path)
        voxels = window_volume(path, size, window, cache_dir)
        return cls(str(path), name or Path(path).name, size, window, voxels, size[0] // 2, cache_dir)

    @property
    def num_slices(self) -> int:
        return self.size[0]

    def set_window(self, window: str) -> None:
        if window != self.window:
            self.voxels = window_volume(self.path, self.size, window, self.cache_dir)
            self.window = window

    def set_index(self, index: int) -> None:
        self.index = int(min(max(int(index), 0), self.num_slices - 1))

    def image(self) -> Image.Image:
        """The slice shown, as an 8-bit grey PIL image (H, W)."""
        return Image.fromarray(self.voxels[self.index])  # uint8 (H, W): mode "L"

    def caption(self) -> str:
        return f"{self.name}: axial slice {self.index + 1} of {self.num_slices}, window {self.window}"
