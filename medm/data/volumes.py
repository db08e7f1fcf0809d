"""Load 3D volumes (NIfTI, MGH, Analyze, NRRD, MetaImage, NumPy, DICOM series) and preprocess them for a 3D
encoder, with an optional disk cache.

Sources, told apart by the path (readers in `medm.data._volume_io`):

- `.nii` / `.nii.gz` (NIfTI), `.mgz` / `.mgh` (FreeSurfer), `.hdr` / `.img` (Analyze 7.5 or a NIfTI pair): nibabel,
  any dtype or byte order, the header's scaling applied. The affine gives orientation and spacing. A file whose
  qform and sform codes are both 0 (and every Analyze file) has no orientation: a warning names it and its axes
  are taken as R, A, S. CIFTI-2 files and RGB / RGBA voxels are refused with a one-line reason.
- `.nrrd` / `.nhdr` (NRRD), `.mha` / `.mhd` (MetaImage): SimpleITK; direction, spacing and origin give the affine
  (ITK's LPS converted to RAS); vector / RGB pixels are refused.
- `.npy`: a volume stored depth first, `(D, H, W)`, as MedM-VL and M3D keep them (uint8 already windowed, or raw
  HU); leading singleton axes such as M3D's `(1, D, H, W)` are dropped. A `.npy` has no geometry, so
  `orientation`, `spacing` and `resample` do not apply: the axes are used as stored. Loaded with
  `allow_pickle=False`.
- a directory: one DICOM series (pydicom). Files that are not DICOM images (DICOMDIR, notes) are skipped. Slices
  are sorted along the slice normal by `ImagePositionPatient` (with `ImageOrientationPatient`), or by
  `InstanceNumber` when a slice lacks them (then spacing comes from `SliceThickness`, warned). Each slice's
  `RescaleSlope` / `RescaleIntercept` is applied (CT -> HU). The affine is built from the geometry (LPS -> RAS).
  A folder with several series, slices of different sizes, or two slices at one position (a 4D series) is an
  error; a single multi-frame DICOM file is not supported.

Every source's size is read from its header (NIfTI / NRRD / MetaImage header, `.npy` header, DICOM rows x columns
x slices) and a volume above `max_voxels` is refused before its voxels are decoded. A singular or non-finite
affine is an error naming the file.

Steps of `VolumePreprocess` (settings: `VolumeArgs`):

1. read as float32 (one copy; complex voxels by `complex`: magnitude with a warning, real, or refuse); a 4D array
   with a singleton 4th axis (NIfTI `(X, Y, Z, 1)`) is squeezed, a real 4D one (time points, channels) is an error
   naming the file and shape.
2. non-finite voxels (NaN, +-Inf): `nonfinite: replace` (default) sets NaN and -Inf to the smallest finite voxel
   and +Inf to the largest, with a warning naming the file and the count, so one bad voxel does not end a long
   run; `nonfinite: error` raises instead. A volume with no finite voxel is always an error.
3. `resample: world` resamples an oblique or gantry-tilted volume onto an axis-aligned grid in world (RAS)
   coordinates (trilinear, at the file's voxel sizes, outside filled with the volume's minimum); without it the
   next step only permutes and flips axes, so a tilt stays in the voxels. Then `orientation` (MONAI
   `Orientation`, axis codes such as RAS) and `spacing` (MONAI `Spacing`, mm).
4. intensity (`intensity`, modes in `medm.data._intensity`): `auto` (CT -> the HU `window`; MR and other
   modalities -> per-volume `auto_percentiles` to [0, 1]; the modality comes from the record's `modality` field,
   else the DICOM Modality tag / MetaImage Modality / NIfTI description, else `modality`, else CT when a voxel
   lies at or below -900), `window` (clip a HU window to [0, 1]; default HU -1000..1000; warns when the volume
   holds no air), `uint8` (x / 255 for MedM-VL's uint8 volumes; values outside 0..255 are an error, non-integers
   a warning), `minmax` (per volume to [0, 1], optionally between percentiles), `standardize` ((x - mean) / std),
   `none`. Warnings name the file and come once per file.
5. `crop_foreground`: crop to the box of voxels above `foreground_threshold` (MONAI `CropForeground`).
6. depth first: the oriented axes (a, b, c) become (c, b, a), so with RAS the depth axis runs inferior ->
   superior, rows posterior -> anterior and columns patient left -> right. `orientation: LPS` gives the
   radiological axial view instead (rows anterior -> posterior, columns patient right -> left), which is how
   volumes stacked from display slices (M3D's data) look.
7. resize to the encoder's `(D, H, W)` (MONAI `Resize`).
   -- with `cache_dir`, the result of steps 1-7 is stored on disk (see `VolumePreprocess`) --
8. training augmentation, only when `augment` is on and the preprocessing is in training mode
   (`for_training()`, which `build_dataset` uses): in-plane rot90, flips along each axis, intensity scale and
   shift (M3D's recipe and probabilities by default). Random draws come from torch, so every DataLoader worker
   and every epoch draws differently and `torch.manual_seed` makes them reproducible.
9. channels: repeated to the encoder's channel count and normalised with its mean / std (slice-wise 2D
   encoders take 3-channel slices).

Memory: steps 1-7 hold at most two full-size float32 copies at a time (intensity steps work in place; a 512 x 512
x 300 CT peaks at +602 MB, see docs/data.md); `resample: world` adds its sampling grid.

Errors are `VolumeLoadError` (a ValueError) naming the file and the reason, also for failures inside the
preprocessing steps.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medm.config import arg, from_dict, to_dict
from medm.data._intensity import INTENSITY_MODES, IntensityContext, register_intensity
from medm.data._resample import resample_world
from medm.data._volume_io import (
    COMPLEX_MODES,
    DEFAULT_MAX_VOXELS,
    NIFTI_SUFFIXES,
    VOLUME_SUFFIXES,
    VolumeLoadError,
    _read,
    modality_name,
    read_volume,
    read_volume_header,
    verify_volume,
)
from medm.data.images import resolve_window

__all__ = ["DEFAULT_MAX_VOXELS", "INTENSITY_MODES", "NIFTI_SUFFIXES", "VOLUME_SUFFIXES", "VolumeArgs",
           "VolumeLoadError", "VolumePreprocess", "read_volume", "read_volume_header", "register_intensity",
           "verify_volume"]

logger = logging.getLogger(__name__)

RESIZE_MODES = ("trilinear", "nearest", "area")
NONFINITE = ("replace", "error")
RESAMPLE_MODES = (None, "world")
# Bump when the stored result of the same settings changes, so old cache files are not reused.
_CACHE_VERSION = 2
# Settings that act after the cached steps, so they are not part of the cache key.
_UNCACHED = ("cache_dir", "augment", "rot90_prob", "flip_prob", "scale_intensity", "shift_intensity",
             "intensity_prob")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass
class VolumeArgs:
    """How volumes are read and prepared for a 3D encoder (the `volume:` mapping of a 3D encoder's config).

    The output size is not set here: it is the encoder's input size (`image_size` of `vit3d`, `num_slices` and the
    2D encoder's size for `slices`).
    """

    orientation: str | None = arg("RAS", "axis codes to reorient NIfTI / DICOM volumes to (MONAI Orientation), e.g. "
                                         "RAS or LPS (radiological axial view); null: keep the file's axes")
    spacing: list | None = arg(None, "resample NIfTI / DICOM volumes to this voxel size in mm, depth first "
                                     "[D, H, W] (MONAI Spacing); null: keep the file's spacing")
    resample: str | None = arg(None, "world: resample oblique / gantry-tilted NIfTI / DICOM volumes onto an "
                                     "axis-aligned grid in world coordinates before orientation; null: keep the "
                                     "voxel grid (a tilt stays in the voxels)")
    intensity: str = arg("auto", "auto (CT: the HU window; MR and others: per-volume auto_percentiles to [0, 1]), "
                                 "window (HU window to [0, 1]), uint8 (x / 255, MedM-VL uint8 volumes), minmax "
                                 "(per volume to [0, 1]), standardize ((x - mean) / std), none; or a registered mode")
    modality: str | None = arg(None, "for intensity: auto: the modality (CT, MR, ...) when neither the record's "
                                     "`modality` field nor the file says; null: CT when a voxel is at or below -900 "
                                     "(air in HU), else MR")
    auto_percentiles: list = arg([0.5, 99.5], "for intensity: auto on MR and other non-CT volumes: the [low, high] "
                                              "percentiles mapped to 0 and 1 (clipped outside)")
    window: Any = arg([0.0, 2000.0], "for intensity: window: [center, width] in HU or a preset name (lung, "
                                     "mediastinum, soft_tissue, liver, bone, brain, subdural); default HU "
                                     "-1000..1000")
    percentiles: list = arg([0.0, 100.0], "for intensity: minmax: the [low, high] percentiles mapped to 0 and 1 "
                                          "(clipped outside); [0, 100] is plain min-max")
    standardize: list | None = arg(None, "for intensity: standardize: [mean, std], e.g. MedM-CLIP-CT's "
                                         "[55.6982188356434, 66.1943479570918]")
    crop_foreground: bool = arg(False, "crop to the bounding box of voxels above foreground_threshold")
    foreground_threshold: float = arg(0.0, "voxels above this value (after the intensity step) are foreground")
    crop_margin: int = arg(0, "voxels kept around the foreground box on every side")
    resize_mode: str = arg("trilinear", "interpolation to the encoder's size: trilinear, nearest, area")
    complex: str = arg("magnitude", "complex voxels: magnitude (with a warning naming the file), real, or refuse")
    max_voxels: int | None = arg(DEFAULT_MAX_VOXELS, "refuse volumes with more voxels than this (read from the "
                                                     "header, before decoding); null: no limit")
    nonfinite: str = arg("replace", "NaN / Inf voxels: replace (by the smallest / largest finite voxel, with a "
                                    "warning) or error")
    cache_dir: str | None = arg(None, "store preprocessed volumes here (keyed by file path, mtime, size and these "
                                      "settings) so later epochs skip the work; null: no cache")
    augment: bool = arg(False, "training augmentation (only in the training dataset): rot90, flips, intensity")
    rot90_prob: float = arg(0.5, "augment: probability of an in-plane rotation by 90, 180 or 270 degrees "
                                 "(needs a square H x W)")
    flip_prob: float = arg(0.1, "augment: probability of a flip, drawn for each of the three axes")
    scale_intensity: float = arg(0.1, "augment: intensities times (1 + f), f uniform in +-this")
    shift_intensity: float = arg(0.1, "augment: intensities plus an offset uniform in +-this")
    intensity_prob: float = arg(0.5, "augment: probability of the scale and (separately) of the shift")

    def __post_init__(self):
        def bad(name, value, why):
            raise ValueError(f"volume.{name}: {value!r} {why}")

        for name, value, choices in (("intensity", self.intensity, INTENSITY_MODES),
                                     ("resize_mode", self.resize_mode, RESIZE_MODES),
                                     ("nonfinite", self.nonfinite, NONFINITE),
                                     ("complex", self.complex, COMPLEX_MODES),
                                     ("resample", self.resample, RESAMPLE_MODES)):
            if value not in choices:
                bad(name, value, f"is not one of {', '.join('null' if c is None else c for c in choices)}")
        if self.orientation is not None and (not isinstance(self.orientation, str) or len(self.orientation) != 3
                                             or set(self.orientation.upper()) - set("LRPAIS")):
            bad("orientation", self.orientation, "must be three axis codes such as RAS or LPS, or null")
        if self.spacing is not None and (len(self.spacing) != 3 or any(float(s) <= 0 for s in self.spacing)):
            bad("spacing", self.spacing, "must be three positive sizes in mm, depth first [D, H, W], or null")
        if self.intensity in ("window", "auto"):
            try:
                resolve_window(self.window)
            except ValueError as e:
                bad("window", self.window, f"is invalid: {e}")
        for name in ("percentiles", "auto_percentiles"):
            lo, hi = (float(p) for p in getattr(self, name))
            if not 0 <= lo < hi <= 100:
                bad(name, getattr(self, name), "must be [low, high] with 0 <= low < high <= 100")
        if self.modality is not None and modality_name(self.modality) is None:
            bad("modality", self.modality, "is not a modality code such as CT or MR")
        if self.max_voxels is not None and int(self.max_voxels) < 1:
            bad("max_voxels", self.max_voxels, "must be a positive voxel count or null")
        if self.intensity == "standardize" and (self.standardize is None or len(self.standardize) != 2
                                                or float(self.standardize[1]) <= 0):
            bad("standardize", self.standardize, "must be [mean, std] with std > 0 for intensity: standardize")
        if self.crop_margin < 0:
            bad("crop_margin", self.crop_margin, "must be >= 0")
        for name in ("rot90_prob", "flip_prob", "intensity_prob"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, getattr(self, name), "must be a probability in [0, 1]")


def parse_volume_args(volume: VolumeArgs | dict | None, where: str = "volume") -> VolumeArgs:
    """A `VolumeArgs` from an encoder's `volume:` mapping (None: all defaults); unknown keys are errors."""
    if isinstance(volume, VolumeArgs):
        return volume
    return from_dict(VolumeArgs, volume, where)


# ---- preprocessing ----------------------------------------------------------------------------------------------
class _Above:
    """Picklable foreground test for CropForeground (DataLoader workers may pickle the preprocessing)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x > self.threshold


class VolumePreprocess:
    """Path -> `(C, D, H, W)` float32 tensor for one encoder; the dataset's `volume_preprocess` hook.

    Args:
        args: `VolumeArgs` or its mapping (the encoder's `volume:` section); None: defaults.
        size: `(D, H, W)` the encoder takes.
        channels: output channels; the single-channel volume is repeated (3 for slice-wise 2D encoders).
        mean, std: per-channel normalisation after the [0, 1] intensity step, one value per channel; None: none.
        train: apply `augment` (when on); see `for_training()`.

    With `args.cache_dir`, the deterministic part (read to resize) is stored as
    `cache_dir/<sha256>.npy`, keyed by the source's real path, modification time (ns) and size (every file of
    a DICOM folder), these settings (augmentation and `cache_dir` excluded) and `size`. Files are written
    atomically (a temporary name, then a rename), so several DataLoader workers may share one directory.
    """

    def __init__(self, args: VolumeArgs | dict | None, size: Sequence[int], channels: int = 1,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, train: bool = False):
        self.args = parse_volume_args(args)
        self.size = tuple(int(s) for s in size)
        if len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"volume size must be (D, H, W) with positive sizes, got {tuple(size)}")
        if self.args.augment and self.args.rot90_prob > 0 and self.size[1] != self.size[2]:
            raise ValueError(f"volume.rot90_prob: in-plane rotation needs a square H x W, but the encoder takes "
                             f"{self.size[1]} x {self.size[2]}; set rot90_prob: 0")
        self.channels = channels
        for name, value in (("mean", mean), ("std", std)):
            if value is not None and len(value) != channels:
                raise ValueError(f"volume preprocessing: {name} {list(value)} needs one value per channel ({channels})")
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        self.train = train
        self._spacing_warned = False

    def for_training(self) -> VolumePreprocess:
        """A copy that applies the augmentation (when `augment` is on); the original stays deterministic."""
        new = copy.copy(self)
        new.train = True
        return new

    # ---- what the hook returns ------------------------------------------------------------------------------
    def __call__(self, path: str | Path, modality: str | None = None) -> torch.Tensor:
        """Volume file or DICOM folder -> (C, D, H, W) float32.

        Args:
            modality: the record's `modality` field ("CT", "MR", ...), for `intensity: auto`; None: the file's.
        """
        x = self.load(path, modality)
        if self.train and self.args.augment:
            x = self._augment(x)
        return self._finish(x)

    def blank(self) -> torch.Tensor:
        """A (C, D, H, W) tensor of an all-zero (black) volume, for image-reliance checks."""
        return self._finish(torch.zeros(1, *self.size))

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.channels != 1:
            x = x.expand(self.channels, *x.shape[1:])
        if self.mean is not None:
            x = x - torch.tensor(self.mean).view(-1, 1, 1, 1)
        if self.std is not None:
            x = x / torch.tensor(self.std).view(-1, 1, 1, 1)
        return x.contiguous()

    # ---- the cached, deterministic part ---------------------------------------------------------------------
    def load(self, path: str | Path, modality: str | None = None) -> torch.Tensor:
        """Steps 1-7 (read to resize), through the cache when `cache_dir` is set: (1, D, H, W) float32."""
        if not self.args.cache_dir:
            return self._compute(path, modality)
        key = self.cache_key(path, modality=modality) if modality else self.cache_key(path)
        file = os.path.join(self.args.cache_dir, key + ".npy")
        if os.path.isfile(file):
            try:
                cached = np.load(file, allow_pickle=False)
                if cached.shape == (1, *self.size) and cached.dtype == np.float32:
                    return torch.from_numpy(cached)
            except (OSError, ValueError, EOFError):
                pass
            logger.warning("volume cache file %s is unreadable or stale; recomputing %s", file, path)
        x = self._compute(path, modality)
        os.makedirs(self.args.cache_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.args.cache_dir, suffix=".tmp", delete=False) as f:
            np.save(f, x.numpy())
        os.replace(f.name, file)
        return x

    def cache_key(self, path: str | Path, modality: str | None = None) -> str:
        """sha256 of the source (real path, mtime, size; every file of a folder), the record's modality and the
        cached settings."""
        path = Path(path)
        if not path.exists():
            raise VolumeLoadError(path, "file not found")
        entries = sorted(path.iterdir()) if path.is_dir() else [path]
        stats = [(p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in entries if p.is_file()]
        settings = {k: v for k, v in to_dict(self.args).items() if k not in _UNCACHED}
        blob = json.dumps({"version": _CACHE_VERSION, "source": os.path.realpath(path), "files": stats,
                           "settings": settings, "size": self.size, "modality": modality}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _compute(self, path: str | Path, modality: str | None = None) -> torch.Tensor:
        try:
            return self._steps(Path(path), modality)
        except (VolumeLoadError, MemoryError):
            raise
        except (ValueError, RuntimeError, IndexError, TypeError) as e:  # inside MONAI / torch: name the file
            raise VolumeLoadError(path, f"preprocessing failed ({type(e).__name__}: {e})") from e

    def _steps(self, path: Path, modality: str | None) -> torch.Tensor:
        from monai.data import MetaTensor  # defers monai
        from monai.transforms import CropForeground, Orientation, Resize, Spacing  # defers monai

        a = self.args
        array, header = _read(path, a.nonfinite, a.max_voxels, a.complex)
        affine = header.affine
        if affine is None:
            if (a.spacing is not None or a.resample) and not self._spacing_warned:
                logger.warning("volume.spacing / resample are ignored for %s: a .npy file has no voxel geometry", path)
                self._spacing_warned = True
            x = torch.from_numpy(array)[None]  # already depth first
        else:
            x = MetaTensor(torch.from_numpy(array)[None], affine=torch.from_numpy(affine))
            del array  # the tensor shares it; dropping the name lets each step free the copy before it
            if a.resample == "world":
                x = resample_world(x, affine, a.spacing)
            if a.orientation is not None:
                x = Orientation(axcodes=a.orientation.upper(), labels=_RAS_LABELS)(x)
            if a.spacing is not None:
                x = Spacing(pixdim=[float(s) for s in reversed(a.spacing)], mode="bilinear")(x)
        x = _plain(x)
        ctx = IntensityContext(path, modality_name(modality) or header.modality, header.scale)
        x = INTENSITY_MODES[a.intensity](x, a, ctx)
        if a.crop_foreground:
            if bool((x > a.foreground_threshold).any()):
                x = _plain(CropForeground(select_fn=_Above(a.foreground_threshold), margin=a.crop_margin,
                                          allow_smaller=True)(x))
            else:
                warnings.warn(f"{path}: no voxel above foreground_threshold={a.foreground_threshold:g}; the whole "
                              "volume is kept", stacklevel=2)
        if affine is not None:
            x = x.permute(0, 3, 2, 1)  # oriented (a, b, c) -> depth first (c, b, a); a view, Resize reads it
        x = Resize(spatial_size=self.size, mode=a.resize_mode)(x)
        return _plain(x).to(torch.float32).contiguous()

    # ---- augmentation ---------------------------------------------------------------------------------------
    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        from monai.transforms import (  # defers monai
            Compose,
            RandFlip,
            RandRotate90,
            RandScaleIntensity,
            RandShiftIntensity,
        )

        a = self.args
        chain = [RandRotate90(prob=a.rot90_prob, spatial_axes=(1, 2))] if a.rot90_prob > 0 else []
        chain += [RandFlip(prob=a.flip_prob, spatial_axis=axis) for axis in range(3)] if a.flip_prob > 0 else []
        if a.intensity_prob > 0 and a.scale_intensity > 0:
            chain.append(RandScaleIntensity(factors=a.scale_intensity, prob=a.intensity_prob))
        if a.intensity_prob > 0 and a.shift_intensity > 0:
            chain.append(RandShiftIntensity(offsets=a.shift_intensity, prob=a.intensity_prob))
        if not chain:
            return x
        # MONAI draws from its own numpy RandomState, which DataLoader workers would all inherit in the same state;
        # seeding it from torch (which the DataLoader seeds per worker) gives each worker and epoch its own draws.
        aug = Compose(chain).set_random_state(seed=int(torch.randint(0, 2**31 - 1, ())))
        out = aug(x.clone())
        return _plain(out).to(torch.float32).contiguous()


def _plain(x: Any) -> torch.Tensor:
    """A plain torch tensor from a MONAI output (MetaTensor, tensor or array)."""
    x = torch.as_tensor(x)
    return x.as_tensor() if hasattr(x, "as_tensor") else x

