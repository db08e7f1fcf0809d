"""`DataCollator`: pad a list of dataset items into one batch for `MedMForConditionalGeneration.forward`."""

from __future__ import annotations

from typing import Any

import torch

from medm.data.templates import IGNORE_INDEX


class DataCollator:
    """Pads `input_ids` with the pad id, `labels` with -100, builds `attention_mask`, and concatenates media.

    Args:
        tokenizer: gives `pad_token_id`.
        padding_side: `right` for training; `left` for batched generation (prompts end together).
        pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8 for tensor cores).

    Items: `input_ids` (T_i,), optional `labels` (T_i,), optional `pixel_values` (n_i, C, H, W) and
    `pixel_values_3d` (m_i, C, D, H, W) (None or absent for none).

    Returns:
        `input_ids` (B, T), `attention_mask` (B, T), `labels` (B, T) when the items have labels,
        `pixel_values` (sum n_i, C, H, W) in item order, then image order within an item (the reading order the
        model places features in), and `pixel_values_3d` likewise; a media key is left out when the batch has none.
    """

    def __init__(self, tokenizer: Any, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; medm.models.builder.add_media_tokens sets one")
        self.pad_id = tokenizer.pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        with_labels = [it.get("labels") is not None for it in items]
        if any(with_labels) and not all(with_labels):
            raise ValueError("some items have labels and some do not; collate training and prompt items apart")
        lengths = [len(it["input_ids"]) for it in items]
        T = max(lengths)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(items)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long) if all(with_labels) else None
        for b, (it, n) in enumerate(zip(items, lengths)):
            span = slice(0, n) if self.padding_side == "right" else slice(T - n, T)
            input_ids[b, span] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            attention_mask[b, span] = 1
            if labels is not None:
                labels[b, span] = torch.as_tensor(it["labels"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels is not None:
            batch["labels"] = labels
        for key in ("pixel_values", "pixel_values_3d"):
            parts = [it[key] for it in items if it.get(key) is not None]
            if parts:
                shapes = {tuple(p.shape[1:]) for p in parts}
                if len(shapes) > 1:
                    raise ValueError(f"{key} of one batch have different shapes {sorted(shapes)}; the preprocessing "
                                     "must resize every image to the encoder's size")
                batch[key] = torch.cat(parts)
        return batch
