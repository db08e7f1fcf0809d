"""What a volume file says about itself (`VolumeHeader`) and the modality names read from tags and descriptions,
shared by the volume readers (medm.data._volume_io) and the DICOM series reader (medm.data._dicom_series)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["VolumeHeader", "modality_name"]


@dataclass
class VolumeHeader:
    """What a volume file says about itself, read without decoding the voxels.

    Attributes:
        shape: stored shape, (X, Y, Z[, ...]) in voxel axes, or (D, H, W) as stored for `.npy`.
        affine: (4, 4) voxel -> RAS mm, or None (`.npy`: no geometry).
        modality: "CT", "MR", ... from the DICOM Modality tag, a MetaImage Modality, or the NIfTI description;
            None when the file does not say.
        scale: (slope, intercept) the reader applies to the stored values, when not (1, 0).
        oriented: False when the file carries no orientation (NIfTI qform and sform codes 0, Analyze).
        read: () -> the stored array (any dtype; scaled when `scale` is set).
    """

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray | None
    read: Callable[[], np.ndarray] = field(repr=False)
    modality: str | None = None
    scale: tuple[float, float] | None = None
    oriented: bool = True
    shape3d: tuple[int, int, int] | None = None  # `shape` without singleton extra axes, set by `read_header`


def modality_name(text: str | None) -> str | None:
    """"CT", "MR" or another DICOM modality code from a tag, a record field or a file description; None if unknown."""
    if not text:
        return None
    t = str(text).strip().upper()
    if t.startswith("MET_MOD_"):  # MetaImage
        t = t[len("MET_MOD_"):]
    if t in ("MRI", "MR"):
        return "MR"
    if re.fullmatch(r"[A-Z]{2,3}", t):  # a DICOM modality code: CT, MR, PT, US, ...
        return t
    if re.search(r"\b(CT|CTA|HU)\b", t):  # a free-text description, e.g. "CT chest 1mm"
        return "CT"
    if re.search(r"\b(MR|MRI|T1W?|T2W?|FLAIR|DWI|BOLD|EPI)\b", t):
        return "MR"
    return None
