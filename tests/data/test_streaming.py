"""medm.data.streaming (`data.streaming: true`): items equal the map-style dataset's for the same records (medm kind
2D + 3D + text, qwen-vl kind with images), each record is read by exactly one (rank, worker) per pass, bad records
and bad media are skipped, logged and counted, and settings streaming cannot honour fail when the config is read."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medm.config import ConfigError, load_yaml
from medm.data._bad_samples import TooManyBadSamples, bad_sample_count
from medm.data.dataset import DataArgs, build_dataset
from medm.data.streaming import StreamingDataset, own_shards, read_shard
from medm.models import build_model
from medm.models.tiny import tiny_model_config, tiny_vision
from medm.train.args import parse_train_config

REPO = Path(__file__).resolve().parents[2]


def _text(i: int) -> dict:
    return {"id": f"t{i}", "conversations": [{"from": "human", "value": f"What is {i} plus one?"},
                                             {"from": "gpt", "value": f"{i + 1}"}]}


def write_mixed(root: Path, n: int = 12) -> list[str]:
    """`n` records cycling image / text / volume, split over a JSONL file and a JSON list file."""
    (root / "img").mkdir(parents=True)
    (root / "vol").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        if i % 3 == 0:
            Image.fromarray(rng.integers(0, 255, (24 + i, 20, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
            records.append({"id": f"i{i}", "image": [f"img/{i}.png"], "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": f"picture {i}"}]})
        elif i % 3 == 1:
            records.append(_text(i))
        else:
            np.save(root / "vol" / f"{i}.npy", rng.integers(0, 255, (16, 16, 16)).astype(np.uint8))
            records.append({"id": f"v{i}", "image3d": [f"vol/{i}.npy"], "conversations": [
                {"from": "human", "value": "<image3d>\nDescribe."}, {"from": "gpt", "value": f"volume {i}"}]})
    half = n // 2
    jsonl, jlist = root / "a.jsonl", root / "b.json"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records[:half]))
    jlist.write_text(json.dumps(records[half:]))
    return [str(jsonl), str(jlist)]


@pytest.fixture(scope="module")
def model3d():
    cfg = tiny_model_config()
    cfg["vision3d"] = {"name": "vit3d", **tiny_vision("vit3d"), "volume": {"intensity": "uint8"}}
    cfg["connector3d"] = {"name": "spatial_pool", "stride": 2}
    torch.manual_seed(0)
    return build_model(cfg)


def _stream(data: DataArgs, model, tok, **kw) -> StreamingDataset:
    ds = build_dataset(data, model, tok)
    assert isinstance(ds, StreamingDataset)
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def _assert_same_items(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), k
            else:
                assert a[k] == b[k], k


def test_items_equal_the_map_style_dataset_medm_kind(model3d, tmp_path):
    model, tok = model3d
    paths = write_mixed(tmp_path)
    common = {"path": paths, "image_dir": str(tmp_path), "max_length": 256}
    mapped = build_dataset(DataArgs(**common, store="memory"), model, tok)
    stream = _stream(DataArgs(**common, streaming=True), model, tok, passes=1)
    got = list(stream)
    _assert_same_items(got, [mapped[i] for i in range(len(mapped))])
    kinds = [(it["pixel_values"] is not None, it["pixel_values_3d"] is not None) for it in got]
    assert kinds[:3] == [(True, False), (False, False), (False, True)]
    assert stream.num_dropped == 0 and bad_sample_count(stream) == 0


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from medm.data.builders.phantoms import build_phantoms

    root = tmp_path_factory.mktemp("qwen")
    paths = build_phantoms(str(root), n_train=6, n_test=0, seed=0)
    records = json.loads(Path(paths["train"]).read_text())[:6]
    records = [r for pair in zip(records, [_text(i) for i in range(len(records))]) for r in pair]
    path = root / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    torch.manual_seed(0)
    model, processor = build_model(load_yaml(str(REPO / "configs/model/tiny-qwen2.5-vl.yaml")))
    return model, processor, str(path), str(root)


def test_items_equal_the_map_style_dataset_qwenvl_kind(qwen):
    model, processor, path, image_dir = qwen
    common = {"path": path, "image_dir": image_dir, "max_length": 256}
    mapped = build_dataset(DataArgs(**common, store="memory"), model, processor)
    stream = _stream(DataArgs(**common, streaming=True), model, processor, passes=1)
    got = list(stream)
    _assert_same_items(got, [mapped[i] for i in range(len(mapped))])
    assert sum(it["image_grid_thw"] is not None for it in got) == 6
    # The kind's own collator comes with the stream (image grids, M-RoPE token types).
    batch = stream.collator()(got[:2])
    assert batch["image_grid_thw"].shape == (1, 3) and "mm_token_type_ids" in batch


def _text_file(path: Path, n: int) -> str:
    path.write_text("".join(json.dumps(_text(i)) + ("\n\n" if i % 5 == 0 else "\n") for i in range(n)))
    return str(path)


def test_read_shard_numbers_records_across_files(tmp_path):
    a = _text_file(tmp_path / "a.jsonl", 5)
    b = tmp_path / "b.json"
    b.write_text(json.dumps([_text(i) for i in range(5, 9)]))
    everything = [(k, rec.id) for k, _, rec in read_shard([a, str(b)])]
    assert everything == [(k, f"t{k}") for k in range(9)]  # blank lines are not records
    shard1 = [(k, path, rec.id) for k, path, rec in read_shard([a, str(b)], shard=1, num_shards=4)]
    assert shard1 == [(1, a, "t1"), (5, str(b), "t5")]


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_read_each_record_once_per_pass(tiny_model, tmp_path, workers):
    model, tok = tiny_model
    n = 23
    path = _text_file(tmp_path / "t.jsonl", n)
    encoder = build_dataset(DataArgs(path=path, store="memory"), model, tok)  # map-style: ids -> record
    which = {tuple(encoder[i]["input_ids"].tolist()): i for i in range(len(encoder))}
    seen = {}
    for rank in (0, 1):
        ds = StreamingDataset(path, encoder, rank=rank, world_size=2, passes=2)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        seen[rank] = [which[tuple(it["input_ids"].tolist())] for it in loader]
    shards = 2 * max(workers, 1)
    for rank, got in seen.items():
        assert sorted(got) == sorted(2 * [k for k in range(n) if k % shards // max(workers, 1) == rank])
    per_pass = sorted(seen[0][:len(seen[0]) // 2] + seen[1][:len(seen[1]) // 2])
    assert per_pass == list(range(n))


def test_shuffle_buffer_is_seeded_and_epoch_aware(tiny_model, tmp_path):
    model, tok = tiny_model
    path = _text_file(tmp_path / "t.jsonl", 20)
    encoder = build_dataset(DataArgs(path=path, store="memory"), model, tok)

    def order(seed, epoch):
        ds = StreamingDataset(path, encoder, shuffle_buffer=8, seed=seed, passes=1)
        ds.set_epoch(epoch)
        return [it["input_ids"].tolist() for it in ds]

    plain = [encoder[i]["input_ids"].tolist() for i in range(len(encoder))]
    first = order(0, 0)
    assert first == order(0, 0) and first != plain and sorted(first) == sorted(plain)
    assert order(0, 1) != first and order(1, 0) != first


def test_bad_records_and_media_are_skipped_logged_and_counted(tiny_model, tmp_path, caplog):
    model, tok = tiny_model
    Image.new("RGB", (20, 20), (9, 9, 9)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    image = {"from": "human", "value": "<image>\nWhat is it?"}
    lines = [json.dumps(_text(0)), '{"id": "torn", "conversa', json.dumps({"id": "noanswer", "conversations": [
        {"from": "human", "value": "Hi"}]}),
        json.dumps({"id": "long", "conversations": [{"from": "human", "value": "word " * 300},
                                                    {"from": "gpt", "value": "yes"}]}),
        json.dumps({"id": "bad", "image": ["broken.png"], "conversations": [image, {"from": "gpt", "value": "x"}]}),
        json.dumps({"id": "good", "image": ["ok.png"], "conversations": [image, {"from": "gpt", "value": "y"}]})]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = DataArgs(path=str(path), image_dir=str(tmp_path), max_length=160, streaming=True)
    ds = _stream(data, model, tok, passes=2)
    with caplog.at_level(logging.WARNING, logger="medm.data.streaming"):
        items = list(ds)
    assert len(items) == 4  # t0 and good, twice
    assert ds.num_dropped == 1 and ds.bad_samples.failed == 2 and bad_sample_count(ds) == 1
    assert f"of {path}: record 'd.jsonl:1'" in caplog.text and "invalid JSON" in caplog.text
    assert f"of {path}: record 'noanswer'" in caplog.text and "ends on a human turn" in caplog.text
    assert "dropped record 'long'" in caplog.text and "skipping sample 'bad'" in caplog.text
    assert caplog.text.count("skipping sample 'bad'") == 1  # known bad: not read again on the second pass
    strict = _stream(DataArgs(**{**data.__dict__, "max_bad_samples": 0}), model, tok, passes=1)
    with pytest.raises(TooManyBadSamples, match="record 'bad'"):
        list(strict)


def test_a_shard_without_usable_records_is_an_error(tiny_model, tmp_path):
    model, tok = tiny_model
    path = _text_file(tmp_path / "t.jsonl", 1)
    encoder = build_dataset(DataArgs(path=path, store="memory"), model, tok)
    with pytest.raises(RuntimeError, match="rank 1.*no usable sample"):
        next(iter(StreamingDataset(path, encoder, rank=1, world_size=2)))


def _cfg(tmp_path, data: dict, **train):
    return parse_train_config({"model": tiny_model_config(), "data": {"path": "x.jsonl", "streaming": True, **data},
                               "train": {"output_dir": str(tmp_path), "max_steps": 5, **train}})


@pytest.mark.parametrize(("data", "train", "key"), [
    ({}, {"max_steps": -1}, "train.max_steps"),
    ({"packing": True}, {}, "data.packing"),
    ({"val_size": 0.1}, {}, "data.val_size"),
    ({"path": [{"path": "a.jsonl", "ratio": 1}]}, {}, "data.mixture"),
    ({}, {"train_sampling_strategy": "group_by_modality_length"}, "train.train_sampling_strategy"),
])
def test_settings_streaming_cannot_honour_fail_when_the_config_is_read(tmp_path, data, train, key):
    with pytest.raises(ConfigError, match=rf"{key} with data.streaming"):
        _cfg(tmp_path, data, **train)


def test_streaming_settings_without_streaming_are_refused(tmp_path):
    _cfg(tmp_path, {"streaming_shuffle_buffer": 64, "val_path": "v.jsonl"})  # fine with streaming
    with pytest.raises(ConfigError, match="streaming_shuffle_buffer is set but data.streaming is off"):
        _cfg(tmp_path, {"streaming": False, "streaming_shuffle_buffer": 64})


def test_accelerates_shard_wrapper_passes_this_ranks_stream_through(tiny_model, tmp_path):
    from types import SimpleNamespace

    from accelerate.data_loader import IterableDatasetShard

    model, tok = tiny_model
    path = _text_file(tmp_path / "t.jsonl", 10)
    encoder = build_dataset(DataArgs(path=path, store="memory"), model, tok)
    ds = StreamingDataset(path, encoder, rank=1, world_size=2, passes=1)
    mine = [it["input_ids"].tolist() for it in ds]
    assert len(mine) == 5
    # What Accelerate makes of an iterable dataset on rank 1 of 2: it would keep one batch in two of this rank's own.
    loader = SimpleNamespace(dataset=IterableDatasetShard(ds, batch_size=1, num_processes=2, process_index=1))
    assert len(list(loader.dataset)) < len(mine)
    own_shards(loader)
    assert [it["input_ids"].tolist() for it in loader.dataset] == mine
