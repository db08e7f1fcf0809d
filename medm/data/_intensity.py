"""Intensity modes of `VolumeArgs.intensity`, registered by name, each checking that the values fit it.

A mode is `fn(x, args, ctx) -> x`: `x` a (1, ...) float32 tensor of the volume's values, `args` the
`VolumeArgs`, `ctx` the `IntensityContext` (file, modality, header scale, a once-per-file `warn`). Add one with
`@register_intensity("name")`; `VolumeArgs` accepts every registered name.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medm.data._volume_io import VolumeLoadError
from medm.data.images import resolve_window

__all__ = ["INTENSITY_MODES", "IntensityContext", "register_intensity"]

INTENSITY_MODES: dict[str, Callable] = {}
# A volume is taken as holding air (so as HU) when a voxel lies at or below this; air is about -1000 HU.
AIR_HU = -500.0
_warned: set[tuple[str, str]] = set()


def register_intensity(name: str) -> Callable[[Callable], Callable]:
    """Register `fn(x, args, ctx) -> x` as `volume.intensity: name`."""
    def wrap(fn: Callable) -> Callable:
        if name in INTENSITY_MODES and INTENSITY_MODES[name] is not fn:
            raise KeyError(f"intensity mode {name!r} is already registered")
        INTENSITY_MODES[name] = fn
        return fn
    return wrap


@dataclass
class IntensityContext:
    """What an intensity mode knows about the volume besides its values.

    Attributes:
        path: the file or series folder (for messages).
        modality: "CT", "MR", ... (the record's `modality`, else the file's), or None when unknown.
        scale: the header's (slope, intercept) when it is not (1, 0).
    """

    path: Path
    modality: str | None = None
    scale: tuple[float, float] | None = None

    def warn(self, kind: str, message: str) -> None:
        """Warn once per file and kind of problem (DataLoader workers each warn once)."""
        key = (str(self.path), kind)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"{self.path}: {message}", stacklevel=4)

    def scale_note(self) -> str:
        if self.scale is None:
            return ""
        return f" (after the header's scale factor: slope {self.scale[0]:g}, intercept {self.scale[1]:g})"


def _sample(x: torch.Tensor, at_most: int = 1 << 20) -> np.ndarray:
    """An evenly strided sample of at most `at_most` voxels, for cheap checks on large volumes."""
    flat = x.reshape(-1)
    step = max(1, flat.numel() // at_most)
    return flat[::step].numpy()


def _window(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clip to [lo, hi] and map it to [0, 1] (MONAI ScaleIntensityRange with clip), in place."""
    return x.clamp_(lo, hi).sub_(lo).div_(hi - lo)


def _check_hu(x: torch.Tensor, ctx: IntensityContext, lo: float, hi: float) -> None:
    vmin, vmax = float(x.min()), float(x.max())
    if vmin > AIR_HU:
        ctx.warn("window", f"a HU window ({lo:g}..{hi:g}) is applied, but no voxel lies below {AIR_HU:g} (no air): "
                           f"values span {vmin:g}..{vmax:g}{ctx.scale_note()}, which does not look like a HU CT; "
                           "for MR or already-windowed volumes use intensity: auto, minmax or uint8")


@register_intensity("window")
def window(x: torch.Tensor, args, ctx: IntensityContext) -> torch.Tensor:
    """Clip a HU window `args.window` to [0, 1]; warns when the volume holds no air."""
    center, width = resolve_window(args.window)
    lo, hi = center - width / 2, center + width / 2
    _check_hu(x, ctx, lo, hi)
    return _window(x, lo, hi)


@register_intensity("uint8")
def uint8(x: torch.Tensor, args, ctx: IntensityContext) -> torch.Tensor:
    """x / 255 for MedM-VL's windowed uint8 volumes; values outside 0..255 are an error, non-integers a warning."""
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 255:
        advice = ("these look like HU: use intensity: window or auto" if lo <= AIR_HU else
                  "use intensity: auto or minmax to scale them")
        raise VolumeLoadError(ctx.path, f"intensity: uint8 expects values in 0..255 (MedM-VL's windowed uint8 "
                                        f"volumes), but they span {lo:g}..{hi:g}{ctx.scale_note()}; {advice}")
    sample = _sample(x)
    fractional = sample[sample != np.round(sample)]
    if fractional.size:
        ctx.warn("uint8", f"intensity: uint8 expects integer values 0..255, but values such as {fractional[0]:g} are "
                          f"not integers (span {lo:g}..{hi:g}{ctx.scale_note()}); use intensity: auto or minmax")
    return x.div_(255.0)


def _percentile_range(x: torch.Tensor, low: float, high: float) -> tuple[float, float]:
    # numpy, not torch.quantile: that refuses inputs above 16M voxels (one 512 x 512 x 64 CT).
    lo, hi = (float(v) for v in np.percentile(x.numpy(), [low, high]))
    return lo, hi


@register_intensity("minmax")
def minmax(x: torch.Tensor, args, ctx: IntensityContext) -> torch.Tensor:
    """Per volume to [0, 1], between the `percentiles` (clipped outside); a constant volume becomes 0."""
    lo_p, hi_p = (float(p) for p in args.percentiles)
    if (lo_p, hi_p) == (0.0, 100.0):
        lo, hi = float(x.min()), float(x.max())
    else:
        lo, hi = _percentile_range(x, lo_p, hi_p)
    if hi <= lo:
        ctx.warn("constant", f"values between the {lo_p:g}th and {hi_p:g}th percentiles are all {lo:g}; the volume "
                             "becomes all zeros")
        return x.zero_()
    return _window(x, lo, hi)


@register_intensity("standardize")
def standardize(x: torch.Tensor, args, ctx: IntensityContext) -> torch.Tensor:
    """(x - mean) / std with the given `standardize: [mean, std]` (MONAI NormalizeIntensity with fixed values)."""
    mean, std = (float(v) for v in args.standardize)
    return x.sub_(mean).div_(std)


@register_intensity("none")
def none(x: torch.Tensor, args, ctx: IntensityContext) -> torch.Tensor:
    """The values as read (after the header's scaling)."""
    return x


def guess_modality(x: torch.Tensor, args, ctx: IntensityContext) -> str:
    """The modality `auto` works with: the record's or the file's, else `volume.modality`, else CT when the volume
    holds air (a voxel at or below -900, as HU volumes do), else MR."""
    if ctx.modality:
        return ctx.modality
    if args.modality:
        return args.modality.upper()
    return "CT" if float(x.min()) <= -900.0 else "MR"


@register_intensity("auto")
def auto(x: torch.Tensor, args, ctx: IntensityContext) -> torch.Tensor:
    """CT: the HU `window`; MR and other modalities: per-volume percentiles `auto_percentiles` to [0, 1] (as MONAI's
    ScaleIntensityRangePercentiles with clip)."""
    if guess_modality(x, args, ctx) == "CT":
        return window(x, args, ctx)
    low, high = (float(p) for p in args.auto_percentiles)
    # Percentiles of a strided sample: the same to a fraction of a grey level, without a full-size sorted copy.
    lo, hi = (float(v) for v in np.percentile(_sample(x, 1 << 22), [low, high]))
    if hi <= lo:
        ctx.warn("constant", f"values between the {low:g}th and {high:g}th percentiles are all {lo:g}; the volume "
                             "becomes all zeros")
        return x.zero_()
    return _window(x, lo, hi)
