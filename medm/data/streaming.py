"""`data.streaming: true`: records read, tokenized and loaded on the fly, for data larger than memory or the disk cache.

`StreamingDataset` is a torch `IterableDataset` over the annotation files. It reads JSONL files line by line (a
JSON list file, or a JSONL file in UTF-16 / UTF-32, is read whole first: use UTF-8 JSONL for large data), and
encodes each record with the map-style dataset's own code (`encode_sample` and `sample_item` of
`ConversationDataset` or `QwenVLDataset`, built with no records), so ids, labels and pixel values are those of
the map-style dataset for the same record.

Sharding and order. Records are numbered in reading order across the files (a JSONL file's non-empty lines, a JSON
list's items, bad ones included). With R ranks and W DataLoader workers per rank (W = 1 without workers), record k
belongs to rank r and worker w when `k % (R * W) == r * W + w`: each record is read by exactly one (rank, worker),
and a worker parses only its own lines. A worker yields its records in file order (or through a shuffle buffer of
`data.streaming_shuffle_buffer` encoded samples, seeded by `data.streaming_seed`, the epoch, the pass and the
shard); the DataLoader takes whole batches from its workers in turn. When a worker reaches the end of its share it
starts another pass (the next epoch of its shard), so the stream never ends and every rank runs `train.max_steps`
steps without waiting for another.

What streaming gives up (see docs/data.md): global length grouping (batches are not sorted by length or modality),
an exact epoch size (`train.max_steps` sets the run's length), the upfront listing of every record that cannot be
encoded (a record that fails is skipped and logged with its file, id and reason when its worker reaches it), the
`data.val_size` split (give `data.val_path`), packing and data mixtures.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import random
from collections.abc import Iterator, Sequence
from multiprocessing import context as mp_context
from typing import Any

import torch

from medm.config import ConfigError
from medm.data._bad_samples import BadSamples, TooManyBadSamples, _LocalCount
from medm.data.annotations import AnnotationError, Record, RecordError, iter_file, parse_record
from medm.data.templates import TemplateError

logger = logging.getLogger(__name__)

# A fractional data.max_bad_samples applies to the samples read so far, but to at least this many: the first bad
# file of a run must not be 100% of what was read.
MIN_FRACTION_BASE = 1000


# ---- reading one shard of the records -----------------------------------------------------------------------------
def _is_json_list(path: str) -> bool:
    with open(path, "rb") as f:
        for line in f:
            stripped = line.lstrip(b"\xef\xbb\xbf").strip()
            if stripped:
                return stripped.startswith(b"[")
    return False


def _utf8(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return json.detect_encoding(head) in ("utf-8", "utf-8-sig")


def jsonl_lines(path: str) -> Iterator[bytes]:
    """The non-empty lines of a UTF-8 JSONL file (the first without its byte order mark), read line by line."""
    with open(path, "rb") as f:
        first = True
        for line in f:
            if first:
                line, first = line.lstrip(b"\xef\xbb\xbf"), False
            if line.strip():
                yield line


def parse_line(path: str, i: int, line: bytes) -> Record | RecordError:
    """Record (or the error) of the `i`-th (0-based) non-empty line of the UTF-8 JSONL file `path`."""
    rid = f"{os.path.basename(path)}:{i}"
    try:
        raw = json.loads(line.decode("utf-8").strip())
    except UnicodeDecodeError as e:
        return RecordError(rid, "invalid_json", f"{path} line {i + 1}: not UTF-8 text ({e.reason})")
    except (json.JSONDecodeError, RecursionError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        return RecordError(rid, "invalid_json", f"{path} line {i + 1}: invalid JSON (JSONL line): {why}")
    try:
        return parse_record(raw, rid, for_training=True)
    except RecordError as e:
        return e


def _jsonl_items(path: str, start: int, shard: int, num_shards: int) -> Iterator[tuple[int, Record | RecordError]]:
    """(global number, record or error) of this shard's lines of a UTF-8 JSONL file, read line by line; other
    lines are only counted. Yields `(next global number, None)` at the end."""
    i = 0
    for i, line in enumerate(jsonl_lines(path), start=1):
        k = start + i - 1
        if k % num_shards == shard:
            yield k, parse_line(path, i - 1, line)
    yield start + i, None


def is_jsonl_utf8(path: str) -> bool:
    """Whether `path` is read line by line (UTF-8 JSONL) rather than whole (a JSON list, UTF-16 / UTF-32 text)."""
    return _utf8(path) and not _is_json_list(path)


def read_shard(paths: Sequence[str], shard: int = 0, num_shards: int = 1
               ) -> Iterator[tuple[int, str, Record | RecordError]]:
    """`(global number, file, Record or RecordError)` of every record of `paths` whose number k satisfies
    `k % num_shards == shard`, in file order (see the module doc).

    Raises:
        AnnotationError: a file that is missing, or (read whole) not a JSON list / JSONL.
    """
    start = 0
    for path in paths:
        if not os.path.isfile(path):
            raise AnnotationError(f"annotation file not found: {path}")
        if is_jsonl_utf8(path):
            for k, rec in _jsonl_items(path, start, shard, num_shards):
                if rec is None:
                    start = k
                else:
                    yield k, path, rec
            continue
        # A JSON list (or UTF-16 / UTF-32 text) cannot be split into lines: read whole, as the map-style path does.
        n = 0
        for n, (_, rec) in enumerate(iter_file(path, for_training=True), start=1):
            if (start + n - 1) % num_shards == shard:
                yield start + n - 1, path, rec
        start += n


# ---- counts shared by a rank's DataLoader workers --------------------------------------------------------------
class StreamCounts(BadSamples):
    """`BadSamples` for a stream: bad samples counted by record number (a worker skips its known bad records
    without reading them again), plus the samples read, dropped and failed, shared by a rank's workers.

    A count limit (`max_bad_samples` >= 1) works as in the map-style datasets. A fraction (< 1) applies to the
    samples this rank has read so far, at least `MIN_FRACTION_BASE` of them (the total is unknown to a stream).
    """

    def __init__(self, max_bad_samples: float | None = 100):
        super().__init__(1, max_bad_samples)
        self._read = multiprocessing.Value("q", 0)
        self._dropped = multiprocessing.Value("q", 0)
        self._failed = multiprocessing.Value("q", 0)
        self._known: set[int] = set()  # this worker's bad record numbers (a record belongs to one worker)

    def __getstate__(self):
        state = super().__getstate__()
        if mp_context.get_spawning_popen() is None:
            for key in ("_read", "_dropped", "_failed"):
                state[key] = _LocalCount(getattr(self, key).value)
        return state

    @staticmethod
    def _bump(value) -> None:
        with value.get_lock():
            value.value += 1

    @property
    def read(self) -> int:
        """Samples whose media this rank tried to load (first pass)."""
        return int(self._read.value)

    @property
    def dropped(self) -> int:
        """Records without a supervised token within max_length (first pass)."""
        return int(self._dropped.value)

    @property
    def failed(self) -> int:
        """Records that cannot be parsed or encoded exactly (first pass)."""
        return int(self._failed.value)

    def is_bad(self, key: int) -> bool:
        return key in self._known

    def current_limit(self) -> int | None:
        m = self.max_bad_samples
        if m is None or m >= 1 or m == 0:
            return None if m is None else int(m)
        return math.floor(m * max(self.read, MIN_FRACTION_BASE))

    def add(self, key: int, record_id: str, error: Exception) -> bool:
        """Mark record `key` as bad; True when it was not known yet.

        Raises:
            TooManyBadSamples: the count is now above the limit.
        """
        new = key not in self._known
        if new:
            self._known.add(key)
            self._bump(self._count)
        self.recent.append((record_id, str(error)))
        limit, count = self.current_limit(), self.count
        if limit is not None and count > limit:
            last = "\n  ".join(f"record {rid!r}: {msg}" for rid, msg in self.recent)
            raise TooManyBadSamples(
                f"{count} samples failed to load (of {self.read} this rank has read), more than data.max_bad_samples="
                f"{self.max_bad_samples} allows; the last ones:\n  {last}\nList every bad record with `medm data "
                "validate FILE --image-dir DIR` (--write-clean OUT drops them), or raise data.max_bad_samples.")
        return new


# ---- the dataset ------------------------------------------------------------------------------------------------
class StreamingDataset(torch.utils.data.IterableDataset):
    """Records of `paths` encoded and loaded on the fly, sharded by rank and DataLoader worker (see the module doc).

    Args:
        paths: annotation files (JSONL read line by line; JSON lists read whole).
        encoder: the map-style dataset of the model's kind built with no records (`ConversationDataset` or
            `QwenVLDataset`): its `encode_sample`, `sample_item`, `check_records` and `load_errors` are used.
        max_bad_samples: see `StreamCounts`.
        shuffle_buffer: encoded samples held and drawn from at random (0: file order). Samples are held before
            their media load, so a large buffer costs token ids only.
        seed: seed of the shuffle buffer (with the epoch, the pass and the shard).
        rank, world_size: this process's place; None: torch.distributed's when initialised, else the RANK /
            WORLD_SIZE environment variables, else 0 of 1.
        passes: passes over the shard before the stream ends; None: endless (training with `train.max_steps`).

    Items: those of the encoder (`input_ids`, `labels`, media tensors or None, `length`).
    """

    def __init__(self, paths: str | Sequence[str], encoder: Any, *, max_bad_samples: float | None = 100,
                 shuffle_buffer: int = 0, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 passes: int | None = None):
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        for path in self.paths:
            if not isinstance(path, str):
                raise ConfigError(f"data.path: {path!r}; with data.streaming every entry must be a file path (no "
                                  "mixture entries)")
            if not os.path.isfile(path):
                raise AnnotationError(f"annotation file not found: {path}")
        if shuffle_buffer < 0:
            raise ConfigError(f"data.streaming_shuffle_buffer: {shuffle_buffer} must be >= 0")
        self.encoder = encoder
        self.load_errors = tuple(encoder.load_errors)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.passes = passes
        self.epoch = 0
        self.bad_samples = StreamCounts(max_bad_samples)
        if hasattr(encoder, "collator"):
            self.collator = encoder.collator  # the qwen-vl kind's own inputs (image grids, M-RoPE token types)

    @property
    def num_dropped(self) -> int:
        return self.bad_samples.dropped

    def set_epoch(self, epoch: int) -> None:
        """The Trainer's epoch: it reseeds the shuffle buffer (the passes a worker makes count on from it)."""
        self.epoch = epoch

    def shard(self) -> tuple[int, int, int, int]:
        """(shard, number of shards, rank, workers) of the calling process (see the module doc)."""
        if self.rank is not None:
            rank, world = self.rank, self.world_size or 1
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers, rank, workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, num_shards, rank, workers = self.shard()
        counts = self.bad_samples
        n = 0
        while self.passes is None or n < self.passes:
            first = n == 0
            rng = random.Random(f"{self.seed}:{self.epoch + n}:{shard}")
            produced = 0
            for key, sample in self._buffered(self._encoded(shard, num_shards, first), rng):
                if counts.is_bad(key):
                    continue
                if first:
                    counts._bump(counts._read)
                item = self._load(key, sample)
                if item is not None:
                    produced += 1
                    yield item
            logger.info("streaming: rank %d worker %d/%d finished pass %d over its share (%d samples yielded; this "
                        "rank so far: %d dropped, %d failed, %d bad)", rank, shard - rank * workers, workers, n + 1,
                        produced, counts.dropped, counts.failed, counts.count)
            if not produced:
                raise RuntimeError(
                    f"streaming: rank {rank}, DataLoader worker {shard - rank * workers} of {workers} has no usable "
                    f"sample in its share of {', '.join(self.paths)} (every {num_shards}th record; this rank so far: "
                    f"{counts.dropped} dropped, {counts.failed} failed, {counts.count} bad). Each rank and worker "
                    "needs at least one: use fewer train.dataloader_num_workers or ranks, or more records")
            n += 1

    def _encoded(self, shard: int, num_shards: int, first: bool) -> Iterator[tuple[int, Any]]:
        """(record number, encoded sample) of the shard; records that fail are logged and counted on the first
        pass (every pass meets them again)."""
        counts = self.bad_samples
        for key, path, rec in read_shard(self.paths, shard, num_shards):
            if isinstance(rec, RecordError):
                if first:
                    counts._bump(counts._failed)
                    logger.warning("streaming: skipping a record of %s: %s", path, rec)
                continue
            if counts.is_bad(key):
                continue
            self.encoder.check_records([rec])  # media the model cannot take: a setup error, not a bad record
            try:
                sample = self.encoder.encode_sample(rec)
            except TemplateError as e:
                if first:
                    counts._bump(counts._failed)
                    logger.warning("streaming: skipping a record of %s that cannot be encoded exactly: %s", path, e)
                continue
            except self.load_errors as e:  # the qwen-vl kind reads image headers while encoding
                self._mark_bad(key, rec.id, e)
                continue
            if sample is None:
                if first:
                    counts._bump(counts._dropped)
                    logger.warning("streaming: dropped record %r of %s: no supervised token within max_length=%d",
                                   rec.id, path, self.encoder.max_length)
                continue
            yield key, sample

    def _buffered(self, samples: Iterator[tuple[int, Any]], rng: random.Random) -> Iterator[tuple[int, Any]]:
        """`samples` through the shuffle buffer (as they come when it is off)."""
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[tuple[int, Any]] = []
        for entry in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(entry)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], entry = entry, buffer[i]
            yield entry
        rng.shuffle(buffer)
        yield from buffer

    def _load(self, key: int, sample: Any) -> dict[str, Any] | None:
        try:
            return self.encoder.sample_item(sample)
        except self.load_errors as e:
            self._mark_bad(key, sample.record.id, e)
        except MemoryError:
            self._mark_bad(key, sample.record.id, MemoryError("out of memory while loading its media"))
        return None

    def _mark_bad(self, key: int, record_id: str, error: Exception) -> None:
        if self.bad_samples.add(key, record_id, error):
            logger.warning("streaming: skipping sample %r: %s (%d bad sample(s) on this rank so far)", record_id,
                           error, self.bad_samples.count)


def own_shards(dataloader):
    """A prepared training DataLoader whose `StreamingDataset` reads this rank's own shard.

    Accelerate wraps an iterable dataset in `IterableDatasetShard`, which reads the whole stream on every rank and
    keeps one batch in `num_processes`; the dataset shards by rank itself, so the wrapper is made a passthrough.
    (The Trainer is given `dispatch_batches=False`: dispatching from rank 0 would read everything on one rank and
    cannot split batches whose ranks hold different media, e.g. images on one and none on the other.)
    """
    dataset = getattr(dataloader, "dataset", None)
    # accelerate.data_loader.IterableDatasetShard (not imported: medm.data stays free of accelerate)
    if hasattr(dataset, "num_processes") and isinstance(getattr(dataset, "dataset", None), StreamingDataset):
        dataset.num_processes, dataset.process_index = 1, 0
    return dataloader


def check_streaming(data, train, where: str) -> None:
    """Settings that streaming cannot honour fail when the config is read, naming the key (data: DataArgs,
    train: medm.train.args.TrainArgs)."""
    if not data.streaming:
        if data.streaming_shuffle_buffer:
            raise ConfigError(f"{where}: data.streaming_shuffle_buffer is set but data.streaming is off")
        return
    why = {
        "train.max_steps": train.max_steps <= 0 and "a stream has no known length: set train.max_steps > 0",
        "data.packing": data.packing and "packing plans rows over the whole dataset; turn it off",
        "data.mixture": (data.mixture is not None or (isinstance(data.path, list) and any(
            isinstance(p, dict) for p in data.path))) and "a mixture samples indexed datasets; give file paths",
        "data.val_size": bool(data.val_size) and "a stream is not split; give the validation records as "
                                                 "data.val_path",
        "train.train_sampling_strategy": train.train_sampling_strategy in ("group_by_length",
                                                                           "group_by_modality_length")
        and f"{train.train_sampling_strategy} sorts by lengths known upfront; use auto (stream order)",
    }
    for key, problem in why.items():
        if problem:
            raise ConfigError(f"{where}: {key} with data.streaming: {problem}")
