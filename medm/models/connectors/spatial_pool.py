"""Spatial pooling connector (`connector.name: spatial_pool`): pool the patch grid, then the MLP.

MedM-VL's 3D connector is this with `pool: avg`, `stride: 2`: an 8x16x16 M3D-CLIP grid becomes 4x8x8 = 256
tokens before `mlp2x_gelu`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from medm.models.connectors._base import Connector
from medm.models.connectors._mlp import build_mlp, parse_mlp_type
from medm.registry import CONNECTOR

_POOL = {"avg": (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d), "max": (F.max_pool1d, F.max_pool2d, F.max_pool3d)}
_UNEVEN = ("error", "floor", "ceil")
_PREFIX = ("drop", "keep")


@CONNECTOR.register("spatial_pool")
class SpatialPoolConnector(Connector):
    """Average or max pooling over the 1D/2D/3D patch grid (kernel = stride, no overlap), then the MLP.

    Args:
        in_dim, out_dim, grid, num_prefix_tokens: geometry, from the encoder and the LLM.
        pool: `avg` or `max`.
        stride: pooling stride and window, one int for every axis or a list with one per grid axis
            (e.g. `[1, 2, 2]` keeps the depth of an (d, h, w) grid).
        mlp_type: `linear` or `mlp{N}x_{act}`, applied to every pooled token.
        prefix: leading non-grid tokens (CLS with `select_feature: cls_patch`): `drop` them, or `keep` them
            in front of the pooled tokens (they go through the MLP too, unpooled).
        uneven: what a grid axis that is not a multiple of its stride does: `error` (default), `floor` (the
            trailing patches that fill no whole window are dropped; torch's default and MedM-VL's), or `ceil`
            (a last, smaller window pools only the patches it covers).

    Output: `num_tokens = (num_prefix_tokens if prefix == keep else 0) + prod(pooled grid)`, where each pooled
    axis is `grid / stride` (rounded down with `floor`, up with `ceil`).
    """

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"pool": "avg", "stride": 2}

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, ...], num_prefix_tokens: int = 0,
                 pool: str = "avg", stride: int | list[int] = 2, mlp_type: str = "mlp2x_gelu", prefix: str = "drop",
                 uneven: str = "error"):
        super().__init__(in_dim, out_dim, grid, num_prefix_tokens)
        if pool not in _POOL:
            raise ValueError(f"spatial_pool: unknown pool {pool!r}; known: {', '.join(_POOL)}")
        if prefix not in _PREFIX:
            raise ValueError(f"spatial_pool: unknown prefix {prefix!r}; known: {', '.join(_PREFIX)}")
        if uneven not in _UNEVEN:
            raise ValueError(f"spatial_pool: unknown uneven {uneven!r}; known: {', '.join(_UNEVEN)}")
        if not 1 <= len(self.grid) <= 3:
            raise ValueError(f"spatial_pool: grid {self.grid} must have 1, 2 or 3 axes")
        strides = [stride] * len(self.grid) if isinstance(stride, int) else list(stride)
        if len(strides) != len(self.grid) or not all(isinstance(s, int) and s >= 1 for s in strides):
            raise ValueError(f"spatial_pool: stride {stride!r} must be a positive int or a list of "
                             f"{len(self.grid)} positive ints, one per axis of grid {self.grid}")
        if any(s > g for g, s in zip(self.grid, strides)):
            raise ValueError(f"spatial_pool: stride {tuple(strides)} is larger than grid {self.grid}")
        if uneven == "error" and any(g % s for g, s in zip(self.grid, strides)):
            raise ValueError(f"spatial_pool: grid {self.grid} is not divisible by stride {tuple(strides)}; "
                             f"pick a stride that divides every axis, or set `uneven: floor` or `uneven: ceil`")
        self.pool_type, self.prefix, self.uneven = pool, prefix, uneven
        self.stride = tuple(strides)
        rnd = math.ceil if uneven == "ceil" else math.floor
        self.out_grid = tuple(rnd(g / s) for g, s in zip(self.grid, self.stride))
        depth, act = parse_mlp_type(mlp_type)
        self.mlp = build_mlp(in_dim, out_dim, depth, act)

    @property
    def num_tokens(self) -> int:
        kept = self.num_prefix_tokens if self.prefix == "keep" else 0
        return kept + math.prod(self.out_grid)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """The tokens the MLP sees: (B, num_prefix_tokens + prod(grid), D_enc) -> (B, num_tokens, D_enc)."""
        if features.ndim != 3 or features.shape[1] != self.num_input_tokens:
            raise ValueError(f"spatial_pool: expected features (B, {self.num_input_tokens}, D) for grid {self.grid} "
                             f"with {self.num_prefix_tokens} prefix tokens, got {tuple(features.shape)}")
        b, _, d = features.shape
        prefix, patches = features[:, :self.num_prefix_tokens], features[:, self.num_prefix_tokens:]
        # Rows are the grid flattened row-major, so (B, N, D) -> (B, D, *grid) is a transpose and a view.
        x = patches.transpose(1, 2).reshape(b, d, *self.grid)
        # Pool in float32: averages stay exact-ish in bf16 models, and CPU torch has no bf16 avg_pool3d.
        x = _POOL[self.pool_type][len(self.grid) - 1](x.float(), kernel_size=self.stride, stride=self.stride,
                                                      ceil_mode=self.uneven == "ceil")
        pooled = x.flatten(2).transpose(1, 2).to(features.dtype)
        return torch.cat([prefix, pooled], dim=1) if self.prefix == "keep" else pooled

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, num_prefix_tokens + prod(grid), D_enc) -> (B, num_tokens, D_llm)."""
        return self.mlp(self.pool(features))
