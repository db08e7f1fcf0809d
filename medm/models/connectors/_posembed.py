"""Fixed sin-cos position embeddings for N-D patch grids (1D, 2D, 3D, ...)."""

from __future__ import annotations

import math

import torch


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sin-cos embedding of positions along one axis.

    Args:
        pos: (L,) float positions.
        dim: even embedding width.

    Returns:
        (L, dim): `[sin(pos * w_0..w_{dim/2-1}), cos(...)]` with `w_i = 10000 ** (-i / (dim / 2))`.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim / 2)
    omega = 1.0 / 10000**omega
    out = pos.float()[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed(grid: tuple[int, ...] | list[int], dim: int, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed position embeddings of a row-major N-D grid, one sin-cos block per axis.

    Each axis gets `2 * (dim // (2 * n))` channels; axes are laid out last-first (w, h, d), so the 2D
    case equals MAE's / Qwen-VL's `get_2d_sincos_pos_embed` (w half first, then h). Channels left over
    when `dim` does not split evenly over the axes are zero.

    Args:
        grid: the patch grid, e.g. (h, w) or (d, h, w); rows follow the encoder's row-major flattening.
        dim: embedding width.

    Returns:
        (prod(grid), dim), in `dtype` on `device`.
    """
    n = len(grid)
    per_axis = 2 * (dim // (2 * n))
    if n == 0 or per_axis == 0:
        raise ValueError(f"sin-cos position embedding of grid {tuple(grid)} needs width >= {2 * max(n, 1)}, got {dim}")
    axes = [torch.arange(s, dtype=torch.float32, device=device) for s in grid]
    coords = torch.meshgrid(*axes, indexing="ij")
    parts = [sincos_1d(c.reshape(-1), per_axis) for c in reversed(coords)]
    pad = dim - per_axis * n
    if pad:
        parts.append(torch.zeros(math.prod(grid), pad, device=device))
    return torch.cat(parts, dim=1).to(dtype)
