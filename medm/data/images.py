"""Load any 2D medical image (PNG, JPEG, BMP, TIFF, ..., DICOM) as an 8-bit PIL image, with clear errors.

`load_image` returns mode "L" (single channel) or "RGB"; the encoder's `ImagePreprocess` then resizes and
normalises it. Conversion rules:

- 8-bit grey and colour images are display-ready and kept as they are (`window` does not apply to them).
- High bit depth grey (modes I;16*, I, F, e.g. 16-bit PNG / TIFF) is mapped to 0..255 by `window` when given,
  else min-max over the image (16-bit exports often use only part of 0..65535, e.g. a 12-bit detector, so
  dividing by 257 would give a near-black image). Never clipped at 255.
- Transparency (RGBA, LA, palette with transparency) is composited on black: medical images have a black
  background, so transparent margins read as background, not as bright borders.
- Palette, CMYK, YCbCr, LAB, HSV -> RGB; bilevel -> L. EXIF orientation is applied. Multi-page files
  (TIFF, GIF) give their first page.
- DICOM (suffix .dcm, or the DICM magic at byte 128 whatever the suffix): modality LUT (RescaleSlope /
  RescaleIntercept or Modality LUT Sequence, from enhanced multi-frame functional groups where present), then
  the VOI window: `window` if given, else the file's WindowCenter/WindowWidth (first value when multi-valued),
  else its VOI LUT Sequence followed by min-max, else min-max. Windowing is linear (VOI LUT Function ignored):
  values <= center - width/2 -> 0, >= center + width/2 -> 255. MONOCHROME1 is inverted after windowing.
  Colour DICOMs (RGB, YBR, palette) stay RGB. Multi-frame DICOMs give their middle frame (index n // 2),
  so a stack gives a central slice rather than an edge one.

Errors are `ImageLoadError` (a ValueError) naming the file and the reason. Truncated data is detected by a full
decode (`PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is never set here; if other code sets it globally, PIL pads
truncated files silently). Limit: libjpeg conceals bit errors inside a JPEG's entropy-coded data (it only warns,
and PIL does not surface the warning), so such files load with visible artefacts instead of failing. Images
above `max_pixels` are refused before decoding; PIL's own limit (`PIL.Image.MAX_IMAGE_PIXELS`: a warning above it,
an error above twice it) still applies on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "WINDOW_PRESETS",
    "ImageLoadError",
    "is_dicom",
    "load_image",
    "resolve_window",
    "verify_image",
]

DEFAULT_MAX_PIXELS = 100_000_000

# (center, width) in Hounsfield units; standard CT display windows (Radiopaedia "Windowing (CT)").
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
}

Window = str | Sequence[float] | None
_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class ImageLoadError(ValueError):
    """An image that cannot be loaded; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot load image {str(path)!r}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_dicom(path: str | Path) -> bool:
    """True for a `.dcm` suffix (any case) or the DICM magic at byte 128 (DICOM Part 10 files with any suffix)."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def resolve_window(window: Window) -> tuple[float, float] | None:
    """`None` | preset name | (center, width) -> (center, width) or None; raises ValueError when invalid."""
    if window is None:
        return None
    if isinstance(window, str):
        if window not in WINDOW_PRESETS:
            raise ValueError(f"unknown window preset {window!r}; known: {', '.join(WINDOW_PRESETS)}")
        return WINDOW_PRESETS[window]
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        center, width = 0.0, 0.0  # reported below
    if width <= 0:
        raise ValueError(f"window must be (center, width) with width > 0 or a preset name, got {window!r}")
    return center, width


def load_image(path: str | Path, window: Window = None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load a 2D image or DICOM as an 8-bit PIL image (rules in the module docstring).

    Args:
        path: image file; DICOM is recognised by suffix `.dcm` or its DICM magic.
        window: display window for DICOM and high-bit-depth grey images: a preset name from `WINDOW_PRESETS`
            (CT, Hounsfield units) or `(center, width)` in the image's values (HU after the modality LUT for
            DICOM, raw stored values for 16-bit PNG / TIFF). `None`: the DICOM's own window, else min-max.
        max_pixels: refuse images with more pixels (width x height) than this, before decoding; None: no limit.

    Returns:
        A fully decoded PIL image of mode "L" or "RGB", size (W, H) as stored (after EXIF orientation).

    Raises:
        ImageLoadError: missing, empty, unrecognised, corrupt or truncated file, too many pixels, or DICOM
            without decodable pixel data. ValueError for an invalid `window`.
    """
    win = resolve_window(window)
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    if not path.is_file():
        raise ImageLoadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageLoadError(path, "file is empty (0 bytes)")
    if is_dicom(path):
        return _load_dicom(path, win, max_pixels)
    return _load_pil(path, win, max_pixels)


def verify_image(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """Raise ImageLoadError unless `path` fully decodes as `load_image` would load it (used by data validation)."""
    load_image(path, max_pixels=max_pixels)


def _check_pixels(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            path, f"image is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
            "(possible decompression bomb; raise max_pixels to allow it)"
        )


def _to_uint8(arr: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Linear map of grey values to 0..255: `window` (center, width) or min-max; NaN -> 0, constant -> 0."""
    arr = np.asarray(arr, dtype=np.float32)
    if window is None:
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    else:
        lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = np.clip((arr - lo) * (255.0 / (hi - lo)), 0.0, 255.0)
    return np.nan_to_num(np.rint(out), nan=0.0).astype(np.uint8)


def _load_pil(path: Path, window: tuple[float, float] | None, max_pixels: int | None) -> Image.Image:
    try:
        with Image.open(path) as im:
            _check_pixels(path, *im.size, max_pixels)
            im.load()  # full decode now: a lazy open would accept truncated or corrupt data
            im = ImageOps.exif_transpose(im)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, f"possible decompression bomb: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageLoadError(path, "not a recognised image format (PNG, JPEG, BMP, TIFF, ... or DICOM)") from e
    except Exception as e:  # PIL reports bad data as OSError, SyntaxError, ValueError, EOFError, struct.error
        raise ImageLoadError(path, f"corrupt or truncated image data ({type(e).__name__}: {e})") from e
    return _to_8bit_mode(im, window)


def _to_8bit_mode(im: Image.Image, window: tuple[float, float] | None) -> Image.Image:
    """Any PIL mode -> "L" or "RGB" (see the module docstring for each rule)."""
    if im.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_to_uint8(np.asarray(im), window))
    if im.mode == "1":
        return im.convert("L")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        grey = im.mode in ("L", "LA", "La")
        rgba = im.convert("RGBA")
        rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
        return rgb.convert("L") if grey else rgb  # grey stays exact: R = G = B and L's weights sum to 1
    if im.mode in ("L", "RGB"):
        return im
    return im.convert("RGB")  # P, CMYK (PIL undoes Adobe inversion), YCbCr, LAB, HSV


def _dicom_value(ds, frame: int, sequence: str, keyword: str):
    """A top-level DICOM value, else from enhanced multi-frame functional groups (this frame's, then shared)."""
    if keyword in ds:
        return ds[keyword].value
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and len(items) > index and items[index].get(sequence):
            item = items[index].get(sequence)[0]
            if keyword in item:
                return item[keyword].value
    return None


def _first(value) -> float | None:
    """First value of a possibly multi-valued DICOM element (WindowCenter may hold several windows)."""
    if value is None or value == "":
        return None
    return float(value[0]) if isinstance(value, Sequence) and not isinstance(value, str) else float(value)


def _load_dicom(path: Path, window: tuple[float, float] | None, max_pixels: int | None) -> Image.Image:
    import pydicom  # defers pydicom: imported here: only DICOM users pay for it
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array  # defers pydicom

    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as e:
        raise ImageLoadError(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from e
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageLoadError(path, "DICOM file has no pixel data (not an image object, or not DICOM)")
    try:
        _check_pixels(path, int(ds.Columns), int(ds.Rows), max_pixels)
        frames = int(ds.get("NumberOfFrames") or 1)
        frame = frames // 2
        arr = pixel_array(ds, index=frame if frames > 1 else None)
    except ImageLoadError:
        raise
    except Exception as e:  # missing decoder plugin, truncated or inconsistent pixel data
        raise ImageLoadError(path, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from e

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 8 * arr.dtype.itemsize
    else:
        bits = int(ds.get("BitsStored") or 8 * arr.dtype.itemsize)
    if arr.ndim == 3:  # colour: scale the stored range to 8 bits, keeping the colours' proportions
        rgb = np.clip(np.rint(arr.astype(np.float32) * (255.0 / (2**bits - 1))), 0, 255).astype(np.uint8)
        return Image.fromarray(rgb)

    if ds.get("ModalityLUTSequence"):
        arr = apply_modality_lut(arr, ds)
    else:
        slope = _first(_dicom_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _first(_dicom_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept"))
        arr = arr.astype(np.float64) * (1.0 if slope is None else slope) + (intercept or 0.0)
    if window is None:
        center = _first(_dicom_value(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
        width = _first(_dicom_value(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
        if center is not None and width is not None and width > 0:
            window = (center, width)
        elif ds.get("VOILUTSequence"):
            arr = apply_voi_lut(arr, ds, index=0)
    out = _to_uint8(arr, window)
    if photometric == "MONOCHROME1":  # low values are white in MONOCHROME1
        out = 255 - out
    return Image.fromarray(out)
