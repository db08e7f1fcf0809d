"""`sdpa_varlen`: PyTorch's scaled-dot-product attention run sample by sample over packed rows.

With `sdpa` a packed row (medm.data.packing) gets a dense block-diagonal causal mask from transformers, and the
kernel computes every entry of the row's (T, T) scores before the mask throws the cross-sample ones away: the
attention costs T^2 per row, as much as unpacked random batches padded to their longest sample. `sdpa_varlen` is
what flash attention's varlen kernels do, written with sdpa for any device: no mask is built, and each sample
(each segment of the collator's `cu_seq_lens_q`, or of the `position_ids` where they restart) runs its own causal
sdpa call, so the attention costs the sum of the samples' squared lengths. The result equals `sdpa`'s with the
block-diagonal mask (tests/models/test_packed_attention.py). Inputs with an attention mask, a KV cache or one
sample per row go to transformers' own `sdpa` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_varlen"


def segment_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions restarting at 0 per sample -> int boundaries over the B * T flattened tokens (cu_seqlens)."""
    B, T = position_ids.shape
    flat = position_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[::T] = True  # a row never continues the previous one
    return torch.cat([starts.nonzero().flatten(), flat.new_tensor([B * T])])


def sdpa_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, H, T, d), key / value (B, H_kv, T, d) -> ((B, T, H, d), None), as transformers' attention functions."""
    if getattr(module, "sliding_window", None):
        raise ValueError("attn_implementation sdpa_varlen does not do sliding-window attention; use sdpa")
    cu = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    B, H, T, d = query.shape
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):  # e.g. a vision tower's own attention
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if cu is None and position_ids is not None and position_ids.dim() != 2:
        position_ids = None  # M-RoPE's (3, B, T) positions do not restart per sample: nothing to split
    if attention_mask is not None or key.shape[2] != T or T == 1 or (cu is None and position_ids is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if cu is None:
        cu = segment_bounds(position_ids.expand(B, -1))
    bounds = cu.tolist()
    if len(bounds) == B + 1 and bounds == list(range(0, B * T + 1, T)):  # one sample per row: plain causal sdpa
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=True)
    # (B, H, T, d) -> (H, B * T, d): the samples are contiguous spans of the flattened tokens.
    q, k, v = (x.transpose(0, 1).reshape(x.shape[1], B * T, d) for x in (query, key, value))
    gqa = k.shape[0] != H
    drop = dropout if module.training else 0.0
    # torch.split, not one slice per sample: a slice's backward writes its gradient into a zeroed full-size tensor
    # (as many full-size fills and adds as samples), split's backward concatenates the pieces once.
    sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    out = torch.cat([F.scaled_dot_product_attention(qs, ks, vs, dropout_p=drop, is_causal=True, scale=scaling,
                                                    enable_gqa=gqa)
                     for qs, ks, vs in zip(*(x.split(sizes, dim=1) for x in (q, k, v)))], dim=1)
    return out.reshape(H, B, T, d).permute(1, 2, 0, 3).contiguous(), None


def sdpa_varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask where the attention splits the samples itself (no 2D padding mask); else `sdpa`'s mask."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make `sdpa_varlen` an attn_implementation transformers knows (idempotent)."""
    AttentionInterface.register(NAME, sdpa_varlen_attention)
    AttentionMaskInterface.register(NAME, sdpa_varlen_mask)
