"""MedM-VL's own CT preprocessing, for checkpoints `medm import medm-vl` brings in (`medm_vl_ct: hu | stored` on
the `slices` and `vit3d` towers).

MedM-VL reads CT as `.npy` volumes stored depth first. Its dataset (lvlm/dataset/dataset.py), by version:

- `hu` (MedM-VL b1b0770 and later, e.g. 225fc0f): every `.npy` is clipped to HU -1000..1000 and scaled to 0..255
  (float64, numpy) before the encoder's processor.
- `stored` (193feb7, the release era): those lines are commented out; the stored values go to the processor as
  they are (uint8 0..255 for the CT-Chest route).

Then the encoder's processor (its `transform_3d_val` / `transform_val`), which differs per encoder:

- `slices` (the 2D SigLIP run slice by slice, CT-Chest): MONAI `CropForeground()` (voxels > 0), `Resize` to
  (32, S, S) trilinear on the 0..255 scale, `.to(torch.uint8)` (floored to whole levels), then per slice / 255
  and the 2D processor's mean / std (`VolumePreprocess` does the last step).
- `m3d` (M3D-CLIP): / 255 (float32), minus the minimum, divided by the maximum, `CropForeground()`, `Resize`.
- `medm-clip-ct` (MedM-CLIP-CT): (x - 55.698) / 66.194, `CropForeground()`, `Resize`.

(MedM-VL asks MONAI for `bilinear` on volumes, which it runs as trilinear.) Reproducing these steps in this order
(on the slices route the floor after the resize on the 0..255 scale) makes the pixels equal MedM-VL's up to float
rounding, where medm's own `volume` steps would only come close.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from medm.data.volumes import VolumeLoadError, VolumePreprocess

MEDM_VL_CT = ("hu", "stored")
ROUTES = ("slices", "m3d", "medm-clip-ct")
HU_MIN, HU_MAX = -1000, 1000  # MedM-VL's HU2RGB window
MEDMCLIP_MEAN, MEDMCLIP_STD = 55.6982188356434, 66.1943479570918  # MedM-CLIP-CT's Image3DProcessor


def medm_vl_volume(path: str | Path, size, steps: str, route: str = "slices") -> torch.Tensor:
    """A MedM-VL CT `.npy` -> (1, D, H, W) float32, MedM-VL's dataset and processor steps for `route` (slices: in
    [0, 1], whole 1/255 levels, before the 2D mean / std).

    Raises:
        VolumeLoadError: not a `.npy`, not 3D, or (slices route with `stored`) values outside 0..255: then the file
            holds HU, which `hu` (MedM-VL b1b0770 and later) clips.
    """
    from monai.transforms import CropForeground, Resize  # defers monai

    path = Path(path)
    if steps not in MEDM_VL_CT or route not in ROUTES:
        raise ValueError(f"medm_vl_ct must be one of {', '.join(MEDM_VL_CT)} on a route of {', '.join(ROUTES)}, got "
                         f"{steps!r} on {route!r}")
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
    elif route == "slices" and x.size and (float(x.min()) < 0 or float(x.max()) > 255):
        raise VolumeLoadError(path, f"medm_vl_ct: stored (MedM-VL 193feb7's stored uint8 volumes) expects values in "
                                    f"0..255, but they span {float(x.min()):g}..{float(x.max()):g}; HU volumes are "
                                    "read with medm_vl_ct: hu (MedM-VL b1b0770 and later)")
    if route == "m3d":
        x = x.astype(np.float32) / 255.0
        x = x - x.min()
        x = x / np.clip(x.max(), a_min=1e-8, a_max=None)
    elif route == "medm-clip-ct":
        x = (x - MEDMCLIP_MEAN) / MEDMCLIP_STD
    x = CropForeground(allow_smaller=True)(x[np.newaxis])
    x = Resize(spatial_size=tuple(size), mode="trilinear")(x)
    x = torch.as_tensor(x).float()
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    if route == "slices":
        x = x.to(torch.uint8).to(torch.float32) / 255.0
    return x.contiguous()


class MedMVLVolumePreprocess(VolumePreprocess):
    """`VolumePreprocess` whose read-to-resize part is MedM-VL's (`medm_vl_volume`); channels, mean / std,
    augmentation and the cache work as for any volume. `steps`: hu or stored; `route`: slices, m3d, medm-clip-ct
    (see the module docstring)."""

    def __init__(self, steps: str, route: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if steps not in MEDM_VL_CT or route not in ROUTES:
            raise ValueError(f"medm_vl_ct must be one of {', '.join(MEDM_VL_CT)} on a route of {', '.join(ROUTES)}, "
                             f"got {steps!r} on {route!r}")
        self.steps, self.route = steps, route

    def _compute(self, path, *args, **kwargs) -> torch.Tensor:
        return medm_vl_volume(path, self.size, self.steps, self.route)

    def cache_key(self, path) -> str:
        extra = f"/medm_vl_ct={self.steps}/{self.route}"
        return hashlib.sha256((super().cache_key(path) + extra).encode()).hexdigest()
