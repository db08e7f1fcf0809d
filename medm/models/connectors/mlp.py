"""MLP connector (`connector.name: mlp`): one projection per visual token, LLaVA style."""

from __future__ import annotations

from typing import Any

import torch

from medm.models.connectors._base import Connector
from medm.models.connectors._mlp import build_mlp, parse_mlp_type
from medm.registry import CONNECTOR


@CONNECTOR.register("mlp")
class MLPConnector(Connector):
    """`type`: `linear` or `mlp{N}x_{act}` (e.g. `mlp2x_gelu`). Emits one token per input token."""

    needs_full_grid = False  # token by token: the features need not form a grid

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"type": "mlp2x_gelu"}

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, ...], num_prefix_tokens: int = 0,
                 type: str = "mlp2x_gelu"):
        super().__init__(in_dim, out_dim, grid, num_prefix_tokens)
        depth, act = parse_mlp_type(type)
        self.mlp = build_mlp(in_dim, out_dim, depth, act)

    @property
    def num_tokens(self) -> int:
        return self.num_input_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, N, D_enc) -> (B, N, D_llm)."""
        return self.mlp(features)
