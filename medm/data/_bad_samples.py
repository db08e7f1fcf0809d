"""Skip and count samples whose images or volumes fail to load during training (`data.max_bad_samples`).

A corrupt, truncated or missing file found at hour 30 of a run should cost one sample, not the run. `BadSamples`
remembers which samples failed, one byte per sample in shared memory, so that DataLoader worker processes (forked
or spawned: the arrays travel with the dataset to each worker) share one count of distinct bad samples and skip a
known bad sample without reading it again. Past the limit, loading raises `TooManyBadSamples` naming the last files.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
from collections import deque
from multiprocessing import context as mp_context

__all__ = ["BadSamples", "TooManyBadSamples", "bad_sample_count", "resolve_limit"]


class TooManyBadSamples(RuntimeError):
    """More samples failed to load than `data.max_bad_samples` allows; the message names the last files."""


def resolve_limit(max_bad_samples: float | None, num_samples: int) -> int | None:
    """The number of distinct bad samples allowed: a count (>= 1), a fraction of `num_samples` (< 1), 0 (none), or
    None (no limit).

    Raises:
        ValueError: a negative value.
    """
    if max_bad_samples is None:
        return None
    if max_bad_samples < 0:
        raise ValueError(f"data.max_bad_samples: {max_bad_samples!r} must be >= 0 (a count, or a fraction < 1 of the "
                         "samples), or null for no limit")
    if max_bad_samples < 1:
        return math.floor(max_bad_samples * num_samples)
    return int(max_bad_samples)


class _LocalCount:
    """Stands in for a shared `multiprocessing.Value` in a plain copy of the dataset (deepcopy, pickle to disk)."""

    def __init__(self, value: int):
        self.value = value

    def get_lock(self):
        return contextlib.nullcontext()


class BadSamples:
    """Which samples of a dataset failed to load, shared by DataLoader workers.

    Args:
        num_samples: samples in the dataset.
        max_bad_samples: see `resolve_limit`.

    `recent` holds this process's last few failures as `(record id, message)`, for the log and the limit error.
    """

    def __init__(self, num_samples: int, max_bad_samples: float | None = 100):
        self.num_samples = num_samples
        self.limit = resolve_limit(max_bad_samples, num_samples)
        self.max_bad_samples = max_bad_samples
        # Shared memory: fork and spawn workers see the same bytes (spawn pickles them while starting the worker).
        self._flags = multiprocessing.Array("b", max(num_samples, 1), lock=False)
        self._count = multiprocessing.Value("q", 0)
        self.recent: deque[tuple[str, str]] = deque(maxlen=5)

    def __getstate__(self):
        state = self.__dict__.copy()
        if mp_context.get_spawning_popen() is None:
            # Not a worker being started: a copy that shares nothing (shared ctypes refuse other pickling).
            state["_flags"] = bytearray(bytes(self._flags))
            state["_count"] = _LocalCount(self._count.value)
        return state

    @property
    def count(self) -> int:
        """Distinct samples that failed to load so far (in every worker)."""
        return int(self._count.value)

    def is_bad(self, index: int) -> bool:
        return bool(self._flags[index])

    def add(self, index: int, record_id: str, error: Exception) -> bool:
        """Mark sample `index` as bad; True when it was not known yet.

        Raises:
            TooManyBadSamples: the count is now above the limit.
        """
        with self._count.get_lock():
            new = not self._flags[index]
            if new:
                self._flags[index] = 1
                self._count.value += 1
            count = self._count.value
        self.recent.append((record_id, str(error)))
        if self.limit is not None and count > self.limit:
            last = "\n  ".join(f"record {rid!r}: {msg}" for rid, msg in self.recent)
            raise TooManyBadSamples(
                f"{count} of {self.num_samples} samples failed to load, more than data.max_bad_samples="
                f"{self.max_bad_samples} allows; the last ones:\n  {last}\nList every bad record with `medm data "
                "validate FILE --image-dir DIR` (--write-clean OUT drops them), or raise data.max_bad_samples.")
        return new


def bad_sample_count(dataset) -> int | None:
    """Bad samples of a training dataset, summed over the datasets it wraps (a mixture's `datasets`, a packed
    dataset's `dataset`); None when none of them counts bad samples."""
    tracker = getattr(dataset, "bad_samples", None)
    if isinstance(tracker, BadSamples):
        return tracker.count
    inner = list(getattr(dataset, "datasets", None) or [])
    if getattr(dataset, "dataset", None) is not None:
        inner.append(dataset.dataset)
    counts = [c for c in map(bad_sample_count, inner) if c is not None]
    return sum(counts) if counts else None
