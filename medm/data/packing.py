"""Packing: several samples in one row, with no attention across sample boundaries.

`PackedDataset` bins the samples of a `ConversationDataset` into packs of at most `capacity` tokens (best-fit
decreasing on the exact lengths the dataset knows before loading anything), and `PackingCollator` pads packs into
rows. Inside a row:

- `position_ids` restart at 0 for every sample, so rotary positions are exactly the unpacked ones;
- there is no `attention_mask`: transformers reads the sample boundaries from `position_ids` (every place where
  the position does not go up by one starts a sample) and builds a block-diagonal causal mask for `eager`, `sdpa`
  and `flex_attention` (`masking_utils.find_packed_sequence_indices`). For `flash_attention_2` / `_3` the
  collator also gives the varlen kernel its sequence boundaries (`cu_seq_lens_q/k`, `max_length_q/k` over the
  flattened rows, `flash_kwargs=True`), which is what makes packing pay off on a GPU: the attention costs the sum
  of the samples' squared lengths, not the row's;
- the first label of every sample is -100: in a packed row the last token of one sample would otherwise be trained
  to predict the first token of the next. (That label is never a target when unpacked either, so the loss per
  supervised token is exactly the unpacked batch's.)
- the padding at the end of a row (label -100) is a segment of its own (its positions restart at 0 too).

Images and volumes are concatenated in row order, then sample order: the order the model's `masked_scatter`
places features in.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from medm.data.collator import DataCollator
from medm.data.sampler import ModalityCodes
from medm.data.templates import IGNORE_INDEX

__all__ = ["PackedDataset", "PackingCollator", "pack_lengths"]


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: sample indices grouped into packs of at most `capacity` tokens.

    Samples are placed longest first, each into the open pack it fills most tightly (a new pack when none has
    room). Deterministic: ties keep index order. Packs are returned in creation order, samples in placement order.

    Raises:
        ValueError: a sample longer than `capacity` (names its index and length).
    """
    if capacity < 1:
        raise ValueError(f"pack capacity must be >= 1 token, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    # Open packs keyed by free room, kept sorted: (room, pack index).
    rooms: list[tuple[int, int]] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the pack capacity {capacity}; raise "
                             "data.pack_length or lower data.max_length")
        at = bisect.bisect_left(rooms, (n, -1))
        if at == len(rooms):
            packs.append([i])
            room, p = capacity - n, len(packs) - 1
        else:
            room, p = rooms.pop(at)
            packs[p].append(i)
            room -= n
        if room > 0:
            bisect.insort(rooms, (room, p))
    return packs


class PackedDataset(torch.utils.data.Dataset):
    """A dataset of packs over a dataset with `lengths` (e.g. `ConversationDataset`).

    Args:
        dataset: items with `input_ids`, `labels` and optional `pixel_values` / `pixel_values_3d`; `lengths`
            gives each item's token count without loading it.
        capacity: most tokens per pack (usually the dataset's `max_length`).

    Items: `input_ids` (T,), `labels` (T,) with each sample's first label -100, `position_ids` (T,) restarting
    per sample, `seq_lengths` (list of the samples' lengths), `pixel_values` (sum n_i, C, H, W) or None,
    `pixel_values_3d` likewise, `length` T.
    """

    def __init__(self, dataset, capacity: int):
        if not hasattr(dataset, "lengths"):
            raise ValueError(f"packing needs a dataset that knows its lengths; {type(dataset).__name__} has no "
                             "`lengths`")
        self.dataset = dataset
        self.capacity = int(capacity)
        self.sample_lengths = list(dataset.lengths)
        self.packs = pack_lengths(self.sample_lengths, self.capacity)
        mods = getattr(dataset, "modalities", None)
        self._modalities = None if mods is None else ModalityCodes.of(mods)

    @property
    def lengths(self) -> list[int]:
        """Tokens per pack, for length-grouped batching of packs."""
        return [sum(self.sample_lengths[i] for i in p) for p in self.packs]

    @property
    def modalities(self) -> list[str] | None:
        """Per pack: the modality its samples share, or `mixed`."""
        if self._modalities is None:
            return None
        out = []
        for p in self.packs:
            kinds = {self._modalities[i] for i in p}
            out.append(kinds.pop() if len(kinds) == 1 else "mixed")
        return out

    @property
    def num_samples(self) -> int:
        return len(self.sample_lengths)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return pack_items([self.dataset[j] for j in self.packs[i]])


def pack_items(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate samples into one pack item (see `PackedDataset`)."""
    ids = [torch.as_tensor(it["input_ids"], dtype=torch.long) for it in items]
    labels = []
    for it in items:
        lab = torch.as_tensor(it["labels"], dtype=torch.long).clone()
        lab[:1] = IGNORE_INDEX  # never a target: see the module docstring
        labels.append(lab)
    out: dict[str, Any] = {
        "input_ids": torch.cat(ids), "labels": torch.cat(labels),
        "position_ids": torch.cat([torch.arange(len(x)) for x in ids]),
        "seq_lengths": [len(x) for x in ids], "length": sum(len(x) for x in ids),
    }
    for key in ("pixel_values", "pixel_values_3d"):
        parts = [it[key] for it in items if it.get(key) is not None]
        out[key] = torch.cat(parts) if parts else None
    return out


class PackingCollator(DataCollator):
    """Pads packs (or single samples) into rows with per-sample `position_ids` and no `attention_mask`.

    Args:
        tokenizer: gives `pad_token_id`.
        pad_to_multiple_of: round the row length up to a multiple of this.
        flash_kwargs: also return `cu_seq_lens_q` / `cu_seq_lens_k` (int32, boundaries over the flattened
            (B * T) tokens, padding included as its own segments) and `max_length_q` / `max_length_k`, the
            varlen inputs of `flash_attention_2` / `_3` (set it when the model uses one of those).

    Returns:
        `input_ids` (B, T), `labels` (B, T), `position_ids` (B, T), `pixel_values` / `pixel_values_3d` as
        `DataCollator` (left out when the batch has none), and the flash kwargs when asked.
    """

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None, flash_kwargs: bool = False):
        super().__init__(tokenizer, padding_side="right", pad_to_multiple_of=pad_to_multiple_of)
        self.flash_kwargs = flash_kwargs

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        items = [it if "position_ids" in it else pack_items([it]) for it in items]
        batch = super().__call__([{k: it[k] for k in ("input_ids", "labels", "pixel_values", "pixel_values_3d")}
                                  for it in items])
        B, T = batch["input_ids"].shape
        position_ids = torch.empty((B, T), dtype=torch.long)
        segments: list[int] = []
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            position_ids[b, :n] = it["position_ids"]
            position_ids[b, n:] = torch.arange(T - n)
            segments += list(it["seq_lengths"]) + ([T - n] if T > n else [])
        del batch["attention_mask"]
        batch["position_ids"] = position_ids
        if self.flash_kwargs:
            cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(torch.tensor(segments, dtype=torch.int32), 0)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = batch["max_length_k"] = max(segments)
        return batch
