"""MedM-VL's own CT preprocessing, for checkpoints `medm import medm-vl --image3d-slices N` brings in
(`vision3d: slices` with `medm_vl_ct: hu | uint8`).

MedM-VL reads CT as `.npy` volumes stored depth first and prepares them in this order (lvlm/dataset/dataset.py and
the encoder's ImageProcessor, `transform_3d_val`):

1. `hu` only (MedM-VL b1b0770 and later): clip to HU -1000..1000 and scale to 0..255 (float64, numpy). At 193feb7
   (the release era) those lines are commented out: the stored volume is uint8 already (`uint8`), read as is.
2. MONAI `CropForeground()` (voxels > 0), then `Resize` to (32, S, S), trilinear, on the 0..255 scale.
3. `.to(torch.uint8)`: the resized values floored to whole levels.
4. per slice, the 2D processor: / 255, then the encoder's mean / std (`VolumePreprocess` does the last step).

Steps 1-3 replace medm's intensity / crop / resize steps; doing them in this order (the floor after the resize on
the 0..255 scale) makes the pixels equal MedM-VL's up to float rounding, where medm's own `intensity: window` or
`uint8` (scale to [0, 1] first, no floor) would only come close.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from medm.data.volumes import VolumeLoadError, VolumePreprocess

MEDM_VL_CT = ("hu", "uint8")
HU_MIN, HU_MAX = -1000, 1000  # MedM-VL's HU2RGB window


def medm_vl_volume(path: str | Path, size: tuple[int, int, int], steps: str) -> torch.Tensor:
    """A MedM-VL CT `.npy` -> (1, D, H, W) float32 in [0, 1] (whole 1/255 levels), MedM-VL's steps 1-3 and / 255.

    Raises:
        VolumeLoadError: not a `.npy`, not 3D, or (`uint8`) values outside 0..255 (then the file holds HU:
            `hu` is the MedM-VL version's preprocessing).
    """
    from monai.transforms import CropForeground, Resize

    path = Path(path)
    if steps not in MEDM_VL_CT:
        raise ValueError(f"medm_vl_ct must be one of {', '.join(MEDM_VL_CT)}, got {steps!r}")
    if path.suffix != ".npy":
        raise VolumeLoadError(path, "MedM-VL's CT steps (medm_vl_ct) read MedM-VL's .npy volumes (depth first); "
                                    "for NIfTI / DICOM drop medm_vl_ct and set vision3d.volume (docs/migrating.md)")
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise VolumeLoadError(path, f"cannot read the .npy ({e})") from None
    while x.ndim > 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise VolumeLoadError(path, f"a MedM-VL CT volume is (D, H, W); got shape {tuple(x.shape)}")
    if steps == "hu":
        x = np.clip(x, HU_MIN, HU_MAX)
        x = (x - HU_MIN) / (HU_MAX - HU_MIN) * 255
    elif x.size and (float(x.min()) < 0 or float(x.max()) > 255):
        raise VolumeLoadError(path, f"medm_vl_ct: uint8 (MedM-VL 193feb7's stored uint8 volumes) expects values in "
                                    f"0..255, but they span {float(x.min()):g}..{float(x.max()):g}; HU volumes are "
                                    "read with medm_vl_ct: hu (MedM-VL b1b0770 and later)")
    x = CropForeground(allow_smaller=True)(x[np.newaxis])
    x = Resize(spatial_size=tuple(size), mode="trilinear")(x)
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    return (x.to(torch.uint8).to(torch.float32) / 255.0).contiguous()


class MedMVLVolumePreprocess(VolumePreprocess):
    """`VolumePreprocess` whose read-to-resize part is MedM-VL's (`medm_vl_volume`); channels, mean / std,
    augmentation and the cache work as for any volume. `steps`: hu or uint8 (see the module docstring)."""

    def __init__(self, steps: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if steps not in MEDM_VL_CT:
            raise ValueError(f"medm_vl_ct must be one of {', '.join(MEDM_VL_CT)}, got {steps!r}")
        self.steps = steps

    def _compute(self, path, *args, **kwargs) -> torch.Tensor:
        return medm_vl_volume(path, self.size, self.steps)

    def cache_key(self, path) -> str:
        return hashlib.sha256((super().cache_key(path) + "/medm_vl_ct=" + self.steps).encode()).hexdigest()
