"""Validation data split off a training dataset by record id (`data.val_size`), for evaluation during training.

Record ids are sorted, shuffled with `random.Random(data.val_seed)`, and the first `n` go to validation: `n` is
`val_size` itself when it is 1 or more (a count), else `round(val_size * ids)` (at least one). Every sample of an
id lands on the same side, so no sample is in both, and the same file and seed always give the same split. Works
on any dataset with `samples` whose items hold `.record` (the medm and qwen-vl kinds' datasets).
"""

from __future__ import annotations

import copy
import random

from medm.config import ConfigError
from medm.data._bad_samples import BadSamples


def validation_ids(ids: list[str], val_size: float, seed: int, where: str = "data.val_size") -> set[str]:
    """The record ids that go to validation (rules in the module doc)."""
    unique = sorted(set(ids))
    n = int(val_size) if val_size >= 1 else max(1, round(val_size * len(unique)))
    if val_size >= 1 and val_size != int(val_size):
        raise ConfigError(f"{where}: {val_size} is neither a fraction (< 1) nor a whole count of records")
    if n >= len(unique):
        raise ConfigError(f"{where}: {val_size} leaves no training records ({len(unique)} distinct record ids)")
    random.Random(seed).shuffle(unique)
    return set(unique[:n])


def subset(dataset, keep: list[int]):
    """A shallow copy of `dataset` holding only the samples at `keep` (its own bad-sample count)."""
    part = copy.copy(dataset)
    samples = dataset.samples
    # A record store (medm.data.store) is cut by index, without reading or copying its rows.
    part.samples = samples.subset(keep) if hasattr(samples, "subset") else [samples[i] for i in keep]
    old = dataset.bad_samples
    part.bad_samples = BadSamples(len(part.samples), old.max_bad_samples)
    return part


def split_validation(dataset, val_size: float, seed: int) -> tuple:
    """(train, validation) parts of `dataset`, split by record id."""
    samples = dataset.samples
    ids = samples.record_ids if hasattr(samples, "record_ids") else [s.record.id for s in samples]
    val = validation_ids(ids, val_size, seed)
    return (subset(dataset, [i for i, r in enumerate(ids) if r not in val]),
            subset(dataset, [i for i, r in enumerate(ids) if r in val]))
