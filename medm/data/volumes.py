"""Load 3D volumes (NIfTI, NumPy, DICOM series) and preprocess them for a 3D encoder, with an optional disk cache.

Sources, told apart by the path:

- `.nii` / `.nii.gz`: NIfTI through MONAI's `NibabelReader` (any dtype or byte order; the header's scaling is
  applied). The affine gives orientation and spacing.
- `.npy`: a volume stored depth first, `(D, H, W)`, as MedM-VL and M3D keep them (uint8 already windowed, or raw
  HU); leading singleton axes such as M3D's `(1, D, H, W)` are dropped. A `.npy` has no geometry, so
  `orientation` and `spacing` do not apply: the axes are used as stored. Loaded with `allow_pickle=False`.
- a directory: one DICOM series (pydicom). Files that are not DICOM images (DICOMDIR, notes) are skipped. Slices
  are sorted along the slice normal by `ImagePositionPatient` (with `ImageOrientationPatient`), or by
  `InstanceNumber` when a slice lacks them (then spacing comes from `SliceThickness`, warned). Each slice's
  `RescaleSlope` / `RescaleIntercept` is applied (CT -> HU). The affine is built from the geometry (LPS -> RAS).
  A folder with several series, slices of different sizes, or two slices at one position (a 4D series) is an
  error; a single multi-frame DICOM file is not supported.

Steps of `VolumePreprocess` (settings: `VolumeArgs`):

1. read as float32; a 4D array with a singleton 4th axis (NIfTI `(X, Y, Z, 1)`) is squeezed, a real 4D one
   (time points, channels) is an error naming the file and shape.
2. non-finite voxels (NaN, +-Inf): `nonfinite: replace` (default) sets NaN and -Inf to the smallest finite voxel
   and +Inf to the largest, with a warning naming the file and the count, so one bad voxel does not end a long
   run; `nonfinite: error` raises instead. A volume with no finite voxel is always an error.
3. `orientation` (MONAI `Orientation`, axis codes such as RAS) and `spacing` (MONAI `Spacing`, mm).
4. intensity (`intensity`): `window` (clip a HU window to [0, 1]; default HU -1000..1000), `uint8` (x / 255 for
   MedM-VL's uint8 volumes; values outside 0..255 are an error), `minmax` (per volume to [0, 1], optionally
   between percentiles, for MR), `standardize` ((x - mean) / std), `none`.
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

Errors are `VolumeLoadError` (a ValueError) naming the file and the reason.
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
from medm.data.images import resolve_window

__all__ = ["VolumeArgs", "VolumeLoadError", "VolumePreprocess", "read_volume", "verify_volume"]

logger = logging.getLogger(__name__)

INTENSITY_MODES = ("window", "uint8", "minmax", "standardize", "none")
RESIZE_MODES = ("trilinear", "nearest", "area")
NONFINITE = ("replace", "error")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Bump when the stored result of the same settings changes, so old cache files are not reused.
_CACHE_VERSION = 1
# Settings that act after the cached steps, so they are not part of the cache key.
_UNCACHED = ("cache_dir", "augment", "rot90_prob", "flip_prob", "scale_intensity", "shift_intensity",
             "intensity_prob")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class VolumeLoadError(ValueError):
    """A volume that cannot be loaded; the message names the file (or series folder) and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot load volume {str(path)!r}: {reason}")
        self.path = str(path)
        self.reason = reason


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
    intensity: str = arg("window", "window (HU window to [0, 1]), uint8 (x / 255, MedM-VL uint8 volumes), minmax "
                                   "(per volume to [0, 1], for MR), standardize ((x - mean) / std), none")
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
                                     ("nonfinite", self.nonfinite, NONFINITE)):
            if value not in choices:
                bad(name, value, f"is not one of {', '.join(choices)}")
        if self.orientation is not None and (not isinstance(self.orientation, str) or len(self.orientation) != 3
                                             or set(self.orientation.upper()) - set("LRPAIS")):
            bad("orientation", self.orientation, "must be three axis codes such as RAS or LPS, or null")
        if self.spacing is not None and (len(self.spacing) != 3 or any(float(s) <= 0 for s in self.spacing)):
            bad("spacing", self.spacing, "must be three positive sizes in mm, depth first [D, H, W], or null")
        if self.intensity == "window":
            try:
                resolve_window(self.window)
            except ValueError as e:
                bad("window", self.window, f"is invalid: {e}")
        lo, hi = (float(p) for p in self.percentiles)
        if not 0 <= lo < hi <= 100:
            bad("percentiles", self.percentiles, "must be [low, high] with 0 <= low < high <= 100")
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


# ---- reading ----------------------------------------------------------------------------------------------------
def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_volume(path: str | Path, nonfinite: str = "replace") -> tuple[np.ndarray, np.ndarray | None]:
    """Read a volume as float32 with non-finite voxels handled (steps 1-2 of the module docstring).

    Returns:
        (array, affine): for NIfTI and DICOM, the array is in the file's voxel axes (X, Y, Z) and `affine` (4, 4)
        maps them to RAS mm; for `.npy`, the array is (D, H, W) as stored and `affine` is None.

    Raises:
        VolumeLoadError: missing, empty, unsupported or unreadable source, a real 4D or a 2D array, or (with
            `nonfinite: error`) NaN / Inf voxels.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeLoadError(path, "file not found")
    if path.is_dir():
        array, affine = _read_dicom_series(path)
    elif path.stat().st_size == 0:
        raise VolumeLoadError(path, "file is empty (0 bytes)")
    elif _is_nifti(path):
        array, affine = _read_nifti(path)
    elif path.suffix.lower() == ".npy":
        array, affine = _read_npy(path), None
    else:
        raise VolumeLoadError(path, "unsupported volume format; use NIfTI (.nii, .nii.gz), NumPy (.npy, depth first) "
                                    "or a folder holding one DICOM series")
    return _replace_nonfinite(path, array, nonfinite), affine


def verify_volume(path: str | Path) -> None:
    """Raise VolumeLoadError unless `path` reads as a volume (used by data validation)."""
    read_volume(path)


def _to_3d(path: Path, array: np.ndarray, leading: bool) -> np.ndarray:
    """Drop singleton extra axes (leading ones for .npy, trailing ones for NIfTI); refuse real 4D and 2D."""
    shape = array.shape
    while array.ndim > 3 and array.shape[0 if leading else -1] == 1:
        array = array[0] if leading else array[..., 0]
    if array.ndim > 3:
        raise VolumeLoadError(path, f"array of shape {shape} is 4D (time points or channels); medm takes one 3D "
                                    "volume: save the one you need as its own file")
    if array.ndim < 3:
        raise VolumeLoadError(path, f"array of shape {shape} is not a 3D volume (use `image` for 2D images)")
    if 0 in array.shape:
        raise VolumeLoadError(path, f"array of shape {shape} has an empty axis")
    return array


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from monai.data import NibabelReader

    try:
        reader = NibabelReader()
        array, meta = reader.get_data(reader.read(str(path)))
        # astype: any stored dtype or byte order (e.g. big-endian int16) becomes native float32.
        array = np.asarray(array).astype(np.float32)
    except Exception as e:  # nibabel raises many types for truncated gzip, bad headers, short data
        raise VolumeLoadError(path, f"not a readable NIfTI file ({type(e).__name__}: {e})") from e
    return _to_3d(path, array, leading=False), np.asarray(meta["affine"], dtype=np.float64)


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as e:  # ValueError for object arrays / bad headers, EOFError for truncated data
        raise VolumeLoadError(path, f"not a readable .npy array ({type(e).__name__}: {e})") from e
    if array.dtype.kind not in "biuf":
        raise VolumeLoadError(path, f"array dtype {array.dtype} is not numeric")
    return _to_3d(path, array, leading=True).astype(np.float32)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import pydicom

    slices = []
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(file, force=True)
        except Exception:  # not DICOM: notes, thumbnails, ...
            continue
        if "PixelData" in ds and "Rows" in ds:
            slices.append((file, ds))
    if not slices:
        raise VolumeLoadError(folder, "folder holds no DICOM image files (a volume folder must hold one series)")
    series = {}
    for file, ds in slices:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(file.name)
    if len(series) > 1:
        listing = "; ".join(f"{uid or '(no SeriesInstanceUID)'}: {len(files)} files, e.g. {files[0]}"
                            for uid, files in series.items())
        raise VolumeLoadError(folder, f"folder holds {len(series)} DICOM series ({listing}); put each series in "
                                      "its own folder")
    multi = next((f for f, ds in slices if int(ds.get("NumberOfFrames") or 1) > 1), None)
    if multi is not None:
        raise VolumeLoadError(folder, f"{multi.name} is a multi-frame DICOM; only series of single-frame slices "
                                      "are supported")
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    if len(shapes) > 1:
        raise VolumeLoadError(folder, f"slices have different sizes {sorted(shapes)}")

    geometric = all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for _, ds in slices)
    if geometric:
        iop = np.asarray(slices[0][1].ImageOrientationPatient, dtype=np.float64)
        row_dir, col_dir = iop[:3], iop[3:]
        normal = np.cross(row_dir, col_dir)
        pos = {f: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal)) for f, ds in slices}
        slices.sort(key=lambda s: pos[s[0]])
        where = np.array([pos[f] for f, _ in slices])
        if len(where) > 1 and np.any(np.diff(where) < 1e-4):
            i = int(np.argmin(np.diff(where)))
            raise VolumeLoadError(folder, f"{slices[i][0].name} and {slices[i + 1][0].name} lie at the same position "
                                          "(a 4D series: time points or echoes); split it into one folder per volume")
    elif all("InstanceNumber" in ds for _, ds in slices):
        warnings.warn(f"{folder}: slices lack ImagePositionPatient / ImageOrientationPatient; sorted by "
                      "InstanceNumber, spacing from SliceThickness", stacklevel=3)
        slices.sort(key=lambda s: int(s[1].InstanceNumber))
        row_dir, col_dir, normal = np.eye(3)
    else:
        raise VolumeLoadError(folder, "slices have neither ImagePositionPatient nor InstanceNumber, so their order "
                                      "is unknown")

    planes = []
    for file, ds in slices:
        try:
            px = ds.pixel_array.astype(np.float32)
        except Exception as e:
            raise VolumeLoadError(folder, f"{file.name}: cannot decode pixel data ({type(e).__name__}: {e})") from e
        if px.ndim != 2:
            raise VolumeLoadError(folder, f"{file.name}: pixel data of shape {px.shape} is not one grey slice")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        planes.append(px * slope + intercept)
    # pixel_array is (rows, columns); stored as (columns, rows, slices) = voxel axes (i, j, k) of the DICOM affine.
    array = np.stack(planes, axis=-1).transpose(1, 0, 2)

    first = slices[0][1]
    row_spacing, col_spacing = (float(v) for v in first.get("PixelSpacing", [1.0, 1.0]))
    if geometric and len(slices) > 1:
        origin = np.asarray(first.ImagePositionPatient, dtype=np.float64)
        last = np.asarray(slices[-1][1].ImagePositionPatient, dtype=np.float64)
        step = (last - origin) / (len(slices) - 1)
        gaps = np.diff(where)
        if gaps.max() - gaps.min() > 0.1 * gaps.mean():
            warnings.warn(f"{folder}: slice spacing is irregular ({gaps.min():.3g} to {gaps.max():.3g} mm); the "
                          f"volume is treated as evenly spaced at {gaps.mean():.3g} mm", stacklevel=3)
    else:
        origin = np.asarray(first.get("ImagePositionPatient", [0.0, 0.0, 0.0]), dtype=np.float64)
        step = normal * float(first.get("SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # column index i moves along the row direction
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _replace_nonfinite(path: Path, array: np.ndarray, policy: str) -> np.ndarray:
    finite = np.isfinite(array)
    if finite.all():
        return array
    bad = int(array.size - finite.sum())
    if not finite.any():
        raise VolumeLoadError(path, "every voxel is NaN or infinite")
    if policy == "error":
        raise VolumeLoadError(path, f"{bad} of {array.size} voxels are NaN or infinite (set volume.nonfinite: "
                                    "replace to load it anyway)")
    lo, hi = float(array[finite].min()), float(array[finite].max())
    warnings.warn(f"{path}: {bad} of {array.size} voxels are NaN or infinite; NaN and -Inf set to {lo:g}, +Inf to "
                  f"{hi:g}", stacklevel=3)
    return np.nan_to_num(array, nan=lo, posinf=hi, neginf=lo)


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
    def __call__(self, path: str | Path) -> torch.Tensor:
        """Volume file or DICOM folder -> (C, D, H, W) float32."""
        x = self.load(path)
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
    def load(self, path: str | Path) -> torch.Tensor:
        """Steps 1-7 (read to resize), through the cache when `cache_dir` is set: (1, D, H, W) float32."""
        if not self.args.cache_dir:
            return self._compute(path)
        file = os.path.join(self.args.cache_dir, self.cache_key(path) + ".npy")
        if os.path.isfile(file):
            try:
                cached = np.load(file, allow_pickle=False)
                if cached.shape == (1, *self.size) and cached.dtype == np.float32:
                    return torch.from_numpy(cached)
            except (OSError, ValueError, EOFError):
                pass
            logger.warning("volume cache file %s is unreadable or stale; recomputing %s", file, path)
        x = self._compute(path)
        os.makedirs(self.args.cache_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.args.cache_dir, suffix=".tmp", delete=False) as f:
            np.save(f, x.numpy())
        os.replace(f.name, file)
        return x

    def cache_key(self, path: str | Path) -> str:
        """sha256 of the source (real path, mtime, size; every file of a folder) and the cached settings."""
        path = Path(path)
        if not path.exists():
            raise VolumeLoadError(path, "file not found")
        entries = sorted(path.iterdir()) if path.is_dir() else [path]
        stats = [(p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in entries if p.is_file()]
        settings = {k: v for k, v in to_dict(self.args).items() if k not in _UNCACHED}
        blob = json.dumps({"version": _CACHE_VERSION, "source": os.path.realpath(path), "files": stats,
                           "settings": settings, "size": self.size}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _compute(self, path: str | Path) -> torch.Tensor:
        from monai.data import MetaTensor
        from monai.transforms import CropForeground, Orientation, Resize, Spacing

        a = self.args
        array, affine = read_volume(path, a.nonfinite)
        if affine is None:
            if a.spacing is not None and not self._spacing_warned:
                logger.warning("volume.spacing is ignored for %s: a .npy file has no voxel geometry", path)
                self._spacing_warned = True
            x = torch.from_numpy(array)[None]  # already depth first
        else:
            x = MetaTensor(torch.from_numpy(array)[None], affine=torch.from_numpy(affine))
            if a.orientation is not None:
                x = Orientation(axcodes=a.orientation.upper(), labels=_RAS_LABELS)(x)
            if a.spacing is not None:
                x = Spacing(pixdim=[float(s) for s in reversed(a.spacing)], mode="bilinear")(x)
        x = self._intensity(Path(path), x)
        if a.crop_foreground:
            if bool((x > a.foreground_threshold).any()):
                x = CropForeground(select_fn=_Above(a.foreground_threshold), margin=a.crop_margin,
                                   allow_smaller=True)(x)
            else:
                warnings.warn(f"{path}: no voxel above foreground_threshold={a.foreground_threshold:g}; the whole "
                              "volume is kept", stacklevel=2)
        x = _plain(x)
        if affine is not None:
            x = x.permute(0, 3, 2, 1)  # oriented (a, b, c) -> depth first (c, b, a)
        x = Resize(spatial_size=self.size, mode=a.resize_mode)(x.contiguous())
        return _plain(x).to(torch.float32).contiguous()

    def _intensity(self, path: Path, x: torch.Tensor) -> torch.Tensor:
        from monai.transforms import NormalizeIntensity, ScaleIntensity, ScaleIntensityRange

        a = self.args
        if a.intensity == "window":
            center, width = resolve_window(a.window)
            return ScaleIntensityRange(center - width / 2, center + width / 2, 0.0, 1.0, clip=True)(x)
        if a.intensity == "uint8":
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 255:
                raise VolumeLoadError(path, f"intensity: uint8 expects values in 0..255 (MedM-VL's windowed uint8 "
                                            f"volumes), but they span {lo:g}..{hi:g}; use intensity: window for HU")
            return x / 255.0
        if a.intensity == "minmax":
            lo_p, hi_p = (float(p) for p in a.percentiles)
            if (lo_p, hi_p) == (0.0, 100.0):
                return ScaleIntensity(minv=0.0, maxv=1.0)(x)
            # numpy, not torch.quantile: that refuses inputs above 16M voxels (one 512 x 512 x 64 CT).
            lo, hi = (float(v) for v in np.percentile(_plain(x).numpy(), [lo_p, hi_p]))
            if hi <= lo:
                return x * 0.0
            return ScaleIntensityRange(lo, hi, 0.0, 1.0, clip=True)(x)
        if a.intensity == "standardize":
            mean, std = (float(v) for v in a.standardize)
            return NormalizeIntensity(subtrahend=mean, divisor=std)(x)
        return x

    # ---- augmentation ---------------------------------------------------------------------------------------
    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        from monai.transforms import Compose, RandFlip, RandRotate90, RandScaleIntensity, RandShiftIntensity

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
