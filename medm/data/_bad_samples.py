"""Skip and count samples whose images or volumes fail to load during training (`data.max_bad_samples`).

A corrupt, truncated or missing file found at hour 30 of a run should cost one sample, not the run. `BadSamples`
remembers which samples failed, one byte per sample in shared memory, so that DataLoader worker processes (forked
or spawned: the arrays travel with the dataset to each worker) share one count of distinct bad samples and skip a
known bad sample without reading it again. Past the limit, loading raises `TooManyBadSamples` naming the last files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
from collections import deque
from multiprocessing import context as mp_context
from typing import Any

__all__ = ["BadSamples", "SkipsBadSamples", "TooManyBadSamples", "bad_sample_count", "resolve_limit"]


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


class SkipsBadSamples:
    """`__getitem__` for a dataset whose media may fail to load: a bad sample is logged once, counted in
    `self.bad_samples` and replaced by the next good sample.

    The dataset provides `samples` (each with `.record.id` and `.length`), `bad_samples` (a `BadSamples`),
    `_item(i)` (sample `i`'s item, raising one of `load_errors` when its media fail) and `_modality_key(i)`.
    """

    load_errors: tuple[type[BaseException], ...] = (OSError,)

    def _item(self, i: int) -> dict[str, Any]:
        raise NotImplementedError

    def _modality_key(self, i: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sample `i`; when its media fail to load, the next good sample after it (the same modality and no longer,
        when there is one), so that one bad file costs one sample, not the run.

        Raises:
            TooManyBadSamples: more distinct bad samples than `max_bad_samples` (names the last files).
        """
        j = i
        while True:
            if not self.bad_samples.is_bad(j):
                try:
                    return self._item(j)
                except self.load_errors as e:
                    self.mark_bad(j, e)
                except MemoryError:
                    # A file too big for this machine (a decompression or aspect-ratio bomb) costs one sample too.
                    self.mark_bad(j, MemoryError(f"out of memory while loading {self._media_files(j)}"))
            j = self._substitute(i)

    def _media_files(self, j: int) -> str:
        record = self.samples[j].record
        files = [*(getattr(record, "image", None) or []), *(getattr(record, "image3d", None) or [])]
        return ", ".join(repr(str(f)) for f in files) or "its media"

    def mark_bad(self, j: int, error: Exception) -> None:
        """Count sample `j` as bad (logged the first time).

        Raises:
            TooManyBadSamples: the count is now above the limit.
        """
        rid = self.samples[j].record.id
        if self.bad_samples.add(j, rid, error):
            # Logged under the dataset's own module, where a user filtering logs looks for it.
            logging.getLogger(type(self).__module__).warning("skipping sample %r: %s (%d bad sample(s) so far)",
                                                             rid, error, self.bad_samples.count)

    def _substitute(self, i: int) -> int:
        """The first sample after `i` (cyclically) not known to be bad: of `i`'s modality and length or shorter
        (so length-grouped batches and packs keep their sizes) when there is one, else any."""
        n, want = len(self.samples), self.samples[i]
        kind = self._modality_key(i)
        fallback = None
        for k in range(1, n):
            j = (i + k) % n
            if self.bad_samples.is_bad(j):
                continue
            if self._modality_key(j) == kind and self.samples[j].length <= want.length:
                return j
            fallback = j if fallback is None else fallback
        if fallback is None:
            raise RuntimeError(f"every one of the {n} samples failed to load (e.g. record {want.record.id!r}); check "
                               "data.image_dir and the files with `medm data validate`")
        return fallback
