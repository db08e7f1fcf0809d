"""`volume.resample: world`: an oblique or gantry-tilted volume onto an axis-aligned grid in world (RAS) coordinates."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["resample_world"]


def resample_world(x, affine: np.ndarray, spacing: list | None):
    """(1, X, Y, Z) MetaTensor -> the same volume on an axis-aligned RAS grid covering it (trilinear); voxels
    outside the scan get the volume's minimum. Voxel sizes: `spacing` (depth first) or the file's own."""
    from monai.transforms import SpatialResample  # defers monai
    from nibabel.orientations import io_orientation  # defers nibabel

    m = affine[:3, :3]
    if np.count_nonzero(np.abs(m) > 1e-6 * np.abs(m).max()) == 3:
        return x  # already axis-aligned: orientation alone permutes and flips it exactly
    if spacing is not None:
        size_mm = np.array([float(s) for s in reversed(spacing)])  # (x, y, z) = [W, H, D]
    else:  # each world axis gets the voxel size of the array axis closest to it
        size_mm = np.empty(3)
        for i, (axis, _flip) in enumerate(io_orientation(affine)):
            size_mm[int(axis)] = np.linalg.norm(m[:, i])
    shape = np.array(x.shape[1:])
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = corners @ m.T + affine[:3, 3]
    lo, hi = world.min(0), world.max(0)
    out_shape = [int(v) for v in np.floor((hi - lo) / size_mm + 1e-6) + 1]
    dst = np.eye(4)
    dst[:3, :3] = np.diag(size_mm)
    dst[:3, 3] = lo
    floor = float(x.min())
    x = x - floor  # zeros outside the scan become the volume's minimum (air in a CT) after adding it back
    out = SpatialResample(mode="bilinear", padding_mode="zeros")(x, dst_affine=torch.from_numpy(dst),
                                                                  spatial_size=out_shape)
    return out + floor
