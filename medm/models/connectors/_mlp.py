"""The one MLP builder that every connector ends with."""

from __future__ import annotations

import re

from torch import nn

_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def build_mlp(in_dim: int, out_dim: int, depth: int = 2, act: str = "gelu") -> nn.Sequential:
    """Linear, then (act, Linear) x (depth - 1). depth 1 is a single Linear.

    Module indices follow LLaVA's `mlp2x_gelu` (0: Linear, 1: act, 2: Linear), so weights map 1:1.
    """
    if depth < 1:
        raise ValueError(f"MLP depth must be >= 1, got {depth}")
    if act not in _ACTS:
        raise ValueError(f"unknown activation {act!r}; known: {', '.join(_ACTS)}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [_ACTS[act](), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def parse_mlp_type(mlp_type: str) -> tuple[int, str]:
    """`linear` -> (1, 'gelu'); `mlp2x_gelu` -> (2, 'gelu')."""
    if mlp_type == "linear":
        return 1, "gelu"
    m = re.fullmatch(r"mlp(\d+)x_(\w+)", mlp_type)
    if not m:
        raise ValueError(f"unknown MLP type {mlp_type!r}; use 'linear' or 'mlp{{N}}x_{{gelu|relu|silu}}'")
    return int(m.group(1)), m.group(2)
