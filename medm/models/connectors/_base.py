"""What every connector provides: `(B, N, D_enc) -> (B, M, D_llm)` and M known up front."""

from __future__ import annotations

import math
from typing import Any

from torch import nn


class Connector(nn.Module):
    """Base class. Built with the encoder geometry so the token count is fixed at construction.

    Args:
        in_dim: encoder hidden size D_enc.
        out_dim: LLM hidden size D_llm.
        grid: encoder patch grid, e.g. (16, 16) or (8, 16, 16).
        num_prefix_tokens: leading non-grid tokens in the features (CLS with `cls_patch`); negative: leading grid
            tokens missing (`select_feature: skip_first` on a tower without CLS), which only a connector with
            `needs_full_grid = False` accepts (they may still call `check_full_grid` for some settings).
    """

    needs_full_grid = True  # pools or embeds positions over the grid

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, ...], num_prefix_tokens: int = 0):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.grid = tuple(grid)
        self.num_prefix_tokens = num_prefix_tokens
        if self.needs_full_grid:
            self.check_full_grid()

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        """Small settings (merged over `{"name": ...}`) so tests build the connector fast on the tiny grids."""
        raise NotImplementedError(f"connector {getattr(cls, 'registry_name', cls.__name__)!r} has no tiny preset")

    def check_full_grid(self) -> None:
        """Raise when the features are not a full grid (the encoder dropped grid tokens)."""
        if self.num_prefix_tokens < 0:
            raise ValueError(f"connector {getattr(self, 'registry_name', type(self).__name__)!r} needs the encoder's "
                             f"full patch grid {self.grid}, but the encoder drops {-self.num_prefix_tokens} of its "
                             "tokens (select_feature: skip_first on a tower without a CLS token); use "
                             "select_feature patch or cls_patch, or a connector that needs no grid (mlp, "
                             "attention_pool with layout medm-vl)")

    @property
    def num_input_tokens(self) -> int:
        return self.num_prefix_tokens + math.prod(self.grid)

    @property
    def num_tokens(self) -> int:
        """Rows emitted per image: what `<image>` expands to."""
        raise NotImplementedError
