"""medm.data.store: the tokenized record store gives exactly the in-memory path's samples (both model kinds), is
built once per fingerprint and reopened from the cache, lists encoding errors from every worker, and serves
DataLoader workers, validation splits and mixtures."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medm.config import load_yaml
from medm.data.annotations import AnnotationError, load_records
from medm.data.dataset import ConversationDataset, ConversationEncoder, DataArgs, build_dataset
from medm.data.store import SampleStore, open_store
from medm.data.templates import TemplateError, expand_media
from medm.data.validation import split_validation
from medm.models import build_model
from medm.models.builder import add_media_tokens
from medm.models.tiny import tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _turns(*pairs):
    conv = []
    for q, a in pairs:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return conv


# Every kind of record the datasets take: text only, 2D, two images over two turns, 3D, 2D + 3D, a long answer
# (cut by a small max_length), a ShareGPT record with its own system turn.
RAW = [
    {"id": "text", "conversations": _turns(("Is the heart enlarged?", "No."))},
    {"id": "one", "image": ["a.png"], "conversations": _turns(("Which organ is shown?", "The liver."))},
    {"id": "two", "image": ["b.png", "c.png"], "conversations": _turns(
        ("<image>\nIs there a lesion?", "Yes."), ("And here?\n<image>", "No lesion."))},
    {"id": "ct", "image3d": ["ct.npy"], "conversations": _turns(("Describe the scan.", "A normal chest CT."))},
    {"id": "both", "image": ["a.png"], "image3d": ["ct.npy"], "conversations": _turns(
        ("<image>\n<image3d>\nCompare them.", "Both are normal."), ("Any nodule?", "None."))},
    {"id": "long", "conversations": _turns(("Write a report.", " ".join(["The lungs are clear."] * 40)))},
    {"id": "sharegpt", "messages": [{"role": "user", "content": "Is this MRI?"},
                                    {"role": "assistant", "content": "It is a CT."}], "system": "Be brief."},
]


def _write(path: Path, raw: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in raw) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer("chatml")
    add_media_tokens(t)
    return t


TEXT = {"num_image_tokens": 5, "num_image3d_tokens": 3}


def _datasets(path, tok, num_proc=1, **text):
    """(in-memory dataset, store-backed dataset) of one file with the same settings."""
    settings = {**TEXT, **text}
    media = {"image_preprocess": lambda im: im, "volume_preprocess": lambda p: p}
    memory = ConversationDataset(load_records(path, for_training=True), tok, **settings, **media)
    store = open_store([path], ConversationEncoder(tok, **settings), num_proc=num_proc)
    return memory, ConversationDataset(store, tok, **settings, **media)


def assert_same_samples(memory, arrow):
    assert len(arrow) == len(memory) and arrow.num_dropped == memory.num_dropped
    assert list(arrow.lengths) == list(memory.lengths)
    assert list(arrow.modalities) == list(memory.modalities)
    for a, m in zip(arrow.samples, memory.samples):
        # Byte-equal: the same int64 ids and labels as the in-memory path holds.
        assert np.asarray(a.ids, dtype=np.int64).tobytes() == np.asarray(m.ids, dtype=np.int64).tobytes()
        assert np.asarray(a.labels, dtype=np.int64).tobytes() == np.asarray(m.labels, dtype=np.int64).tobytes()
        assert (a.length, a.n_images, getattr(a, "n_volumes", 0)) == (m.length, m.n_images, getattr(m, "n_volumes", 0))
        assert a.record == m.record


@pytest.mark.parametrize("max_length, num_proc", [(2048, 1), (60, 2)])
def test_store_samples_equal_the_in_memory_path(tok, tmp_path, monkeypatch, max_length, num_proc):
    from medm.data import _store_build

    path = _write(tmp_path / "train.jsonl", RAW)
    if num_proc > 1:
        monkeypatch.setattr(_store_build, "_CHUNK", 3)  # several chunks of lines: parsed by the worker processes
    memory, arrow = _datasets(path, tok, num_proc=num_proc, max_length=max_length)
    assert isinstance(arrow.samples, SampleStore) and arrow.samples.meta["num_proc"] == num_proc
    assert_same_samples(memory, arrow)
    if max_length == 60:
        assert memory.num_dropped >= 1 and max(memory.lengths) <= 60  # the cut and the dropped really happen
    else:
        assert set(memory.modalities) == {"text", "image", "image3d"}
    for m, a in zip(memory.samples, arrow.samples):  # the items' ids (media expanded, truncated) too
        assert expand_media(a.ids, a.labels, arrow.sizes, max_length) == expand_media(m.ids, m.labels, memory.sizes,
                                                                                    max_length)


def test_vqa_rad_store_equals_the_in_memory_path(shared_data, tok, tmp_path):
    root = shared_data / "vqa_rad"
    if not (root / "split" / "trainset.json").is_file():
        pytest.skip("VQA-RAD split not present")
    rows = json.loads((root / "split" / "trainset.json").read_text())
    raw = [{"id": f"vqarad-{r['qid']}", "image": [r["image_name"]],
            "conversations": _turns((f"<image>\n{r['question']}", str(r["answer"])))} for r in rows]
    path = _write(tmp_path / "vqa_rad.jsonl", raw)
    memory, arrow = _datasets(path, tok, num_proc=2)
    assert len(arrow) == len(rows)
    assert_same_samples(memory, arrow)
    from medm.qwenvl._encoder import QwenVLEncoder
    from medm.qwenvl.data import QwenVLDataset, QwenVLInputs

    _, processor = _qwen()
    kw = {"box_format": "json_resized", "image_dir": str(root / "images"), "max_length": 2048}
    mem = QwenVLDataset(load_records(path, for_training=True), processor, **kw)
    enc = QwenVLEncoder(QwenVLInputs(processor, "json_resized"), kw["image_dir"], kw["max_length"])
    store = QwenVLDataset(open_store([path], enc, num_proc=2, decode=enc.decoder()), processor, **kw)
    assert_same_samples(mem, store)
    assert [s.geometries for s in store.samples] == [s.geometries for s in mem.samples]


def _qwen():
    torch.manual_seed(0)
    return build_model(load_yaml(str(REPO / "configs" / "model" / "tiny-qwen2.5-vl.yaml")))


def test_qwenvl_store_equals_the_in_memory_path_with_bad_images(tmp_path, caplog):
    from medm.data._bad_samples import bad_sample_count
    from medm.qwenvl.data import build_qwenvl_dataset

    model, processor = _qwen()
    for name, size in (("a.png", (64, 48)), ("b.png", (20, 90)), ("c.png", (300, 200))):
        Image.fromarray(np.full(size[::-1], 120, dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    raw = [r for r in RAW if "image3d" not in r] + [
        {"id": "broken", "image": ["broken.png"], "conversations": _turns(("What is it?", "Unknown."))},
        {"id": "tall", "image": ["b.png"], "conversations": _turns(("Tall image?", "Yes."))}]
    path = _write(tmp_path / "qwen.jsonl", raw)
    args = DataArgs(path=path, image_dir=str(tmp_path), max_length=2048)
    with caplog.at_level(logging.WARNING):
        arrow = build_qwenvl_dataset(args, model, processor)
        memory = build_qwenvl_dataset(DataArgs(**{**args.__dict__, "store": "memory"}), model, processor)
    assert isinstance(arrow.samples, SampleStore)
    assert_same_samples(memory, arrow)
    assert [s.geometries for s in arrow.samples] == [s.geometries for s in memory.samples]
    # The unreadable image is a known-bad sample in both: counted, skipped and replaced.
    bad = [s.record.id for s in arrow.samples].index("broken")
    assert arrow.bad_samples.is_bad(bad) and bad_sample_count(arrow) == bad_sample_count(memory) == 1
    assert arrow[bad]["input_ids"].shape[0] > 0
    # A dataset refuses a store encoded for other settings (here another max_length).
    with pytest.raises(ValueError, match="max_length differ"):
        type(arrow)(arrow.samples, processor, box_format=model.medm_settings["box_format"], image_dir=str(tmp_path),
                    max_length=100)
    for i in range(len(memory)):
        if i != bad:
            m, a = memory[i], arrow[i]
            assert torch.equal(m["input_ids"], a["input_ids"]) and torch.equal(m["labels"], a["labels"])
            assert (m["pixel_values"] is None) == (a["pixel_values"] is None)
            if a["pixel_values"] is not None:
                assert torch.equal(m["pixel_values"], a["pixel_values"])
                assert torch.equal(m["image_grid_thw"], a["image_grid_thw"])


def test_second_open_is_a_cache_hit_without_tokenizing(tok, tmp_path, monkeypatch, caplog, record_cache):
    path = _write(tmp_path / "train.jsonl", RAW)
    calls = []
    encode = ConversationEncoder.encode
    monkeypatch.setattr(ConversationEncoder, "encode", lambda self, rec: calls.append(rec.id) or encode(self, rec))
    with caplog.at_level(logging.INFO, logger="medm.data.store"):
        first = open_store([path], ConversationEncoder(tok, **TEXT))
    assert first.built and len(calls) == len(RAW) and "cache miss" in caplog.text
    meta = Path(first.path) / "meta.json"
    assert Path(first.path).parent == record_cache and meta.is_file()
    stamp = meta.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medm.data.store"):
        second = open_store([path], ConversationEncoder(tok, **TEXT))
    assert not second.built and len(calls) == len(RAW) and "cache hit" in caplog.text
    assert second.path == first.path and meta.stat().st_mtime_ns == stamp
    assert [s.ids for s in second] == [s.ids for s in first]


def test_cache_misses_when_tokenizer_max_length_or_data_change(tok, tmp_path):
    path = _write(tmp_path / "train.jsonl", RAW)
    base = open_store([path], ConversationEncoder(tok, **TEXT))
    other_tok = tiny_tokenizer("chatml")
    add_media_tokens(other_tok)
    other_tok.add_tokens(["<organ>"])
    changed = {
        "tokenizer": open_store([path], ConversationEncoder(other_tok, **TEXT)),
        "max_length": open_store([path], ConversationEncoder(tok, **TEXT, max_length=100)),
        "system_prompt": open_store([path], ConversationEncoder(tok, **TEXT, system_prompt="Be brief.")),
    }
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched, same size and contents
    changed["mtime"] = open_store([path], ConversationEncoder(tok, **TEXT))
    paths = {base.path} | {s.path for s in changed.values()}
    assert len(paths) == 5 and all(s.built for s in changed.values())
    assert changed["max_length"].meta["max_length"] == 100
    # A dataset refuses a store encoded for other settings than its own.
    with pytest.raises(ValueError, match="max_length differ"):
        ConversationDataset(changed["max_length"], tok, **TEXT, image_preprocess=len, volume_preprocess=len)


def test_encoding_errors_from_every_worker_are_listed_with_file_and_id(tmp_path):
    bad_tok = tiny_tokenizer("chatml")
    add_media_tokens(bad_tok)
    # A template without a turn end: no record's labels can be found exactly.
    bad_tok.chat_template = ("{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
                             "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    raw = [r for r in RAW if "image" not in r and "image3d" not in r] * 2
    raw = [{**r, "id": f"{r['id']}-{i}"} for i, r in enumerate(raw)]
    path = _write(tmp_path / "chat.jsonl", raw)
    with pytest.raises(TemplateError) as e:
        open_store([path], ConversationEncoder(bad_tok, **TEXT), num_proc=2)
    text = str(e.value)
    assert f"{len(raw)} of {len(raw)} record(s) cannot be encoded exactly" in text
    # Both workers' records (the first and the second half), each with its file.
    for r in (raw[0], raw[-1]):
        assert f"{path}: record {r['id']!r}" in text
    assert "no end-of-turn" in text
    # A reopened store raises the same listing without encoding again.
    with pytest.raises(TemplateError, match=f"{len(raw)} of {len(raw)}"):
        open_store([path], ConversationEncoder(bad_tok, **TEXT), num_proc=2)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_bad_records_are_listed_as_when_loading(tok, tmp_path, record_cache, monkeypatch, num_proc):
    from medm.data import _store_build

    if num_proc > 1:
        monkeypatch.setattr(_store_build, "_CHUNK", 2)  # lines parsed in chunks by the worker processes
    raw = RAW[:2] + [{"id": "nogpt", "conversations": [{"from": "human", "value": "Hi?"}]}] + RAW[2:]
    good = _write(tmp_path / "good.jsonl", RAW)
    path = _write(tmp_path / "bad.jsonl", raw)
    # A torn line and one that is not UTF-8 in the second half (another worker), and a JSON list with a bad item.
    with open(path, "ab") as f:
        f.write(b'{"id": "torn", "conversations": [{"fr\n' + b'{"id": "\xff\xfe"}\n')
    listed = tmp_path / "bad_list.json"
    listed.write_text(json.dumps(RAW[:3] + [{"id": "noconv"}]))
    files = [good, path, str(listed)]
    with pytest.raises(AnnotationError) as building:
        open_store(files, ConversationEncoder(tok, **TEXT), num_proc=num_proc)
    text = str(building.value)
    assert text.startswith("4 bad record(s) in ") and "medm data validate" in text
    # In file order, named by id (or file and number), with the reason the JSONL reader gives.
    listed_ids = [line.split(":")[0].strip() for line in text.splitlines()[1:5]]
    assert listed_ids == ["record 'nogpt'", "record 'bad.jsonl", "record 'bad.jsonl", "record 'noconv'"]
    assert f"'bad.jsonl:{len(raw)}': {path} line {len(raw) + 1}: invalid JSON (JSONL line)" in text
    assert f"'bad.jsonl:{len(raw) + 1}': {path} line {len(raw) + 2}: not UTF-8 text" in text
    # The JSON list's bad item as loading that file names it.
    with pytest.raises(AnnotationError) as loading:
        load_records([str(listed)], for_training=True)
    assert str(loading.value).splitlines()[1] == text.splitlines()[4]
    assert [p.name for p in record_cache.iterdir() if not p.name.endswith(".lock")] == []  # nothing half-built


def test_dataloader_workers_and_copies_read_the_mapping(tok, tmp_path):
    path = _write(tmp_path / "train.jsonl", RAW)
    memory, arrow = _datasets(path, tok)
    copy = pickle.loads(pickle.dumps(arrow.samples))  # what a spawned worker gets: the path, not the table
    assert len(pickle.dumps(arrow.samples)) < 2000 and [s.ids for s in copy] == [s.ids for s in arrow.samples]
    text_only = arrow.samples.subset(np.flatnonzero(np.asarray(arrow.modalities) == "text"))
    ds = ConversationDataset(text_only, tok, **TEXT)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = [item["input_ids"].tolist() for item in loader]
    want = [memory._item(i)["input_ids"].tolist() for i, m in enumerate(memory.modalities) if m == "text"]
    assert got == want and len(got) >= 3


def test_validation_split_and_mixture_on_the_store(tmp_path):
    from medm.models.tiny import tiny_model_config
    from medm.train.trainer import build_training_inputs, build_validation_data

    torch.manual_seed(0)
    model, tok = build_model(tiny_model_config())
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    raw = [{"id": f"r{i}", "image": ["a.png"] if i % 2 else [], "conversations": _turns((f"Question {i}?", "Yes."))}
           for i in range(12)]
    path = _write(tmp_path / "train.jsonl", raw)
    data = {"path": path, "image_dir": str(tmp_path), "val_size": 0.25, "val_seed": 3}
    arrow = split_validation(build_dataset(DataArgs(**data), model, tok), 0.25, 3)
    memory = split_validation(build_dataset(DataArgs(**data, store="memory"), model, tok), 0.25, 3)
    for a, m in zip(arrow, memory):
        assert isinstance(a.samples, SampleStore)
        assert [s.record.id for s in a.samples] == [s.record.id for s in m.samples]
        assert list(a.lengths) == list(m.lengths)
    assert len(arrow[0]) == 9 and len(arrow[1]) == 3

    from medm.train.args import parse_train_config

    other = _write(tmp_path / "other.jsonl", raw[:4])
    cfg = parse_train_config({"model": tiny_model_config(), "train": {"output_dir": str(tmp_path / "run")},
                              "data": {"path": [{"path": path, "ratio": 0.5}, {"path": other, "ratio": 0.5}],
                                       "image_dir": str(tmp_path), "val_path": other}})
    dataset, _, sampler = build_training_inputs(cfg, model, tok)
    assert [len(d) for d in dataset.datasets] == [12, 4] and sampler is not None
    assert all(isinstance(d.samples, SampleStore) for d in dataset.datasets)
    assert dataset[12]["input_ids"].tolist() == dataset[0]["input_ids"].tolist()
    val = build_validation_data(cfg, model, tok)
    assert isinstance(val.samples, SampleStore) and len(val) == 4
    # The same file in the mixture and as val_path is one store: built once.
    assert val.samples.path == dataset.datasets[1].samples.path and not val.samples.built


def test_prepare_builds_the_stores_a_training_run_opens(tmp_path, capsys):
    import yaml

    from medm.cli import main
    from medm.models.tiny import tiny_model_config
    from medm.train.args import load_train_config
    from medm.train.trainer import build_training_inputs

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    raw = [{"id": f"r{i}", "image": ["a.png"], "conversations": _turns((f"Question {i}?", "Yes."))} for i in range(6)]
    path = _write(tmp_path / "train.jsonl", raw)
    val = _write(tmp_path / "val.jsonl", raw[:2])
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": tiny_model_config(), "train": {"output_dir": str(tmp_path / "run")},
                                      "data": {"path": path, "image_dir": str(tmp_path), "val_path": val}}))
    shared = tmp_path / "shared-cache"
    assert main(["data", "prepare", str(config), f"data.cache_dir={shared}", "data.num_proc=1"]) == 0
    out = capsys.readouterr().out
    assert "6 samples of 6 records" in out and "2 samples of 2 records" in out and f"cache dir: {shared}" in out
    assert len([p for p in shared.iterdir() if p.is_dir()]) == 2
    # A run pointed at the same cache opens what prepare built.
    cfg = load_train_config(str(config), [f"data.cache_dir={shared}"])
    torch.manual_seed(0)
    model, tok = build_model(cfg.model)
    dataset, _, _ = build_training_inputs(cfg, model, tok)
    assert not dataset.samples.built and Path(dataset.samples.path).parent == shared
    assert main(["data", "prepare", str(config), "data.store=memory"]) == 2
    assert "data.store: arrow" in capsys.readouterr().err


def test_a_killed_build_leaves_nothing_that_opens(tok, tmp_path, monkeypatch, record_cache):
    from medm.data import _store_build

    path = _write(tmp_path / "train.jsonl", RAW)

    def killed(*args):
        os.makedirs(args[2])
        (Path(args[2]) / "records.arrow").write_bytes(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(_store_build, "_build", killed)
        open_store([path], ConversationEncoder(tok, **TEXT))
    assert [p.name for p in record_cache.iterdir() if not p.name.endswith(".lock")] == []
    # A crash that could not clean up (SIGKILL) leaves its temporary directory; the next build removes it.
    final = Path(_store_build.build_if_missing([path], ConversationEncoder(tok, **TEXT), cache_dir=str(record_cache),
                                               num_proc=1)[0])
    import shutil

    shutil.rmtree(final)
    (record_cache / f"{final.name}.tmp-otherhost-1").mkdir()
    store = open_store([path], ConversationEncoder(tok, **TEXT))
    assert store.built and [p.name for p in record_cache.iterdir() if not p.name.endswith(".lock")] == [final.name]
