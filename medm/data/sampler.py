"""Length-grouped, modality-aware batching: batches of similar length, images, volumes and text-only samples apart.

Padding is wasted compute: a batch is as long as its longest sample. `GroupedSampler` orders one epoch so that
every batch holds samples of similar length (and, with `modalities`, of one modality, as LLaVA's
`group_by_modality_length` does: a text-only sample never waits in a batch padded out to an image sample's length,
and a batch never mixes the image and text-only code paths). How:

1. The samples of each modality are shuffled (numpy, seeded by `[seed, epoch]`).
2. Each modality's permutation is cut into windows of `window` global batches; inside a window samples are sorted
   by length, longest first, and cut into *steps* of `batch_size * world_size` samples: the batches all ranks
   run in one optimizer micro-step, so ranks wait on batches of about the same length. Lengths are compared in
   buckets of `bucket` tokens (default 8) and samples of one bucket keep their random order, so lengths that
   differ by a token or two (a "yes" and a "no" answer) do not sort batches by content; padding grows by less
   than a bucket per sample.
3. The steps of all modalities are shuffled together; the step holding the longest sample goes first, so an
   out-of-memory shows in the first step rather than hours in.
4. What is left of each modality (fewer samples than one step) is sorted by length and cut into steps at the end
   of the epoch (those may mix modalities; the very last may be short).

Every sample appears exactly once per epoch; the order is a function of `(seed, epoch)` only, so every process of
a distributed run draws the same order. The sampler yields the *global* order: the DataLoader cuts it into
batches of `batch_size` and Accelerate (the HF Trainer's data loader) deals whole batches to the ranks in turn
(batch k to rank k mod world_size), which is why a step is `world_size` consecutive batches. `window` trades
randomness for padding: 1 sorts only within a step (LLaVA), the default 64 leaves little padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["GroupedSampler", "grouped_order", "grouped_order_array"]


class ModalityCodes(Sequence[str]):
    """Per-sample modality names held as one small int each: a million samples take 1 MB, not 8 MB of pointers
    (and no object array when an epoch is planned).

    Args:
        codes: (N,) int, an index into `names` per sample.
        names: the modality names.
    """

    def __init__(self, codes: np.ndarray, names: Sequence[str]):
        self.names = tuple(names)
        self.codes = np.asarray(codes, dtype=np.uint8 if len(self.names) <= 256 else np.int32)

    @classmethod
    def of(cls, modalities: Sequence[str]) -> ModalityCodes:
        """`modalities` itself when it is one, else its codes."""
        if isinstance(modalities, ModalityCodes):
            return modalities
        index: dict[str, int] = {}
        codes = np.fromiter((index.setdefault(m, len(index)) for m in modalities), dtype=np.int32,
                            count=len(modalities))
        return cls(codes, list(index))

    def groups(self) -> list[np.ndarray]:
        """(K,) int64 sample indices of each modality present, modalities in name order."""
        counts = np.bincount(self.codes, minlength=len(self.names))
        present = sorted((name, code) for code, name in enumerate(self.names) if counts[code])
        return [np.flatnonzero(self.codes == code) for _, code in present]

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.names[c] for c in self.codes[i].tolist()]
        return self.names[self.codes[i]]

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and list(self) == list(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"ModalityCodes({len(self)} samples of {', '.join(self.names)})"


def grouped_order(lengths: Sequence[int], batch_size: int, *, modalities: Sequence[str] | None = None,
                  world_size: int = 1, window: int = 64, bucket: int = 8, seed: int = 0, epoch: int = 0
                  ) -> list[int]:
    """`grouped_order_array` as a list."""
    return grouped_order_array(lengths, batch_size, modalities=modalities, world_size=world_size, window=window,
                               bucket=bucket, seed=seed, epoch=epoch).tolist()


def grouped_order_array(lengths: Sequence[int], batch_size: int, *, modalities: Sequence[str] | None = None,
                        world_size: int = 1, window: int = 64, bucket: int = 8, seed: int = 0, epoch: int = 0
                        ) -> np.ndarray:
    """One epoch's sample order, grouped by length (and modality); see the module docstring.

    Args:
        lengths: tokens per sample (`ConversationDataset.lengths`).
        batch_size: samples per batch on one rank (the DataLoader's batch size).
        modalities: per sample, e.g. `image`, `image3d`, `text` (`ConversationDataset.modalities`); None: one
            group (length only).
        world_size: data-parallel ranks; a step is `batch_size * world_size` consecutive samples.
        window: steps per sorting window (>= 1).
        bucket: length resolution of the sort in tokens (>= 1; 1 sorts exactly).
        seed, epoch: the order is a function of both.

    Returns:
        (N,) int64: a permutation of `range(len(lengths))` (8 bytes a sample, not a Python int each).
    """
    if min(batch_size, world_size, window, bucket) < 1:
        raise ValueError(f"batch_size ({batch_size}), world_size ({world_size}), window ({window}) and bucket "
                         f"({bucket}) must be >= 1")
    n = len(lengths)
    if modalities is not None and len(modalities) != n:
        raise ValueError(f"{len(modalities)} modalities for {n} lengths")
    lens = np.asarray(lengths)
    keys = lens // bucket
    step = batch_size * world_size
    rng = np.random.default_rng([seed, epoch])
    groups = [np.arange(n, dtype=np.int64)] if modalities is None else ModalityCodes.of(modalities).groups()
    # Whole arrays, not a list of per-step arrays (a million samples made ~125,000 small array objects).
    steps: list[np.ndarray] = []  # per group: (its full steps, step) sample indices
    leftover: list[np.ndarray] = []
    for idx in groups:
        perm = idx[rng.permutation(len(idx))]
        # Stable sort inside each window of `window` steps, longest bucket first: a bucket keeps its random order.
        win = np.arange(len(perm), dtype=np.int64) // (window * step)
        perm = perm[np.lexsort((-keys[perm], win))]
        del win
        # Every window but the last holds whole steps, so only the group's last len % step samples are left over.
        full = len(perm) - len(perm) % step
        steps.append(perm[:full].reshape(-1, step))
        leftover.append(perm[full:])
    order = np.concatenate(steps) if steps else np.zeros((0, step), dtype=np.int64)
    del steps
    order = order[rng.permutation(len(order))]
    if len(order):
        longest = int(np.argmax(lens[order].max(axis=1)))  # the first step holding the longest sample
        order[[0, longest]] = order[[longest, 0]]
    rest = np.concatenate(leftover) if leftover else np.zeros(0, dtype=np.int64)
    rest = rest[np.argsort(-keys[rest], kind="stable")]
    return np.concatenate([order.ravel(), rest]).astype(np.int64, copy=False)


class GroupedSampler(torch.utils.data.Sampler[int]):
    """Sampler over a dataset with `lengths` (and optionally `modalities`) that yields `grouped_order`.

    Call `set_epoch(n)` before each epoch (the HF Trainer and Accelerate do so for samplers that have it).

    Args:
        lengths: tokens per sample.
        batch_size: per-rank batch size of the DataLoader.
        modalities: per-sample modality, or None to group by length alone.
        world_size: data-parallel ranks the DataLoader's batches are dealt to.
        window: steps per sorting window.
        bucket: length resolution of the sort in tokens.
        seed: base seed; the epoch is mixed in.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, modalities: Sequence[str] | None = None,
                 world_size: int = 1, window: int = 64, bucket: int = 8, seed: int = 0):
        self.lengths = np.asarray(lengths)  # a store's memory-mapped lengths stay mapped: no object per sample
        self.modalities = None if modalities is None else ModalityCodes.of(modalities)
        self.batch_size, self.world_size, self.window, self.bucket, self.seed = (batch_size, world_size, window,
                                                                                 bucket, seed)
        self.epoch = 0
        # Check the settings now rather than at the first epoch.
        grouped_order(self.lengths[:0], batch_size, world_size=world_size, window=window, bucket=bucket)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        # Python ints one at a time from the array: an epoch's order costs 8 bytes a sample, not a list of ints.
        return map(int, grouped_order_array(self.lengths, self.batch_size, modalities=self.modalities,
                                            world_size=self.world_size, window=self.window, bucket=self.bucket,
                                            seed=self.seed, epoch=self.epoch))

    def __len__(self) -> int:
        return len(self.lengths)
