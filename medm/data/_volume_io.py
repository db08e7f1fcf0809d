"""Reading volume files: the header first (size limit, kind of data), then the voxels as float32 (medm.data.volumes).

Each reader returns a `VolumeHeader` without touching the voxel data, so a file above `max_voxels` is refused
before it is decoded, and `VolumeHeader.read()` then gives the stored array. Formats, told apart by the suffix:
NIfTI / MGH / Analyze through nibabel, NRRD / MetaImage through SimpleITK, `.npy` through numpy (memory-mapped
header), DICOM series folders through pydicom (`medm.data._dicom_series`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from medm.data._dicom_series import read_series_header
from medm.data._volume_header import VolumeHeader, modality_name

__all__ = ["DEFAULT_MAX_VOXELS", "COMPLEX_MODES", "VOLUME_SUFFIXES", "VolumeHeader", "VolumeLoadError",
           "read_header", "read_array", "replace_nonfinite"]

# 512 x 512 x 1024 voxels (1 GiB as float32): every CT series in practice, far below a 1024^3 bomb.
DEFAULT_MAX_VOXELS = 512 * 512 * 1024
COMPLEX_MODES = ("magnitude", "real", "refuse")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NIBABEL_SUFFIXES = (*NIFTI_SUFFIXES, ".mgz", ".mgh", ".hdr", ".img")  # NIfTI, FreeSurfer MGH, Analyze 7.5
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")  # NRRD and MetaImage, through SimpleITK
VOLUME_SUFFIXES = (*NIBABEL_SUFFIXES, *ITK_SUFFIXES, ".npy")
_CIFTI_INTENTS = range(3000, 3100)  # NIfTI intent codes of CIFTI-2 (dense / parcellated grayordinates)


class VolumeLoadError(ValueError):
    """A volume that cannot be loaded; the message names the file (or series folder) and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot load volume {str(path)!r}: {reason}")
        self.path = str(path)
        self.reason = reason


def read_header(path: Path, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> VolumeHeader:
    """The header of a volume file or DICOM series folder, with the voxel count checked against `max_voxels`.

    Raises:
        VolumeLoadError: missing, empty, unsupported or unreadable source, a kind of data medm does not take
            (CIFTI, RGB, vector images), a singular affine, or more voxels than `max_voxels`.
    """
    if not path.exists():
        raise VolumeLoadError(path, "file not found")
    name = path.name.lower()
    if path.is_dir():
        header = read_series_header(path, VolumeLoadError)
    elif path.stat().st_size == 0:
        raise VolumeLoadError(path, "file is empty (0 bytes)")
    elif name.endswith(NIBABEL_SUFFIXES):
        header = _nibabel_header(path)
    elif name.endswith(ITK_SUFFIXES):
        header = _itk_header(path)
    elif name.endswith(".npy"):
        header = _npy_header(path)
    else:
        raise VolumeLoadError(path, "unsupported volume format; use NIfTI (.nii, .nii.gz), MGH (.mgz), Analyze "
                                    "(.hdr/.img), NRRD (.nrrd), MetaImage (.mha, .mhd), NumPy (.npy, depth first) "
                                    "or a folder holding one DICOM series")
    header.shape3d = _squeezed(path, header.shape, leading=header.affine is None)
    voxels = int(np.prod(header.shape, dtype=np.int64))
    if max_voxels is not None and voxels > max_voxels:
        dims = "x".join(str(s) for s in header.shape)
        raise VolumeLoadError(path, f"volume is {dims} = {voxels:,} voxels, above the limit of {max_voxels:,} "
                                    "(volume.max_voxels; raise it to allow such volumes)")
    if header.affine is not None:
        _check_affine(path, header.affine)
    if not header.oriented:
        warnings.warn(f"{path}: the file carries no orientation (NIfTI qform and sform codes 0, or Analyze); its "
                      "voxel axes are taken as the scanner's R, A, S axes, which may be wrong", stacklevel=3)
    return header


def read_array(header: VolumeHeader, complex_mode: str = "magnitude") -> np.ndarray:
    """The stored voxels as a float32 array (complex data by `complex_mode`), squeezed to 3D."""
    path = header.path
    try:
        array = header.read()
    except VolumeLoadError:
        raise
    except Exception as e:  # nibabel / SimpleITK / numpy raise many types for truncated or inconsistent data
        raise VolumeLoadError(path, f"cannot read the voxel data ({type(e).__name__}: {e})") from e
    if np.iscomplexobj(array):
        if complex_mode == "refuse":
            raise VolumeLoadError(path, f"voxels are complex ({array.dtype}); set volume.complex: magnitude or real "
                                        "to load them")
        warnings.warn(f"{path}: voxels are complex ({array.dtype}); using their {complex_mode} (volume.complex)",
                      stacklevel=3)
        array = np.abs(array) if complex_mode == "magnitude" else array.real
    if array.dtype.kind not in "biuf":
        raise VolumeLoadError(path, f"array dtype {array.dtype} is not numeric")
    array = _to_3d(path, array, leading=header.affine is None)
    # One float32 copy; stored integers (int16 CT) are converted here, memory-mapped .npy data read straight in.
    out = np.asarray(array, dtype=np.float32)
    if np.may_share_memory(out, array) and not (out.flags.owndata and out.flags.writeable):
        out = np.array(out)  # a memory map or a reader's view: later steps work in place on their own copy
    return out


def _squeezed(path: Path, shape: tuple[int, ...], leading: bool) -> tuple[int, int, int]:
    """`shape` without singleton extra axes (leading ones for .npy, trailing ones otherwise); real 4D and 2D are
    errors."""
    out = list(shape)
    while len(out) > 3 and out[0 if leading else -1] == 1:
        out.pop(0 if leading else -1)
    if len(out) > 3:
        raise VolumeLoadError(path, f"array of shape {tuple(shape)} is 4D (time points or channels); medm takes one "
                                    "3D volume: save the one you need as its own file")
    if len(out) < 3:
        raise VolumeLoadError(path, f"array of shape {tuple(shape)} is not a 3D volume (use `image` for 2D images)")
    if 0 in out:
        raise VolumeLoadError(path, f"array of shape {tuple(shape)} has an empty axis")
    return out[0], out[1], out[2]


def replace_nonfinite(path: Path, array: np.ndarray, policy: str) -> np.ndarray:
    """NaN / Inf voxels set to the smallest / largest finite one (with a warning naming the file), or an error."""
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
    del finite
    warnings.warn(f"{path}: {bad} of {array.size} voxels are NaN or infinite; NaN and -Inf set to {lo:g}, +Inf to "
                  f"{hi:g}", stacklevel=4)
    return np.nan_to_num(array, copy=False, nan=lo, posinf=hi, neginf=lo)


def _to_3d(path: Path, array: np.ndarray, leading: bool) -> np.ndarray:
    """The array without singleton extra axes (see `_squeezed`)."""
    return array.reshape(_squeezed(path, array.shape, leading))


def _check_affine(path: Path, affine: np.ndarray) -> None:
    """A singular or non-finite voxel -> world matrix makes orientation meaningless (MONAI fails on it)."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    ok = np.isfinite(affine).all() and norms.min() > 0 and abs(np.linalg.det(m)) > 1e-6 * float(np.prod(norms))
    if not ok:
        rows = "; ".join(" ".join(f"{v:g}" for v in row) for row in np.asarray(affine)[:3])
        raise VolumeLoadError(path, f"its affine (voxel -> world matrix) is singular or not finite [{rows}]; fix "
                                    "the header's voxel sizes / sform / qform")


# ---- formats ------------------------------------------------------------------------------------------------------
def _nibabel_header(path: Path) -> VolumeHeader:
    import nibabel as nib  # defers nibabel

    kind = "NIfTI" if path.name.lower().endswith(NIFTI_SUFFIXES) else "volume"
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for truncated gzip, bad headers, unknown magic
        raise VolumeLoadError(path, f"not a readable {kind} file ({type(e).__name__}: {e})") from e
    hdr = img.header
    if isinstance(img, nib.Cifti2Image) or int(hdr.get("intent_code", 0) or 0) in _CIFTI_INTENTS:
        raise VolumeLoadError(path, "is a CIFTI-2 file (surface / grayordinate data, not a voxel volume)")
    dtype = img.get_data_dtype()
    if dtype.names is not None:
        raise VolumeLoadError(path, f"voxels are colour ({', '.join(dtype.names)}: NIfTI RGB / RGBA); medm takes "
                                    "one grey value per voxel: convert the file to greyscale")
    try:
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:
        raise VolumeLoadError(path, f"unreadable geometry in the header ({type(e).__name__}: {e})") from e
    # A loaded image keeps its scaling on the data proxy (the header's scl_slope is reset to NaN).
    slope, inter = (float(np.asarray(getattr(img.dataobj, k, d)).reshape(-1)[0]) for k, d in (("slope", 1.0),
                                                                                            ("inter", 0.0)))
    scale = (slope, inter) if np.isfinite(slope) and (slope, inter) != (1.0, 0.0) else None
    oriented = True
    if isinstance(img, nib.Nifti1Image | nib.Nifti2Image | nib.Nifti1Pair | nib.Nifti2Pair):
        oriented = int(hdr["qform_code"]) > 0 or int(hdr["sform_code"]) > 0
    elif isinstance(img, nib.AnalyzeImage):  # Analyze 7.5 (and SPM's) carry voxel sizes but no orientation
        oriented = False
    description = hdr["descrip"].item().decode("latin-1", "replace") if "descrip" in hdr else ""
    return VolumeHeader(path, tuple(int(s) for s in img.shape), affine, lambda: np.asanyarray(img.dataobj),
                        modality=modality_name(description), scale=scale, oriented=oriented)


def _itk_header(path: Path) -> VolumeHeader:
    import SimpleITK as sitk  # defers SimpleITK

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VolumeLoadError(path, f"not a readable NRRD / MetaImage file ({reason})") from e
    if reader.GetNumberOfComponents() > 1:
        raise VolumeLoadError(path, f"voxels hold {reader.GetNumberOfComponents()} components (RGB or vector "
                                    "data); medm takes one grey value per voxel")
    size, dim = reader.GetSize(), reader.GetDimension()
    affine = np.eye(4)
    if dim >= 3:
        direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
        affine[:3, :3] = direction * np.asarray(reader.GetSpacing()[:3])
        affine[:3, 3] = reader.GetOrigin()[:3]
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK works in LPS; medm's affines map to RAS
    modality = modality_name(reader.GetMetaData("Modality")) if reader.HasMetaDataKey("Modality") else None

    def read() -> np.ndarray:
        # ITK arrays are (z, y, x); the transpose (a view) gives the voxel axes (x, y, z) the affine maps. A copy in
        # the stored dtype: a view would outlive the ITK image that owns the memory.
        return sitk.GetArrayFromImage(reader.Execute()).transpose(*reversed(range(dim)))

    return VolumeHeader(path, tuple(int(s) for s in size), affine, read, modality=modality)


def _npy_header(path: Path) -> VolumeHeader:
    try:  # the header alone: shape and dtype before any voxel is read
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header_fn = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                              np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header_fn(f)
    except Exception as e:  # ValueError for bad headers, EOFError for truncated ones
        raise VolumeLoadError(path, f"not a readable .npy array ({type(e).__name__}: {e})") from e
    if dtype.hasobject:
        raise VolumeLoadError(path, "not a readable .npy array (it holds Python objects; medm loads .npy files "
                                    "with allow_pickle=False)")

    def read() -> np.ndarray:  # memory-mapped: the voxels are read once, when converted to float32
        return np.load(path, mmap_mode="r", allow_pickle=False)

    return VolumeHeader(path, tuple(int(s) for s in shape), None, read)


# ---- reading: the public API of medm.data.volumes --------------------------------------------------------------------
def read_volume_header(path: str | Path, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> VolumeHeader:
    """The header of a volume (shape, affine, modality), read without decoding its voxels.

    Raises:
        VolumeLoadError: missing, empty, unsupported or unreadable source, CIFTI / RGB data, a singular affine, or
            more voxels than `max_voxels`.
    """
    return read_header(Path(path), max_voxels)


def read_volume(path: str | Path, nonfinite: str = "replace", *, max_voxels: int | None = DEFAULT_MAX_VOXELS,
                complex: str = "magnitude") -> tuple[np.ndarray, np.ndarray | None]:
    """Read a volume as float32 with non-finite voxels handled (steps 1-2 of medm.data.volumes' docstring).

    Returns:
        (array, affine): except for `.npy`, the array is in the file's voxel axes (X, Y, Z) and `affine` (4, 4)
        maps them to RAS mm; for `.npy`, the array is (D, H, W) as stored and `affine` is None.

    Raises:
        VolumeLoadError: as `read_volume_header`, and unreadable voxel data, a real 4D or a 2D array, complex
            voxels with `complex: refuse`, or (with `nonfinite: error`) NaN / Inf voxels.
    """
    array, header = _read(Path(path), nonfinite, max_voxels, complex)
    return array, header.affine


def _read(path: Path, nonfinite: str, max_voxels: int | None, complex: str) -> tuple[np.ndarray, VolumeHeader]:
    header = read_header(path, max_voxels)
    array = read_array(header, complex)
    return replace_nonfinite(path, array, nonfinite), header


def verify_volume(path: str | Path, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> None:
    """Raise VolumeLoadError unless `path` reads as a volume (data validation without a model's settings)."""
    read_volume(path, max_voxels=max_voxels)
