"""MedTrinity-25M (Xie et al. 2024) from local parquet shards or a saved HF `datasets` folder to medm records.

`medm data build medtrinity --src data/MedTrinity-25M/25M_demo --out data/medtrinity [--limit 10000]`

Source layouts (`--layout`):

- `parquet` (default): a `.parquet` file or a folder searched recursively for `*.parquet` (the hub repository's
  shards), read in sorted path order.
- `hf-saved`: a folder written by `datasets.Dataset.save_to_disk` (`state.json` + `data-*-of-*.arrow`, Arrow IPC
  stream files), or by `DatasetDict.save_to_disk` (`dataset_dict.json` + one such folder per split; `--split`
  picks one). Read with pyarrow directly: the `datasets` package is not needed.

Columns (names configurable): `image` (HF Image feature: a struct of `bytes` and `path`, or plain bytes, or a path
string relative to `--src`), `id`, `caption` (the multigranular description). Rows are streamed in record batches
(`pyarrow.parquet.ParquetFile.iter_batches`, `pyarrow.ipc.open_stream`) and written line by line to JSONL, so memory
stays flat whatever the size. Image bytes are written unchanged to `images/{id}.{png|jpg|...}`.

Outputs (`--tasks`): `captions.jsonl`, pretraining records (one of a few "describe the image" prompts, picked per
id, -> the caption), and `describe.jsonl`, fine-tuning records ("Please describe this image and give your diagnostic
conclusion." -> the caption). Rows with an empty caption or no image are skipped and counted in the README (the
first ids are listed).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from typing import Any

from PIL import Image

from medm.data.annotations import IMAGE_TOKEN
from medm.data.builders._common import JsonlWriter, SourceError, as_list, markdown_table, write_readme
from medm.registry import BUILDER

LAYOUTS = ("parquet", "hf-saved")
TASKS = ("caption", "describe")
DESCRIBE_PROMPT = "Please describe this image and give your diagnostic conclusion."
CAPTION_PROMPTS = (
    "Describe this medical image.",
    "Give a detailed description of the image.",
    "What does this image show? Describe it.",
    "Summarise the findings visible in this image.",
    "Write a description of the given medical image.",
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _require_pyarrow():
    try:
        import pyarrow  # defers pyarrow  # noqa: F401
    except ImportError:
        raise ImportError("the medtrinity builder reads parquet / Arrow with pyarrow: pip install pyarrow "
                          "(pinned in requirements.txt)") from None


def source_files(src: str, layout: str, split: str | None = None) -> list[str]:
    """The data files of `src` in reading order (raises FileNotFoundError when there are none)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown MedTrinity layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if layout == "parquet":
        files = [src] if os.path.isfile(src) else sorted(glob.glob(os.path.join(src, "**", "*.parquet"),
                                                                   recursive=True))
        if not files:
            raise FileNotFoundError(f"no .parquet file at {src} (layout 'parquet'; a saved HF dataset folder needs "
                                    "--layout hf-saved)")
        return files
    folder = src
    dict_file = os.path.join(src, "dataset_dict.json")
    if os.path.isfile(dict_file):
        with open(dict_file) as f:
            names = json.load(f).get("splits", [])
        chosen = split or "train"
        if chosen not in names:
            raise FileNotFoundError(f"{dict_file}: no split {chosen!r} (splits: {', '.join(names)}); pass --split")
        folder = os.path.join(src, chosen)
    state = os.path.join(folder, "state.json")
    if not os.path.isfile(state):
        raise FileNotFoundError(f"{folder} is not a saved HF dataset: no state.json (or dataset_dict.json)")
    with open(state) as f:
        listed = [d["filename"] for d in json.load(f).get("_data_files", [])]
    files = [os.path.join(folder, name) for name in listed] or sorted(glob.glob(os.path.join(folder, "*.arrow")))
    if not files:
        raise FileNotFoundError(f"{folder}: state.json lists no data file and no *.arrow file is there")
    return files


def iter_rows(files: list[str], layout: str, columns: list[str], batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """Rows `{column: value}` of every file, one record batch in memory at a time."""
    import pyarrow as pa  # defers pyarrow
    import pyarrow.parquet as pq  # defers pyarrow

    for path in files:
        if layout == "parquet":
            pf = pq.ParquetFile(path)
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise SourceError(f"{path}: no column(s) {missing}; columns: {', '.join(pf.schema_arrow.names)}")
            batches = pf.iter_batches(batch_size=batch_size, columns=columns)
            yield from (row for batch in batches for row in batch.to_pylist())
            continue
        with pa.memory_map(path) as source:
            reader = pa.ipc.open_stream(source)
            missing = [c for c in columns if c not in reader.schema.names]
            if missing:
                raise SourceError(f"{path}: no column(s) {missing}; columns: {', '.join(reader.schema.names)}")
            for batch in reader:
                yield from batch.select(columns).to_pylist()


def _image_bytes(value: Any) -> tuple[bytes | None, str | None]:
    """(bytes, path) of an image cell: HF Image struct, raw bytes or a path string."""
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, str):
        return None, value
    return None, None


def _extension(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            fmt = im.format
    except Exception:  # noqa: BLE001 - any undecodable header means "not an image"
        return None
    return {"JPEG": ".jpg", "TIFF": ".tif"}.get(fmt, "." + fmt.lower()) if fmt else None


def _file_name(rid: str) -> str:
    """A file-system-safe name for an id; a hash suffix keeps ids that differ only in unsafe characters apart."""
    safe = _UNSAFE.sub("_", rid).strip("._") or "row"
    return safe if safe == rid else f"{safe}_{zlib.crc32(rid.encode()):08x}"


@BUILDER.register("medtrinity")
def build_medtrinity(out: str, src: str, layout: str = "parquet", split: str | None = None,
                     tasks: Any = "caption,describe", limit: int | None = None, image_column: str = "image",
                     id_column: str = "id", caption_column: str = "caption", batch_size: int = 256) -> dict[str, str]:
    """Stream MedTrinity-25M rows into `out/captions.jsonl` and / or `out/describe.jsonl` plus `out/images/`.

    Args:
        out: output directory (created).
        src: a parquet file or folder (`layout=parquet`), or a saved HF dataset folder (`layout=hf-saved`).
        layout: "parquet" or "hf-saved".
        split: for a saved DatasetDict, the split folder to read (default "train").
        tasks: "caption" (pretraining records) and / or "describe" (describe-and-diagnose fine-tuning records).
        limit: stop after this many converted rows.
        image_column / id_column / caption_column: column names.
        batch_size: rows per record batch read from parquet.

    Returns:
        Written paths by role ("caption", "describe", "readme") and "image_dir" (= `out`).
    """
    _require_pyarrow()
    wanted = [str(t) for t in as_list(tasks, "tasks")]
    unknown = [t for t in wanted if t not in TASKS]
    if unknown or not wanted:
        raise ValueError(f"--tasks must name some of {', '.join(TASKS)}, got {tasks!r}")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"--limit must be positive, got {limit!r}")
    files = source_files(src, layout, split)
    base = src if os.path.isdir(src) else os.path.dirname(src)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    names = {"caption": "captions.jsonl", "describe": "describe.jsonl"}
    writers = {t: JsonlWriter(os.path.join(out, names[t])) for t in wanted}
    converted, skipped, seen = 0, [], set()
    try:
        for i, row in enumerate(iter_rows(files, layout, [image_column, id_column, caption_column], batch_size)):
            if limit is not None and converted >= int(limit):
                break
            rid = str(row[id_column]) if row[id_column] is not None else f"row{i}"
            caption = row[caption_column].strip() if isinstance(row[caption_column], str) else ""
            data, path = _image_bytes(row[image_column])
            ext = _extension(data) if data else None
            if not caption or (data is None and not path) or (data is not None and ext is None):
                skipped.append(rid)
                continue
            if rid in seen:
                raise SourceError(f"{src}: id {rid!r} appears twice (row {i}); ids must be unique")
            seen.add(rid)
            if data is not None:
                image = os.path.join("images", _file_name(rid) + ext)
                with open(os.path.join(out, image), "wb") as f:
                    f.write(data)
            else:
                image = os.path.abspath(os.path.join(base, path))
            common = {"image": [image], "answer": caption, "data_source": "medtrinity"}
            if "caption" in writers:
                prompt = CAPTION_PROMPTS[zlib.crc32(rid.encode()) % len(CAPTION_PROMPTS)]
                writers["caption"].write({"id": f"medtrinity-cap-{rid}", **common, "task": "caption", "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"}, {"from": "gpt", "value": caption}]})
            if "describe" in writers:
                writers["describe"].write({"id": f"medtrinity-dd-{rid}", **common, "task": "describe_diagnose",
                                           "question": DESCRIBE_PROMPT, "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\n{DESCRIBE_PROMPT}"},
                    {"from": "gpt", "value": caption}]})
            converted += 1
    finally:
        for w in writers.values():
            w.close()
    paths = {t: w.path for t, w in writers.items()}
    lines = ["# MedTrinity-25M (medm records)", "",
             f"Built by `medm data build medtrinity --src {src} --layout {layout} --out {out}` from "
             f"{len(files)} file(s)" + (f", stopping at --limit {limit}" if limit is not None else "") + ".", "",
             "Image paths are relative to this folder (`--image-dir " + os.path.abspath(out) + "`), except images "
             "the source gave only as paths, which are absolute.", ""]
    lines += markdown_table(("file", "records"), [(names[t], w.count) for t, w in writers.items()])
    lines += ["", f"{len(skipped)} row(s) skipped for an empty caption or a missing / undecodable image"
              + (": " + ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else "") if skipped else ".")]
    paths["readme"] = write_readme(os.path.join(out, "README.md"), lines)
    paths["image_dir"] = os.path.abspath(out)
    return paths
