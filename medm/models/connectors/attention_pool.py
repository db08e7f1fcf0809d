"""Attention pooling connector (`connector.name: attention_pool`): M learned queries read the patch grid.

Two parameter layouts (`layout`):

- `qwen` (default), Qwen-VL's resampler. With W the attention width (`width`, default in_dim):
  `kv = ln_kv(kv_proj(features))` where `kv_proj` is a bias-free Linear(in_dim, W) (Identity when W == in_dim);
  `out = attn(ln_q(query) + qpos, kv + kpos, kv)` with `attn = nn.MultiheadAttention(W, num_heads)`;
  then `ln_post(out)` and the MLP (W -> out_dim). LayerNorms use eps 1e-6, as Qwen-VL. `kpos` is the fixed
  sin-cos embedding of `grid` (zero for prefix tokens, which carry no grid position); `qpos` is the sin-cos
  embedding of an n-D grid of side M^(1/n) when M is a perfect n-th power of it (n = number of grid axes:
  a square in 2D, a cube in 3D), else no query position. Qwen-VL ends with `x @ proj`, a bias-free
  (W, W) matrix; here the MLP takes that place. Parameters: `query`, `kv_proj.weight` (when W != in_dim),
  `ln_q.*`, `ln_kv.*`, `attn.*`, `ln_post.*`, `mlp.*`.
- `medm-vl`, MedM-VL's `AttnPooling`, so its checkpoints map 1:1: `query` (M, in_dim),
  `attn = nn.MultiheadAttention(in_dim, num_heads, batch_first=True)` with query = the learned queries and
  key = value = the features (no norms, no position embeddings), then `connector` = the MLP
  (in_dim -> out_dim). State-dict keys: `query`, `attn.in_proj_weight`, `attn.in_proj_bias`,
  `attn.out_proj.weight`, `attn.out_proj.bias`, `connector.{0,2}.{weight,bias}` (for mlp2x).

In both, every input token (prefix tokens included) is a key.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medm.models.connectors._base import Connector
from medm.models.connectors._mlp import build_mlp, parse_mlp_type
from medm.models.connectors._posembed import sincos_pos_embed
from medm.registry import CONNECTOR

_LAYOUTS = ("qwen", "medm-vl")


def _query_grid(num_queries: int, ndim: int) -> tuple[int, ...] | None:
    """(s,) * ndim when num_queries == s ** ndim, else None."""
    side = round(num_queries ** (1 / ndim))
    for s in (side - 1, side, side + 1):  # float roots can land one off
        if s >= 1 and s**ndim == num_queries:
            return (s,) * ndim
    return None


@CONNECTOR.register("attention_pool")
class AttentionPoolConnector(Connector):
    """`num_queries` learned queries cross-attend the encoder features, then the MLP.

    Args:
        in_dim, out_dim, grid, num_prefix_tokens: geometry, from the encoder and the LLM.
        num_queries: M, the number of output tokens.
        num_heads: attention heads; must divide the attention width.
        mlp_type: `linear` or `mlp{N}x_{act}` after the attention.
        layout: `qwen` (Qwen-VL resampler) or `medm-vl` (MedM-VL's AttnPooling, checkpoint-compatible); see
            the module docstring for exactly what each computes.
        width: attention width W for `qwen`; null means in_dim (no kv projection). `medm-vl` attends at
            in_dim and accepts only null.

    Position embeddings are computed from `grid` on the fly, never stored, so they are not in the state dict.
    """

    needs_full_grid = False  # `medm-vl` attends without positions; `qwen` checks the grid itself

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"num_queries": 4, "num_heads": 2}

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, ...], num_prefix_tokens: int = 0,
                 num_queries: int = 256, num_heads: int = 8, mlp_type: str = "mlp2x_gelu", layout: str = "qwen",
                 width: int | None = None):
        super().__init__(in_dim, out_dim, grid, num_prefix_tokens)
        if layout not in _LAYOUTS:
            raise ValueError(f"attention_pool: unknown layout {layout!r}; known: {', '.join(_LAYOUTS)}")
        if num_queries < 1:
            raise ValueError(f"attention_pool: num_queries must be >= 1, got {num_queries}")
        if layout == "medm-vl" and width not in (None, in_dim):
            raise ValueError(f"attention_pool: layout 'medm-vl' attends at the encoder width {in_dim}; "
                             f"`width` must be null, got {width}")
        w = in_dim if width is None else width
        if w < 1:
            raise ValueError(f"attention_pool: width must be >= 1 or null, got {width}")
        if num_heads < 1 or w % num_heads:
            raise ValueError(f"attention_pool: num_heads {num_heads} must divide the attention width {w}")
        depth, act = parse_mlp_type(mlp_type)
        self.layout, self.num_queries, self.width = layout, num_queries, w
        if layout == "medm-vl":
            # Names and init as MedM-VL's AttnPooling, so its state dict loads unchanged.
            self.query = nn.Parameter(torch.randn(num_queries, in_dim))
            self.attn = nn.MultiheadAttention(in_dim, num_heads, batch_first=True)
            self.connector = build_mlp(in_dim, out_dim, depth, act)
            self.query_grid = None
            return
        self.check_full_grid()  # the key position embeddings cover the grid
        self.query = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_queries, w), std=0.02))
        self.kv_proj = nn.Linear(in_dim, w, bias=False) if w != in_dim else nn.Identity()
        self.ln_q = nn.LayerNorm(w, eps=1e-6)
        self.ln_kv = nn.LayerNorm(w, eps=1e-6)
        self.attn = nn.MultiheadAttention(w, num_heads, batch_first=True)
        self.ln_post = nn.LayerNorm(w, eps=1e-6)
        self.mlp = build_mlp(w, out_dim, depth, act)
        self.query_grid = _query_grid(num_queries, len(self.grid))
        # Fail at build time, not at the first forward, when the width cannot hold the embeddings.
        sincos_pos_embed(self.grid, w, device="meta")

    @property
    def num_tokens(self) -> int:
        return self.num_queries

    def key_pos_embed(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        """(num_input_tokens, W): sin-cos of the grid, zero rows for the prefix tokens (`qwen` layout)."""
        pos = sincos_pos_embed(self.grid, self.width, device=device, dtype=dtype)
        prefix = torch.zeros(self.num_prefix_tokens, self.width, device=device, dtype=dtype)
        return torch.cat([prefix, pos], dim=0)

    def query_pos_embed(self, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """(M, W) sin-cos of the query grid, or None when M is not a perfect square / cube (`qwen` layout)."""
        if self.query_grid is None:
            return None
        return sincos_pos_embed(self.query_grid, self.width, device=device, dtype=dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, num_prefix_tokens + prod(grid), D_enc) -> (B, num_queries, D_llm)."""
        if features.ndim != 3 or features.shape[1] != self.num_input_tokens:
            raise ValueError(f"attention_pool: expected features (B, {self.num_input_tokens}, D) for grid "
                             f"{self.grid} with {self.num_prefix_tokens} prefix tokens, got {tuple(features.shape)}")
        b = features.shape[0]
        if self.layout == "medm-vl":
            q = self.query.unsqueeze(0).expand(b, -1, -1)
            out = self.attn(q, features, features, need_weights=False)[0]
            return self.connector(out)
        kv = self.ln_kv(self.kv_proj(features))
        q = self.ln_q(self.query)
        qpos = self.query_pos_embed(q.device, q.dtype)
        if qpos is not None:
            q = q + qpos
        k = kv + self.key_pos_embed(kv.device, kv.dtype)
        out = self.attn(q.unsqueeze(0).expand(b, -1, -1), k, kv, need_weights=False)[0]
        return self.mlp(self.ln_post(out))
