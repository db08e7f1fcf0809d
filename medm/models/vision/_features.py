"""Shared code for encoders whose library exposes `forward_intermediates` (timm, open_clip).

Both libraries return one feature map per block (ViTs) or per stage (CNNs) as (B, C, h, w), with a ViT's prefix
(class / register) tokens split off. These helpers turn that into the (B, N, D) tokens medm uses and measure the
geometry without computing anything.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call


def to_tokens(spatial: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """(B, C, h, w) feature map (+ (B, P, C) prefix tokens) -> (B, P + h*w, C), row-major over the grid."""
    tokens = spatial.flatten(2).transpose(1, 2)
    return tokens if prefix is None else torch.cat([prefix, tokens], dim=1)


class _Call(nn.Module):
    # functional_call runs `forward`; this wrapper makes `forward` the feature function to probe.
    def __init__(self, module: nn.Module, fn: Callable[[nn.Module, torch.Tensor], tuple]):
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, x: torch.Tensor) -> tuple:
        return self.fn(self.module, x)


def probe_geometry(module: nn.Module, fn: Callable[[nn.Module, torch.Tensor], tuple],
                   image_size: tuple[int, int], channels: int = 3) -> tuple[int, tuple[int, int], int]:
    """Run `fn(module, x) -> (spatial (B, C, h, w), prefix (B, P, C) | None)` on the meta device.

    Only shapes are computed (no memory, no FLOPs), so this also works while the module is still being built on
    the meta device by `from_pretrained`, and for any architecture the library supports.

    Returns:
        (hidden_size C, grid (h, w), number of prefix tokens P).
    """
    wrapped = _Call(module, fn)
    # DeepSpeed ZeRO-3 partitions parameters into empty tensors and keeps the real shape in `ds_shape`.
    fake = {name: torch.empty(getattr(t, "ds_shape", t.shape), dtype=t.dtype, device="meta")
            for name, t in [*wrapped.named_parameters(), *wrapped.named_buffers()]}
    x = torch.zeros(1, channels, *image_size, device="meta")
    with torch.no_grad():
        spatial, prefix = functional_call(wrapped, fake, (x,), strict=False)
    return spatial.shape[1], (spatial.shape[2], spatial.shape[3]), 0 if prefix is None else prefix.shape[1]


def check_select_feature(select_feature: str) -> None:
    if select_feature not in ("patch", "cls_patch"):
        raise ValueError(f"unknown select_feature {select_feature!r}; known: patch, cls_patch")


def check_select_layer(select_layer: int) -> None:
    if not isinstance(select_layer, int) or isinstance(select_layer, bool):
        raise ValueError(f"select_layer must be an integer, got {select_layer!r}")
