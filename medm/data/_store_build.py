"""Building a record store (medm.data.store): fingerprint, lock, records to Arrow, encoding by `num_proc` workers,
atomic rename into the cache."""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from medm.data.annotations import AnnotationError, Record, RecordError, bad_records_error, iter_file
from medm.data.streaming import is_jsonl_utf8, jsonl_lines, parse_line
from medm.data.templates import TemplateError

logger = logging.getLogger("medm.data.store")

STORE_VERSION = 3
# Per-row status in the `status` column.
OK, FAILED, DROPPED, BAD_MEDIA = 0, 1, 2, 3
META = "meta.json"
RECORDS = "records.arrow"  # id, source, record (JSON), image, image3d: one row per record, as read
# Per-sample arrays beside the table, opened memory-mapped (`.npy`): rows (table row of each sample), length (a
# known-bad sample: the longest), n_images, n_volumes, bad; and per record: image_files, volume_files.
ARRAYS = ("rows", "length", "n_images", "n_volumes", "bad", "image_files", "volume_files")

_CHUNK = 10_000  # records per Arrow batch while reading the annotation files
_MIN_PER_PROC = 500  # with num_proc unset, a worker per this many records at least (processes cost ~1 s to start)
_MAX_ERRORS = 1000  # encoding errors kept in meta.json (the count is always exact)


def record_to_json(record: Record) -> str:
    # The fields as they are (json.dumps copies nothing): the JSON of dataclasses.asdict at a third of its cost.
    return json.dumps({f.name: getattr(record, f.name) for f in dataclasses.fields(record)}, ensure_ascii=False)


def record_from_json(text: str) -> Record:
    return Record(**json.loads(text))


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def fingerprint(files: list[str], encoder) -> tuple[str, dict[str, Any]]:
    """(hex digest, what it hashes) for the files and the encoder's settings."""
    stats = []
    for path in files:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise AnnotationError(f"annotation file not found: {path}") from None
        stats.append([os.path.realpath(path), st.st_size, st.st_mtime_ns])
    what = {"version": STORE_VERSION, "kind": encoder.kind, "files": stats, "encoder": encoder.fingerprint()}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest(), what


def _chunks(files: list[str]) -> Iterator[tuple[int, int | None, list]]:
    """(source file, number of the chunk's first line, up to `_CHUNK` raw lines) of UTF-8 JSONL files, read line
    by line; a JSON list (or UTF-16 / UTF-32 text) as (source, None, its records) read whole, as the in-memory
    path reads it.

    Raises:
        AnnotationError: a file that is missing or (read whole) not a JSON list / JSONL.
    """
    for source, path in enumerate(files):
        if not os.path.isfile(path):
            raise AnnotationError(f"annotation file not found: {path}")
        if not is_jsonl_utf8(path):
            yield source, None, [rec for _, rec in iter_file(path, for_training=True)]
            continue
        lines: list[bytes] = []
        start = 0
        for i, line in enumerate(jsonl_lines(path)):
            lines.append(line)
            if len(lines) == _CHUNK:
                yield source, start, lines
                lines, start = [], i + 1
        if lines:
            yield source, start, lines


def _row(rec: Record | RecordError) -> tuple:
    """The records table's row `(id, record JSON, image, image3d)`, or `(None, id, kind, message)` for a bad
    record."""
    if isinstance(rec, RecordError):
        return None, rec.record_id, rec.kind, str(rec)
    return rec.id, record_to_json(rec), rec.image, rec.image3d


def _records_schema():
    import pyarrow as pa  # defers pyarrow

    return pa.schema([("id", pa.string()), ("source", pa.int32()), ("record", pa.string()),
                      ("image", pa.list_(pa.string())), ("image3d", pa.list_(pa.string()))])


class _Columns:
    """Rows of the records table gathered into Arrow record batches; bad records kept apart as `RecordError`s."""

    def __init__(self):
        self.schema = _records_schema()
        self.cols: dict[str, list] = {name: [] for name in self.schema.names}
        self.errors: list[RecordError] = []

    def add(self, source: int, row: tuple) -> None:
        rid, text, image, image3d = row
        if rid is None:  # a bad record: (None, id, kind, message)
            self.errors.append(_record_error(text, image, image3d))
            return
        c = self.cols
        c["id"].append(rid)
        c["source"].append(source)
        c["record"].append(text)
        c["image"].append(image)
        c["image3d"].append(image3d)

    def __len__(self) -> int:
        return len(self.cols["id"])

    def take(self):
        """The gathered rows as one record batch (None when there are none); starts over."""
        import pyarrow as pa  # defers pyarrow

        if not self.cols["id"]:
            return None
        batch = pa.record_batch([pa.array(self.cols[k], type=self.schema.field(k).type) for k in self.schema.names],
                                schema=self.schema)
        for v in self.cols.values():
            v.clear()
        return batch


def _record_error(record_id: str, kind: str, message: str) -> RecordError:
    e = RecordError(record_id, kind, "")
    e.args = (message,)  # the message as the parser wrote it
    return e


def _parse_chunk(path: str, source: int, start: int, lines: list[bytes]) -> tuple[bytes | None, list[tuple]]:
    """A worker's part: one chunk of JSONL lines (`start`: the number of the first) as a serialized record batch
    of the records table (cheap to send back, nothing to convert in the main process), and its bad records as
    `(id, kind, message)` (exceptions with required arguments do not pickle)."""
    cols = _Columns()
    for j, line in enumerate(lines):
        cols.add(source, _row(parse_line(path, start + j, line)))
    batch = cols.take()
    bad = [(e.record_id, e.kind, str(e)) for e in cols.errors]
    return (None if batch is None else batch.serialize().to_pybytes()), bad


def _parsed(files: list[str], num_proc: int) -> Iterator[tuple[int, tuple] | tuple[bytes | None, list[tuple]]]:
    """Every record of `files` in order: `(source, _row)` parsed here, or, with `num_proc` > 1 and more than one
    chunk, `_parse_chunk`'s (serialized batch, bad records) for each chunk of `_CHUNK` JSONL lines parsed by a
    worker process (at most 2 chunks a process ahead)."""
    chunks = _chunks(files)
    ahead = list(itertools.islice(chunks, 2))
    if num_proc <= 1 or len(ahead) < 2:  # one chunk: not worth starting processes
        for source, start, items in itertools.chain(ahead, chunks):
            for j, item in enumerate(items):
                yield source, _row(item if start is None else parse_line(files[source], start + j, item))
        return
    with multiprocessing.get_context().Pool(num_proc) as pool:
        pending: collections.deque = collections.deque()
        for source, start, items in itertools.chain(ahead, chunks):
            # A file read whole is parsed already (and its errors would not pickle): its rows are made here.
            pending.append([(source, _row(rec)) for rec in items] if start is None
                           else pool.apply_async(_parse_chunk, (files[source], source, start, items)))
            while len(pending) >= 2 * num_proc:
                done = pending.popleft()
                yield from done if isinstance(done, list) else [done.get()]
        while pending:
            done = pending.popleft()
            yield from done if isinstance(done, list) else [done.get()]


def _write_records(files: list[str], out: str, num_proc: int = 1) -> int:
    """Every record of `files` (normalised, in order) into one Arrow stream file, `_CHUNK` at a time; lines are
    parsed and normalised by `num_proc` processes.

    Raises:
        AnnotationError: bad records, listed as `load_records` lists them.
    """
    import pyarrow as pa  # defers pyarrow

    cols = _Columns()
    n = 0
    with pa.OSFile(out, "wb") as sink, pa.ipc.new_stream(sink, cols.schema) as writer:

        def write(batch):
            nonlocal n
            if batch is not None and not cols.errors:  # after a bad record the build fails: write no more
                writer.write_batch(batch)
                n += batch.num_rows

        for first, second in _parsed(files, num_proc):
            if isinstance(first, int):
                cols.add(first, second)
                if len(cols) >= _CHUNK:
                    write(cols.take())
                continue
            write(cols.take())  # rows gathered here come first
            cols.errors += [_record_error(*bad) for bad in second]
            write(None if first is None else pa.ipc.read_record_batch(pa.py_buffer(first), cols.schema))
        write(cols.take())
    if cols.errors:
        raise bad_records_error(cols.errors, files)
    return n


class _EncodeBatch:
    """`Dataset.map` function: a batch of records (JSON) and their source files -> status, error and the encoder's
    columns, one row per record."""

    def __init__(self, encoder, files: list[str]):
        self.encoder, self.files = encoder, files

    def __call__(self, records: list[str], sources: list[int]) -> dict[str, list]:
        enc = self.encoder
        names = ["status", "error", "ids", "labels", "length", "n_images", "n_volumes", *enc.features()]
        out: dict[str, list] = {k: [] for k in names}
        empty = {"ids": [], "labels": [], "length": 0, "n_images": 0, "n_volumes": 0, **enc.empty_extra()}
        for text, source in zip(records, sources):
            rec = record_from_json(text)
            status, error, values = OK, None, None
            try:
                values = enc.encode(rec)
                if values is None:
                    status = DROPPED
            except TemplateError as e:
                status, error = FAILED, f"{self.files[source]}: {e}"
            except enc.media_errors as e:
                # Kept as a sample known to be bad, so it is counted and replaced like one found while training.
                status, error = BAD_MEDIA, str(e)
                values = {**empty, "n_images": len(rec.image)}
            values = values or empty
            out["status"].append(status)
            out["error"].append(error)
            for k in names[2:]:
                out[k].append(values[k])
        return out


def _features(encoder):
    from datasets import Features, List, Value  # defers datasets

    feats = {}
    feats.update(status=Value("int8"), error=Value("string"), ids=List(Value("int32")), labels=List(Value("int32")),
                 length=Value("int32"), n_images=Value("int32"), n_volumes=Value("int32"), **encoder.features())
    return Features(feats)


def _write_arrays(where: str, records, table, status: np.ndarray) -> None:
    """The `ARRAYS` of a built table: what a run reads for every sample (lengths, modalities) lies in a few small
    files instead of one small slice of each of the table's batches (reading those would map ~64 KB around every
    batch, the kernel's fault-around, into the process)."""
    import pyarrow.compute as pc  # defers pyarrow

    rows = np.flatnonzero((status == OK) | (status == BAD_MEDIA)).astype(np.int64)
    bad = status[rows] == BAD_MEDIA
    length = table.column("length").to_numpy()[rows].astype(np.int32)
    if bad.any():
        # A bad sample's length is unknown; the longest lets any good sample of its modality stand in for it.
        length[bad] = length[~bad].max(initial=0)
    arrays = {"rows": rows, "length": length, "bad": bad,
              "n_images": table.column("n_images").to_numpy()[rows].astype(np.int32),
              "n_volumes": table.column("n_volumes").to_numpy()[rows].astype(np.int32)}
    for name, column in (("image_files", "image"), ("volume_files", "image3d")):
        arrays[name] = pc.list_value_length(records.column(column)).to_numpy(zero_copy_only=False).astype(np.int32)
    for name in ARRAYS:
        np.save(os.path.join(where, f"{name}.npy"), arrays[name])


def _build(files: list[str], encoder, where: str, fp: str, what: dict, num_proc: int | None) -> None:
    """Build the store of `files` into the directory `where` (which must not exist)."""
    from datasets import Dataset  # defers datasets
    from datasets.utils import logging as datasets_logging  # defers datasets

    start = time.perf_counter()
    os.makedirs(where)
    raw = os.path.join(where, RECORDS)
    n = _write_records(files, raw, num_proc or cpu_count())
    if num_proc is None:
        num_proc = min(cpu_count(), max(1, n // _MIN_PER_PROC))
    num_proc = max(1, min(num_proc, n))
    records = Dataset.from_file(raw)
    bars = datasets_logging.is_progress_bar_enabled()
    if n < 10_000:
        datasets_logging.disable_progress_bar()  # a bar for a few records is noise
    features = _features(encoder)
    try:
        if n == 0:  # map leaves an empty table as it is, without the new columns
            import pyarrow as pa  # defers pyarrow

            with pa.OSFile(os.path.join(where, "samples.arrow"), "wb") as sink, \
                    pa.ipc.new_stream(sink, features.arrow_schema):
                pass
            encoded = Dataset.from_file(os.path.join(where, "samples.arrow"))
        else:
            # new_fingerprint: ours already covers the tokenizer; datasets would otherwise hash the encoder itself.
            # Only the record JSON and source reach Python, and only the new columns are written: the records table
            # stays as it is, beside the samples (the same rows in the same order).
            encoded = records.map(_EncodeBatch(encoder, files), batched=True, batch_size=1000,
                                  input_columns=["record", "source"], remove_columns=records.column_names,
                                  num_proc=num_proc if num_proc > 1 else None, features=features,
                                  cache_file_name=os.path.join(where, "samples.arrow"), new_fingerprint=fp[:40],
                                  writer_batch_size=10_000,  # fewer, larger batches: less to map when opened
                                  desc=f"tokenizing {n} records")
    finally:
        if bars and n < 10_000:
            datasets_logging.enable_progress_bar()
    shards = [os.path.basename(c["filename"]) for c in encoded.cache_files]
    table = encoded.data.table
    rec_table = records.data.table
    status = table.column("status").to_numpy()
    _write_arrays(where, rec_table, table, status)
    failed = np.flatnonzero(status == FAILED)
    dropped = np.flatnonzero(status == DROPPED)
    meta = {
        **what, "fingerprint": fp, "shards": shards, "extra_columns": list(encoder.features()),
        "num_records": n, "num_samples": int(((status == OK) | (status == BAD_MEDIA)).sum()),
        "num_failed": len(failed), "num_dropped": len(dropped), "num_bad_media": int((status == BAD_MEDIA).sum()),
        "errors": table.column("error").take(failed[:_MAX_ERRORS]).to_pylist(),
        "dropped_ids": rec_table.column("id").take(dropped[:5]).to_pylist(),
        "max_length": getattr(encoder, "max_length", None), "num_proc": num_proc,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    del encoded, records, table, rec_table
    with open(os.path.join(where, META), "w") as f:
        json.dump(meta, f, indent=1)


def build_if_missing(files: list[str], encoder, *, cache_dir: str, num_proc: int | None) -> tuple[str, bool]:
    """(directory of the store of `files` and `encoder`, whether this process built it).

    Raises:
        AnnotationError: a file is missing or holds bad records.
    """
    fp, what = fingerprint(files, encoder)
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    os.makedirs(cache_dir, exist_ok=True)
    final = os.path.join(cache_dir, f"{encoder.kind}-{fp[:24]}")
    if os.path.isfile(os.path.join(final, META)):
        return final, False
    lock = FileLock(final + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("record store: waiting for another process building %s", final)
        lock.acquire()
    try:
        if os.path.isfile(os.path.join(final, META)):  # built by another process while we waited
            return final, False
        # Holding the lock, any temporary directory of this store is a killed build's.
        for stale in glob.glob(glob.escape(final) + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = f"{final}.tmp-{socket.gethostname()}-{os.getpid()}"
        logger.info("record store: cache miss, building %s from %s", final, ", ".join(files))
        try:
            _build(files, encoder, tmp, fp, what, num_proc)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)  # a directory left without meta.json by a crash
        os.rename(tmp, final)
        return final, True
    finally:
        lock.release()
