"""MedTrinity-25M builder on fixtures in the hub's layouts: parquet shards with the HF Image struct column, and a
`save_to_disk` folder (Arrow IPC stream files + state.json), with and without a DatasetDict."""

import io
import json
import os

import pytest
from PIL import Image

from medm.cli import main
from medm.data.builders._common import SourceError
from medm.data.builders.medtrinity import DESCRIBE_PROMPT, build_medtrinity, iter_rows, source_files

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image() in Arrow


def _png(value, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("L", (8, 8), value).save(buf, format=fmt)
    return buf.getvalue()


def _rows(start, n):
    return [{"image": {"bytes": _png(10 * i, "PNG" if i % 2 else "JPEG"), "path": None}, "id": f"id-{i}",
             "caption": f"The image is a CT scan of the abdomen, case {i}. The liver shows a lesion."}
            for i in range(start, start + n)]


def _table(rows):
    return pa.table({"image": pa.array([r["image"] for r in rows], IMAGE_TYPE),
                     "id": pa.array([r["id"] for r in rows], pa.string()),
                     "caption": pa.array([r["caption"] for r in rows], pa.string())})


def _parquet_shards(root):
    os.makedirs(root / "25M_demo")
    pq.write_table(_table(_rows(0, 3)), root / "25M_demo" / "train-00000-of-00002.parquet", row_group_size=2)
    pq.write_table(_table(_rows(3, 2)), root / "25M_demo" / "train-00001-of-00002.parquet")
    return root


def _saved(folder, rows):
    os.makedirs(folder)
    table = _table(rows)
    with pa.ipc.new_stream(str(folder / "data-00000-of-00001.arrow"), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                   "_fingerprint": "0", "_split": "train"}))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_parquet_shards_stream_to_caption_and_describe_records(tmp_path):
    src = _parquet_shards(tmp_path / "MedTrinity-25M")
    assert [os.path.basename(f) for f in source_files(str(src), "parquet")] == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    out = tmp_path / "out"
    paths = build_medtrinity(str(out), str(src), batch_size=2)
    caps, dd = _jsonl(paths["caption"]), _jsonl(paths["describe"])
    assert [r["id"] for r in caps] == [f"medtrinity-cap-id-{i}" for i in range(5)]
    assert [r["id"] for r in dd] == [f"medtrinity-dd-id-{i}" for i in range(5)]
    r = dd[1]
    assert r["conversations"] == [{"from": "human", "value": "<image>\n" + DESCRIBE_PROMPT},
                                  {"from": "gpt", "value": r["answer"]}]
    assert r["answer"].startswith("The image is a CT scan of the abdomen, case 1.")
    assert r["image"] == ["images/id-1.png"] and caps[0]["image"] == ["images/id-0.jpg"]  # format from the bytes
    assert (out / "images" / "id-1.png").read_bytes() == _png(10, "PNG")  # written unchanged
    assert caps[0]["task"] == "caption" and caps[0]["conversations"][0]["value"].startswith("<image>\n")
    assert "| captions.jsonl | 5 |" in open(paths["readme"]).read()
    for role in ("caption", "describe"):
        assert main(["data", "validate", paths[role], "--image-dir", paths["image_dir"]]) == 0


def test_limit_tasks_and_bad_rows(tmp_path):
    rows = _rows(0, 4)
    rows[1]["caption"] = "  "
    rows[2]["image"] = {"bytes": b"not an image", "path": None}
    os.makedirs(tmp_path / "src")
    pq.write_table(_table(rows), tmp_path / "src" / "shard.parquet")
    paths = build_medtrinity(str(tmp_path / "out"), str(tmp_path / "src" / "shard.parquet"), tasks="describe")
    assert set(paths) == {"describe", "readme", "image_dir"}
    assert [r["id"] for r in _jsonl(paths["describe"])] == ["medtrinity-dd-id-0", "medtrinity-dd-id-3"]
    assert "2 row(s) skipped" in open(paths["readme"]).read() and "id-1, id-2" in open(paths["readme"]).read()
    limited = build_medtrinity(str(tmp_path / "lim"), str(tmp_path / "src"), tasks=["caption"], limit=1)
    assert len(_jsonl(limited["caption"])) == 1


def test_saved_hf_dataset_and_dataset_dict(tmp_path):
    single = _saved(tmp_path / "saved", _rows(0, 3))
    paths = build_medtrinity(str(tmp_path / "o1"), str(single), layout="hf-saved")
    assert [r["id"] for r in _jsonl(paths["describe"])] == [f"medtrinity-dd-id-{i}" for i in range(3)]
    root = tmp_path / "dict"
    _saved(root / "train", _rows(0, 2))
    _saved(root / "test", _rows(10, 1))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    test = build_medtrinity(str(tmp_path / "o2"), str(root), layout="hf-saved", split="test")
    assert [r["id"] for r in _jsonl(test["caption"])] == ["medtrinity-cap-id-10"]
    with pytest.raises(FileNotFoundError, match="no split 'val'"):
        build_medtrinity(str(tmp_path / "o3"), str(root), layout="hf-saved", split="val")
    with pytest.raises(FileNotFoundError, match="no .parquet file.*--layout hf-saved"):
        build_medtrinity(str(tmp_path / "o4"), str(single))


def test_rows_are_read_batch_by_batch(tmp_path):
    src = _parquet_shards(tmp_path / "m")
    files = source_files(str(src), "parquet")
    it = iter_rows(files, "parquet", ["id", "caption"], batch_size=1)
    assert next(it)["id"] == "id-0"  # a generator: nothing beyond the first batch has been converted
    assert [r["id"] for r in it] == ["id-1", "id-2", "id-3", "id-4"]
    with pytest.raises(SourceError, match="no column.*'report'"):
        next(iter_rows(files, "parquet", ["report"]))
