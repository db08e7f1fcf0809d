"""`SampleStore`: a dataset's tokenized samples in Arrow files on disk, memory-mapped, built once and shared.

Records are normalised and encoded once (by `data.num_proc` workers, through the model kind's own encoder, so ids
and labels are exactly those of the in-memory path) into Arrow tables under `data.cache_dir`, one directory per
fingerprint of everything that changes the tokens: the data files (path, size, mtime), the tokenizer's state, the
kind, template, system prompt, `max_length`, media token counts (qwen-vl: the processor's image settings, box
format and image dir) and `STORE_VERSION`. A file lock lets exactly one process build a missing store; every other
rank (or node on a shared disk) waits and opens the same files. Opening maps the table and a few small per-sample
arrays (`.npy`: lengths, media counts, table rows); nothing is read until used (a sample's ids when it is loaded,
the lengths when a sampler plans an epoch), so a run holds no Python object per record and forked or spawned
DataLoader workers share the pages.

    store = open_store(["train.jsonl"], ConversationEncoder(tok, num_image_tokens=64), cache_dir="~/.cache/medm")
    store[i].ids, store[i].labels, store[i].record      # one sample, attributes as the datasets' `_Sample`
    store.lengths, store.n_images, store.n_volumes      # numpy, one value per sample
    store.subset(np.array([0, 5, 9]))                   # a view by index, no rows copied

An encoder (`ConversationEncoder` in medm.data.dataset, `QwenVLEncoder` in medm.qwenvl.data) has:
`kind` (str), `fingerprint()` (JSON-able dict), `features()` (extra Arrow columns: name -> `datasets` feature),
`media_errors` (exceptions that make a record a known-bad sample instead of an error) and `encode(record)` ->
dict(ids, labels, length, n_images, n_volumes, extra columns...) or None (dropped: no supervised token within
max_length), raising `TemplateError` when the record cannot be encoded exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medm.data._encoded import EncodingLog
from medm.data._store_build import (
    ARRAYS,
    META,
    RECORDS,
    STORE_VERSION,
    build_if_missing,
    record_from_json,
    record_to_json,
)
from medm.data.annotations import Record
from medm.data.templates import TemplateError

__all__ = ["STORE_VERSION", "SampleStore", "StoredSample", "default_cache_dir", "open_store", "record_from_json",
           "record_to_json", "tokenizer_fingerprint"]

logger = logging.getLogger(__name__)


def default_cache_dir() -> str:
    """`$MEDM_CACHE_DIR`, else `~/.cache/medm/records`."""
    return os.environ.get("MEDM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "medm", "records")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's serialized state (vocabulary, merges, added tokens, normalisation), chat template and
    special tokens: what decides the ids it gives."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({"added": sorted((i, str(t)) for i, t in tokenizer.added_tokens_decoder.items()),
                         "special": tokenizer.special_tokens_map, "chat_template": tokenizer.chat_template},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


class StoredSample:
    """One sample read from a store: `ids`, `labels` (lists of int, one id per media placeholder), `length` (after
    expansion and truncation), `n_images`, `n_volumes`, `record` (decoded on first use) and the kind's extra
    attributes (qwen-vl: `geometries`)."""

    def __init__(self, record_json: str, ids: list[int], labels: list[int], length: int, n_images: int,
                 n_volumes: int, **extra: Any):
        self._record_json = record_json
        self._record: Record | None = None
        self.ids, self.labels, self.length = ids, labels, length
        self.n_images, self.n_volumes = n_images, n_volumes
        self.__dict__.update(extra)

    @property
    def record(self) -> Record:
        if self._record is None:
            self._record = record_from_json(self._record_json)
        return self._record


class SampleStore(Sequence):
    """The samples of a built store (see the module doc), in record order, failed and dropped records left out.

    Args:
        path: the store's directory (`open_store` builds it and returns the store).
        decode: the kind's `(extra column values) -> attributes` for `StoredSample` (picklable); None: kept as read.
        positions: the samples kept, by position in the whole store (a subset); None: all.

    Attributes:
        meta: what the build found (`num_records`, `num_dropped`, `errors`, `files`, `fingerprint`, ...).
        rows: (N,) int64, each sample's row in the table (failed and dropped records have rows too).
        lengths: (N,) int32, ids per sample after expansion and truncation (a known-bad sample: the longest).
        n_images, n_volumes: (N,) int32, media kept after truncation.
        bad: (N,) bool, samples whose media could not be read when the store was built (qwen-vl).
        built: True when this process built the store (a cache miss).
    """

    def __init__(self, path: str, decode: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 positions: np.ndarray | None = None):
        from datasets import Dataset, concatenate_datasets  # defers datasets

        self.path = path
        self.decode = decode
        self.built = False
        self.is_subset = positions is not None
        with open(os.path.join(path, META)) as f:
            self.meta = json.load(f)
        parts = [Dataset.from_file(os.path.join(path, name)) for name in self.meta["shards"]]
        self._dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        # Memory-mapped: nothing is read until a column is touched. The records table and the samples (in shards
        # when several workers encoded) hold the same rows in the same order.
        table = self._dataset.data.table
        records = Dataset.from_file(os.path.join(path, RECORDS)).data.table
        self._extra = list(self.meta["extra_columns"])
        self._cols = {name: table.column(name) for name in ("ids", "labels", *self._extra)}
        self._cols.update(id=records.column("id"), record=records.column("record"))
        # Per-sample arrays written by the build, memory-mapped too: opening costs no memory per sample.
        self._arrays = {name: np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r") for name in ARRAYS}
        self._select(None if positions is None else np.asarray(positions, dtype=np.int64))

    def _select(self, positions: np.ndarray | None) -> None:
        """Keep the samples at `positions` of the whole store (None: all of them)."""
        a = self._arrays
        pick = (lambda x: x) if positions is None else (lambda x: np.asarray(x[positions]))
        self.positions = positions
        self.rows = pick(a["rows"])
        self.lengths, self.n_images, self.n_volumes, self.bad = (pick(a[k]) for k in ("length", "n_images",
                                                                                     "n_volumes", "bad"))

    def __getstate__(self) -> dict[str, Any]:
        # Workers and copies reopen the mapping by path instead of pickling the table.
        return {"path": self.path, "decode": self.decode, "positions": self.positions, "built": self.built}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["decode"], state["positions"])
        self.built = state["built"]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        r = int(self.rows[i])
        c = self._cols
        extra = {name: c[name][r].as_py() for name in self._extra}
        if self.decode is not None:
            extra = self.decode(extra)
        return StoredSample(c["record"][r].as_py(), c["ids"][r].values.to_numpy().tolist(),
                            c["labels"][r].values.to_numpy().tolist(), int(self.lengths[i]), int(self.n_images[i]),
                            int(self.n_volumes[i]), **extra)

    def subset(self, keep: Sequence[int] | np.ndarray) -> SampleStore:
        """The samples at positions `keep` (a view on the same files; nothing is copied)."""
        part = object.__new__(SampleStore)
        part.__dict__.update(self.__dict__)
        keep = np.asarray(keep, dtype=np.int64)
        part._select(keep if self.positions is None else self.positions[keep])
        part.is_subset = True
        return part

    @property
    def record_ids(self) -> list[str]:
        """Record id of every sample (one column read, no record decoded)."""
        return self._cols["id"].take(self.rows).to_pylist()

    def bad_reasons(self) -> list[tuple[int, str]]:
        """(sample position, reason) of the samples whose media could not be read when the store was built."""
        where = np.flatnonzero(self.bad)
        if not len(where):
            return []
        errors = self._dataset.data.table.column("error").take(self.rows[where]).to_pylist()
        return list(zip(where.tolist(), errors))

    def first_with_files(self, key: str) -> str | None:
        """Id of the first record listing `image` or `image3d` files, or None: of every record read (dropped ones
        too, as the in-memory datasets check them), or of the samples of a subset."""
        counts = self._arrays["image_files" if key == "image" else "volume_files"]
        # One bool per record, no index array: temporaries of 8 bytes a record stay resident after they are freed.
        has = (counts[self.rows] if self.is_subset else counts) > 0
        if not has.any():
            return None
        first = int(np.argmax(has))
        return self._cols["id"][int(self.rows[first]) if self.is_subset else first].as_py()

    def check_encoder(self, encoder) -> None:
        """Raise ValueError when this store was not encoded with `encoder`'s settings (a dataset built on a store
        must expand and cut its samples as they were encoded)."""
        want = json.loads(json.dumps(encoder.fingerprint(), sort_keys=True, default=str))
        if self.meta["kind"] != encoder.kind or self.meta["encoder"] != want:
            diff = sorted(k for k in set(want) | set(self.meta["encoder"])
                          if want.get(k) != self.meta["encoder"].get(k))
            raise ValueError(f"record store {self.path} was encoded for other settings than this dataset's "
                             f"({', '.join(diff) or 'kind'} differ); open it with the dataset's own encoder")

    @property
    def num_dropped(self) -> int:
        return int(self.meta["num_dropped"])


def open_store(files: Sequence[str], encoder, *, cache_dir: str | None = None, num_proc: int | None = None,
               decode: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> SampleStore:
    """The store of `files` encoded by `encoder`: opened from `cache_dir` when its fingerprint is there, else built
    there first (by one process; others wait on the lock). What the build found is reported as the in-memory
    datasets report it: encoding errors raised, dropped records warned about.

    Args:
        files: annotation files, in order.
        encoder: the kind's encoder (module doc).
        cache_dir: parent directory of the stores; None: `default_cache_dir()`.
        num_proc: encoding processes; None: every core, at most one per 500 records.
        decode: the kind's `StoredSample` attributes from its extra columns (picklable), or None.

    Raises:
        AnnotationError: a file is missing or holds bad records (listed).
        TemplateError: records that cannot be encoded exactly (every worker's, naming file, record id and reason).
    """
    path, built = build_if_missing(list(files), encoder, cache_dir=cache_dir or default_cache_dir(),
                                   num_proc=num_proc)
    store = SampleStore(path, decode)
    store.built = built
    meta = store.meta
    if built:
        logger.info("record store: built %d samples of %d records in %.1f s (%d worker(s)) at %s", len(store),
                    meta["num_records"], meta["build_seconds"], meta["num_proc"], path)
    else:
        logger.info("record store: cache hit, %d samples of %d records at %s", len(store), meta["num_records"],
                    path)
    log = EncodingLog()
    log.errors = [TemplateError(e) for e in meta["errors"]]
    if meta["num_failed"] > len(log.errors):
        log.errors += [TemplateError("(not kept)")] * (meta["num_failed"] - len(log.errors))
    log.num_dropped = meta["num_dropped"]
    log._dropped_ids = list(meta["dropped_ids"])
    log.finish(meta["num_records"], meta["max_length"], logger)
    return store
