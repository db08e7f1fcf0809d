"""Data mixtures and curricula: several annotation files in one training epoch, by share or by stage.

A data section's `path` may list files, each a path or a mapping::

    data:
      path:
        - {path: data/medtrinity/describe.jsonl, image_dir: data/medtrinity, ratio: 0.3, order: 1}
        - {path: data/pathvqa/train.json, image_dir: data/pvqa, ratio: 0.3, order: 1}
        - {path: data/slake/train.json, image_dir: data/Slake1.0/imgs, ratio: 0.4, order: 2}
      mixture: {num_samples: null, replacement: false, shuffle: true, seed: 0}

- `ratio`: the file's share of the epoch's samples. Shares are normalised to sum to 1; the epoch has `num_samples`
  samples (default: the files' sizes added up), and file i gives `round(share_i * num_samples)` of them (largest
  remainders, so the counts add up exactly). Without any ratio, the shares are the files' sizes: each sample once
  per epoch. A file asked for more samples than it holds is repeated (`replacement: false`, the default: every
  sample appears floor(k) or ceil(k) times for k = count / size, a fresh permutation per pass) or drawn with
  replacement (`replacement: true`); fewer samples than it holds are a random subset, different each epoch.
- `order`: a curriculum stage. The epoch is the stage blocks in ascending order (e.g. 1: open-ended and descriptive
  data, 2: closed-ended), each block shuffled on its own (`shuffle`); every file has an order, or none does.
  Without orders the whole epoch is one shuffled block. `shuffle: false` keeps files in entry order (within a
  stage) and each pass over a file in index order (subsets are still drawn at random).

Plans are deterministic for a seed and epoch (`MixtureSampler.set_epoch`), so every process of a distributed run
draws the same plan and Accelerate can shard its batches. The mixture sampler replaces length-grouped batching.

The trainer builds one dataset per entry (each with its own `image_dir`) and calls::

    dataset, sampler = build_mixture(entries, make_dataset, MixtureArgs(...))   # ConcatDataset + MixtureSampler
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medm.config import arg, unknown_key


class MixtureError(ValueError):
    """A mixture specification that cannot be used; the message names the entry and the key."""


@dataclass
class MixtureEntry:
    """One file of a mixture.

    Attributes:
        path: annotation file (LLaVA / MedM-VL or ShareGPT records, JSON list or JSONL).
        image_dir: base directory of the file's relative image paths; None: the data section's `image_dir`.
        ratio: share of the epoch's samples (normalised over the entries), or None.
        order: curriculum stage (blocks in ascending order), or None.
    """

    path: str
    image_dir: str | None = None
    ratio: float | None = None
    order: int | None = None


@dataclass
class MixtureArgs:
    num_samples: int | None = arg(None, "samples per epoch; null: the files' sizes added up")
    replacement: bool = arg(False, "a file asked for more samples than it holds: false repeats it (each sample "
                                   "floor or ceil of count/size times), true draws with replacement")
    shuffle: bool = arg(True, "shuffle within each curriculum block (the whole epoch without orders); false: files "
                              "in entry order, each pass over a file in its own order")
    seed: int = arg(0, "plan seed; the epoch number is mixed in, so epochs differ but runs repeat")


_KEYS = {"path", "image_dir", "ratio", "order"}


def parse_mixture(spec: str | Sequence[str | dict[str, Any]], image_dir: str | None = None) -> list[MixtureEntry]:
    """Entries of a data section's `path`: a path, or a list of paths and `{path, image_dir, ratio, order}` maps.

    Args:
        spec: the `path` value.
        image_dir: the data section's `image_dir`, used by entries without their own.

    Raises:
        MixtureError: unknown keys, a missing path, a negative or non-numeric ratio, all ratios zero, or an order
            on some entries only (the message names the entry).
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise MixtureError("the data path list is empty")
    entries = []
    for i, item in enumerate(items):
        where = f"data path entry {i}"
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise MixtureError(f"{where}: expected a path or a mapping with path / image_dir / ratio / order, got "
                               f"{item!r}")
        unknown = sorted(set(item) - _KEYS)
        if unknown:
            raise MixtureError(str(unknown_key(where, unknown[0], sorted(_KEYS))))
        if not isinstance(item.get("path"), str) or not item["path"]:
            raise MixtureError(f"{where}: needs a `path` (annotation file)")
        ratio, order = item.get("ratio"), item.get("order")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 0):
            raise MixtureError(f"{where} ({item['path']}): ratio must be a number >= 0, got {ratio!r}")
        if order is not None and (isinstance(order, bool) or not isinstance(order, int)):
            raise MixtureError(f"{where} ({item['path']}): order must be an integer stage, got {order!r}")
        entries.append(MixtureEntry(item["path"], item.get("image_dir", image_dir),
                                    None if ratio is None else float(ratio), order))
    with_ratio = [e.ratio is not None for e in entries]
    if any(with_ratio) and not all(with_ratio):
        missing = next(e.path for e in entries if e.ratio is None)
        raise MixtureError(f"some entries have a ratio and {missing} has none: give every entry a ratio or none")
    if all(with_ratio) and sum(e.ratio for e in entries) <= 0:
        raise MixtureError("every ratio is 0: at least one file must contribute samples")
    with_order = [e.order is not None for e in entries]
    if any(with_order) and not all(with_order):
        missing = next(e.path for e in entries if e.order is None)
        raise MixtureError(f"some entries have an order and {missing} has none: give every entry an order or none")
    return entries


def sample_counts(sizes: Sequence[int], entries: Sequence[MixtureEntry], num_samples: int | None = None
                  ) -> list[int]:
    """Samples each entry contributes to one epoch (largest-remainder rounding; the counts add up to the total)."""
    if len(sizes) != len(entries):
        raise MixtureError(f"{len(sizes)} dataset size(s) for {len(entries)} mixture entries")
    total = sum(sizes) if num_samples is None else int(num_samples)
    weights = np.array([e.ratio if e.ratio is not None else s for e, s in zip(entries, sizes)], dtype=np.float64)
    if total < 0 or weights.sum() <= 0:
        raise MixtureError(f"nothing to sample: sizes {list(sizes)}, num_samples {num_samples}")
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    # Stable order of remainders: ties go to the earlier entry, so plans never depend on float noise.
    for i in sorted(range(len(entries)), key=lambda j: (-(exact[j] - counts[j]), j))[: total - int(counts.sum())]:
        counts[i] += 1
    for e, s, c in zip(entries, sizes, counts):
        if c > 0 and s == 0:
            raise MixtureError(f"{e.path}: asked for {c} sample(s) but its dataset is empty")
    return [int(c) for c in counts]


def _draw(rng: np.random.Generator, size: int, count: int, replacement: bool, shuffle: bool) -> np.ndarray:
    """`count` local indices of a dataset of `size`: repetition by whole permutations, or iid with replacement.
    Without `shuffle` each pass (or the with-replacement draw) is in index order."""
    if count == 0:
        return np.empty(0, dtype=np.int64)
    if replacement:
        drawn = rng.integers(0, size, count)
        return drawn if shuffle else np.sort(drawn)
    full, rest = divmod(count, size)
    parts = [rng.permutation(size) for _ in range(full)] + [rng.permutation(size)[:rest]]
    return np.concatenate(parts if shuffle else [np.sort(p) for p in parts])


def plan_epoch(sizes: Sequence[int], entries: Sequence[MixtureEntry], *, seed: int = 0, epoch: int = 0,
               num_samples: int | None = None, replacement: bool = False, shuffle: bool = True) -> list[int]:
    """One epoch's ordered indices into `ConcatDataset(datasets)` (datasets in entry order).

    Args:
        sizes: `len()` of each entry's dataset (after any dropped records).
        entries: the mixture (`parse_mixture`), same order as `sizes`.
        seed / epoch: the plan is a function of both.
        num_samples / replacement / shuffle: see `MixtureArgs`.

    Returns:
        Global indices (entry i's local index j is `sum(sizes[:i]) + j`): curriculum blocks in ascending order,
        each shuffled when `shuffle`.
    """
    counts = sample_counts(sizes, entries, num_samples)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    rng = np.random.default_rng([seed, epoch])
    drawn = [offsets[i] + _draw(rng, sizes[i], counts[i], replacement, shuffle) for i in range(len(entries))]
    stages = sorted({e.order for e in entries}, key=lambda o: (o is None, o))
    plan: list[int] = []
    for stage in stages:
        block = np.concatenate([drawn[i] for i, e in enumerate(entries) if e.order == stage])
        if shuffle:
            block = block[rng.permutation(len(block))]
        plan += block.tolist()
    return plan


class MixtureSampler(torch.utils.data.Sampler[int]):
    """Yields `plan_epoch` for the current epoch; call `set_epoch(n)` before each epoch (the HF Trainer and
    Accelerate do so for samplers that have it).

    Args:
        sizes: `len()` of each entry's dataset, in `ConcatDataset` order.
        entries: the mixture entries.
        args: `MixtureArgs` (num_samples, replacement, shuffle, seed).
    """

    def __init__(self, sizes: Sequence[int], entries: Sequence[MixtureEntry], args: MixtureArgs | None = None):
        self.sizes, self.entries = list(sizes), list(entries)
        self.args = args or MixtureArgs()
        self.epoch = 0
        self._len = sum(sample_counts(self.sizes, self.entries, self.args.num_samples))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def plan(self) -> list[int]:
        a = self.args
        return plan_epoch(self.sizes, self.entries, seed=a.seed, epoch=self.epoch, num_samples=a.num_samples,
                          replacement=a.replacement, shuffle=a.shuffle)

    def __iter__(self):
        return iter(self.plan())

    def __len__(self) -> int:
        return self._len


def build_mixture(entries: Sequence[MixtureEntry], make_dataset: Callable[[MixtureEntry], torch.utils.data.Dataset],
                  args: MixtureArgs | None = None) -> tuple[torch.utils.data.ConcatDataset, MixtureSampler]:
    """One dataset per entry (`make_dataset(entry)`, e.g. a ConversationDataset over the entry's records with its
    `image_dir`), concatenated, and the sampler that plans each epoch over them."""
    datasets = [make_dataset(e) for e in entries]
    return torch.utils.data.ConcatDataset(datasets), MixtureSampler([len(d) for d in datasets], entries, args)
