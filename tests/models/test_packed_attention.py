"""attn_implementation `sdpa_varlen` (medm.models._packed_attention): sdpa run sample by sample over packed rows
gives what `sdpa` gives with the block-diagonal causal mask, values and gradients; inputs it does not split
(padding masks, one sample per row) get transformers' `sdpa` unchanged."""

from __future__ import annotations

import types

import pytest
import torch

from medm.models._packed_attention import sdpa_varlen_attention, segment_bounds


def test_segment_bounds_from_restarting_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    # Row 2 starts a new segment even though its first position follows row 1's last + 1 would not.
    assert segment_bounds(pos).tolist() == [0, 3, 5, 6, 10, 12]
    assert segment_bounds(torch.tensor([[0, 1, 2, 3]])).tolist() == [0, 4]


def block_diagonal_reference(q, k, v, lengths):
    """sdpa with a dense block-diagonal causal mask (what transformers builds for `sdpa` on packed rows)."""
    B, _, T, _ = q.shape
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).reshape(B, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("use_cu", [False, True])
def test_varlen_equals_block_diagonal_sdpa_values_and_gradients(use_cu):
    torch.manual_seed(0)
    B, H, H_kv, T, d = 2, 4, 2, 10, 8
    lengths = [3, 5, 2, 6, 4]  # row 0: 3 + 5 + 2; row 1: 6 + a 4-token padding segment
    q = torch.randn(B, H, T, d, requires_grad=True)
    k = torch.randn(B, H_kv, T, d, requires_grad=True)
    v = torch.randn(B, H_kv, T, d, requires_grad=True)
    pos = torch.cat([torch.arange(n) for n in lengths]).reshape(B, T)
    kwargs = {"position_ids": pos}
    if use_cu:
        kwargs["cu_seq_lens_q"] = torch.tensor([0, 3, 8, 10, 16, 20], dtype=torch.int32)
    module = types.SimpleNamespace(training=False, is_causal=True)
    got, weights = sdpa_varlen_attention(module, q, k, v, None, scaling=d ** -0.5, **kwargs)
    assert weights is None and got.shape == (B, T, H, d)
    ref = block_diagonal_reference(q, k, v, lengths)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((got * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_padded_batch_and_generation_match_sdpa(tiny_model):
    """A left-padded batch (attention mask, KV cache): the same logits and generated ids as `sdpa`."""
    model, tok = tiny_model
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = {}
    for attn in ("sdpa", "sdpa_varlen"):
        model.llm.config._attn_implementation = attn
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        out[attn] = logits, gen
    model.llm.config._attn_implementation = "sdpa"
    torch.testing.assert_close(out["sdpa_varlen"][0][mask.bool()], out["sdpa"][0][mask.bool()])
    assert torch.equal(out["sdpa_varlen"][1], out["sdpa"][1])


def test_non_causal_attention_is_left_to_sdpa():
    """A bidirectional caller (e.g. a vision tower splitting images by cu_seq_lens) gets plain sdpa, not causal."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    module = types.SimpleNamespace(training=False, is_causal=False)
    got, _ = sdpa_varlen_attention(module, q, k, v, None, is_causal=False,
                                   cu_seq_lens_q=torch.tensor([0, 3, 6], dtype=torch.int32))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    torch.testing.assert_close(got, ref)


def test_sliding_window_layers_are_refused():
    q = torch.randn(1, 2, 4, 8)
    module = types.SimpleNamespace(training=False, sliding_window=2)
    with pytest.raises(ValueError, match="sliding-window"):
        sdpa_varlen_attention(module, q, q, q, None, position_ids=torch.tensor([[0, 1, 0, 1]]))
