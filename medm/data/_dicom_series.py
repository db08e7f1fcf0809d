"""One DICOM series folder as a volume header and voxels (medm.data.volumes; rules in its docstring).

The headers of every slice are read first (without pixel data), so the series' size (rows x columns x slices) is
checked before any pixel is decoded; the voxels are then decoded slice by slice into one preallocated float32 array.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from medm.data._volume_header import VolumeHeader, modality_name

__all__ = ["read_series_header"]


def read_series_header(folder: Path, error: type[ValueError]):
    """The `VolumeHeader` of the one DICOM series in `folder`; `error(path, reason)` is raised on bad series."""
    import pydicom  # defers pydicom (DICOM series only)

    slices = []
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(file, force=True, stop_before_pixels=True)
        except Exception:  # not DICOM: notes, thumbnails, ...
            continue
        if "Rows" in ds and "Columns" in ds:
            slices.append((file, ds))
    if not slices:
        raise error(folder, "folder holds no DICOM image files (a volume folder must hold one series)")
    series = {}
    for file, ds in slices:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(file.name)
    if len(series) > 1:
        listing = "; ".join(f"{uid or '(no SeriesInstanceUID)'}: {len(files)} files, e.g. {files[0]}"
                            for uid, files in series.items())
        raise error(folder, f"folder holds {len(series)} DICOM series ({listing}); put each series in its own folder")
    multi = next((f for f, ds in slices if int(ds.get("NumberOfFrames") or 1) > 1), None)
    if multi is not None:
        raise error(folder, f"{multi.name} is a multi-frame DICOM; only series of single-frame slices are supported")
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    if len(shapes) > 1:
        raise error(folder, f"slices have different sizes {sorted(shapes)}")

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
            raise error(folder, f"{slices[i][0].name} and {slices[i + 1][0].name} lie at the same position (a 4D "
                                "series: time points or echoes); split it into one folder per volume")
    elif all("InstanceNumber" in ds for _, ds in slices):
        warnings.warn(f"{folder}: slices lack ImagePositionPatient / ImageOrientationPatient; sorted by "
                      "InstanceNumber, spacing from SliceThickness", stacklevel=4)
        slices.sort(key=lambda s: int(s[1].InstanceNumber))
        row_dir, col_dir, normal = np.eye(3)
    else:
        raise error(folder, "slices have neither ImagePositionPatient nor InstanceNumber, so their order is unknown")

    first = slices[0][1]
    row_spacing, col_spacing = (float(v) for v in first.get("PixelSpacing", [1.0, 1.0]))
    if geometric and len(slices) > 1:
        origin = np.asarray(first.ImagePositionPatient, dtype=np.float64)
        last = np.asarray(slices[-1][1].ImagePositionPatient, dtype=np.float64)
        step = (last - origin) / (len(slices) - 1)
        gaps = np.diff(where)
        if gaps.max() - gaps.min() > 0.1 * gaps.mean():
            warnings.warn(f"{folder}: slice spacing is irregular ({gaps.min():.3g} to {gaps.max():.3g} mm); the "
                          f"volume is treated as evenly spaced at {gaps.mean():.3g} mm", stacklevel=4)
    else:
        origin = np.asarray(first.get("ImagePositionPatient", [0.0, 0.0, 0.0]), dtype=np.float64)
        step = normal * float(first.get("SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # column index i moves along the row direction
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = origin

    rows, cols = next(iter(shapes))
    scale = (float(first.get("RescaleSlope", 1.0) or 1.0), float(first.get("RescaleIntercept", 0.0) or 0.0))
    files = [f for f, _ in slices]

    def read() -> np.ndarray:
        # (columns, rows, slices) = voxel axes (i, j, k) of the DICOM affine; filled slice by slice, one copy.
        out = np.empty((cols, rows, len(files)), dtype=np.float32)
        for k, file in enumerate(files):
            try:
                ds = pydicom.dcmread(file, force=True)
                px = ds.pixel_array
            except Exception as e:
                raise error(folder, f"{file.name}: cannot decode pixel data ({type(e).__name__}: {e})") from e
            if px.shape != (rows, cols):
                raise error(folder, f"{file.name}: pixel data of shape {px.shape} is not one grey slice")
            slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
            out[:, :, k] = px.T
            if (slope, intercept) != (1.0, 0.0):
                out[:, :, k] *= slope
                out[:, :, k] += intercept
        return out

    return VolumeHeader(folder, (cols, rows, len(files)), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, read,
                        modality=modality_name(first.get("Modality")) or modality_name(first.get("SeriesDescription")),
                        scale=None if scale == (1.0, 0.0) else scale)
