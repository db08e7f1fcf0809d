"""Bad-input matrix, through the paths users take (`medm data validate`, `load_records`, `build_dataset`,
`medm train`): every bad file, record or config gives a message naming the file, the record id and what is wrong,
and the rest of the data stays usable.

Skipping a bad sample *during* training is in test_bad_samples.py."""

import copy
import json
import logging
import re
import struct
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml
from PIL import Image
from pydicom.data import get_testdata_file

from medm.cli import main
from medm.config import ConfigError
from medm.data.annotations import AnnotationError, load_records
from medm.data.dataset import DataArgs, build_dataset
from medm.models import build_model
from medm.models.tiny import tiny_model_config, tiny_vision
from medm.train.args import load_train_config

TURNS = [{"from": "human", "value": "<image>\nIs there a lesion?"}, {"from": "gpt", "value": "No."}]
TURNS3D = [{"from": "human", "value": "<image3d>\nIs there a lesion?"}, {"from": "gpt", "value": "No."}]


# ---- bad files -----------------------------------------------------------------------------------------------------
def _png(path: Path, size=(24, 20), value=120) -> Path:
    Image.new("L", size, value).save(path)
    return path


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _bomb(path: Path, width=12_000, height=10_000) -> Path:
    """A 200-byte PNG whose header declares 120 million pixels (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def _garbled(path: Path) -> Path:
    """A PNG whose compressed pixel data is overwritten (header intact)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start:start + 200] = bytes(200)
    path.write_bytes(bytes(data))
    return path


def _truncated(path: Path) -> Path:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:600])
    return path


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))
    return path


def _dicom_series(folder: Path, n=3, truncate=False) -> Path:
    """A CT series from pydicom's CT_small.dcm; `truncate` cuts each slice's pixel data in half."""
    folder.mkdir()
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * i]
        arr = np.full((128, 128), 100 + i, dtype=np.int16).tobytes()
        ds.PixelData = arr[:len(arr) // 2] if truncate else arr
        ds.save_as(folder / f"s{i}.dcm")
    return folder


def _file(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return path.name


def _no_dicom(folder: Path) -> str:
    folder.mkdir()
    (folder / "notes.txt").write_text("not DICOM")
    return folder.name


def _media_case(setup, key="image"):
    """A record whose only problem is its file (made by `setup(tmp_path) -> name`)."""
    return lambda tmp: {key: [setup(tmp)], "conversations": TURNS if key == "image" else TURNS3D}


def _record_case(**fields):
    return lambda tmp: {"image": [_png(tmp / "fine.png").name], **fields}


# name -> (record maker, failure kind in `medm data validate`, fragments its message must hold besides the id)
CASES = {
    "corrupt image": (_media_case(lambda t: _garbled(t / "garbled.png").name), "corrupt_image",
                      ["garbled.png", "corrupt or truncated image data"]),
    "not an image": (_media_case(lambda t: _file(t / "notes.png", b"hello")), "corrupt_image",
                     ["notes.png", "not a recognised image format"]),
    "truncated image": (_media_case(lambda t: _truncated(t / "cut.png").name), "corrupt_image",
                        ["cut.png", "truncated"]),
    "missing file": (_media_case(lambda t: "nowhere.png"), "missing_file", ["nowhere.png", "does not exist"]),
    "zero-size image": (_media_case(lambda t: _file(t / "empty.png", b"")), "corrupt_image",
                        ["empty.png", "empty (0 bytes)"]),
    "decompression bomb": (_media_case(lambda t: _bomb(t / "bomb.png").name), "corrupt_image",
                           ["bomb.png", "120,000,000 pixels", "decompression bomb"]),
    "too many placeholders": (_record_case(conversations=[{"from": "human", "value": "<image>\n<image>\nAny?"},
                                                          {"from": "gpt", "value": "No."}]),
                              "placeholder_mismatch", ["1 file(s) in `image` but 2 <image> placeholder(s)"]),
    "placeholder in an answer": (_record_case(conversations=[{"from": "human", "value": "<image>\nAny?"},
                                                             {"from": "gpt", "value": "See <image>"}]),
                                 "placeholder_mismatch", ["<image> may only appear in human turns"]),
    "empty conversation": (_record_case(conversations=[]), "empty_conversation", ["has no turns"]),
    "empty turn text": (_record_case(conversations=[{"from": "human", "value": "<image>\nAny?"},
                                                    {"from": "gpt", "value": "  "}]),
                        "empty_conversation", ["turn 1 (gpt) has empty text"]),
    "ends on a human turn": (_record_case(conversations=[{"from": "human", "value": "<image>\nAny?"}]),
                             "ends_on_human", ["ends on a human turn"]),
    "turns out of order": (_record_case(conversations=[{"from": "gpt", "value": "Hi"},
                                                       {"from": "human", "value": "<image>\nAny?"}]),
                           "bad_turn_order", ["turn 0 is 'gpt', expected 'human'"]),
    "conversations not a list": (_record_case(conversations="hello"), "schema", ["`conversations` must be a list"]),
    "4D NIfTI": (_media_case(lambda t: _nifti(t / "fmri.nii.gz", np.zeros((8, 8, 8, 3))).name, "image3d"),
                 "corrupt_image", ["fmri.nii.gz", "(8, 8, 8, 3) is 4D"]),
    "corrupt NIfTI": (_media_case(lambda t: _file(t / "bad.nii.gz", b"\x1f\x8b\x08\x00junk"), "image3d"),
                      "corrupt_image", ["bad.nii.gz", "not a readable NIfTI file"]),
    "unreadable DICOM series": (_media_case(lambda t: _dicom_series(t / "ct_cut", truncate=True).name, "image3d"),
                                "corrupt_image", ["ct_cut", "cannot decode pixel data"]),
    "folder without DICOM": (_media_case(lambda t: _no_dicom(t / "docs"), "image3d"), "corrupt_image",
                             ["docs", "holds no DICOM image files"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validate_names_file_id_and_reason_and_keeps_the_rest(case, tmp_path, capsys):
    make, kind, fragments = CASES[case]
    good = {"id": "good-1", "image": [_png(tmp_path / "ok.png").name], "conversations": TURNS}
    bad = {"id": "bad-1", **make(tmp_path)}
    data = tmp_path / "train.json"
    data.write_text(json.dumps([good, bad]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's own DecompressionBombWarning for the bomb's header
        rc = main(["data", "validate", str(data), "--image-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert f"in {data}: 1 good, 1 bad" in out
    kind_line = next(line for line in out.splitlines() if line.strip().startswith(f"{kind}:"))
    assert "bad-1" in kind_line
    example = out.split("e.g. ", 1)[1]
    assert "record 'bad-1'" in example
    for fragment in fragments:
        assert fragment in example, (fragment, example)

    # The rest of the data is still usable: --write-clean keeps the good record, which trains / infers as before.
    clean = tmp_path / "clean.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["data", "validate", str(data), "--image-dir", str(tmp_path), "--write-clean", str(clean)]) == 0
    assert [r.id for r in load_records(str(clean), for_training=True)] == ["good-1"]


def test_training_refuses_a_file_with_bad_records_listing_each_one(tmp_path):
    """Schema problems stop `load_records` (the training path) at once, with every bad id and the fix."""
    items = [{"id": f"ok{i}", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Yes."}]}
             for i in range(3)]
    items += [{"id": "no-turns", "conversations": []},
              {"id": "open-question", "conversations": [{"from": "human", "value": "Any?"}]},
              {"id": "two-images", "image": "a.png", "conversations": [
                  {"from": "human", "value": "<image><image>Any?"}, {"from": "gpt", "value": "No."}]}]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(items))
    with pytest.raises(AnnotationError) as err:
        load_records(str(path), for_training=True)
    msg = str(err.value)
    assert msg.startswith(f"3 bad record(s) in {path}")
    for rid in ("no-turns", "open-question", "two-images"):
        assert f"record {rid!r}" in msg
    assert "medm data validate" in msg and "--write-clean" in msg
    # The same file read as prompts (inference) accepts the open question.
    with pytest.raises(AnnotationError, match="2 bad record"):
        load_records(str(path), for_training=False)


@pytest.mark.parametrize("layout, text, where", [
    ("list", '[\n {"id": "a", "conversations": []},\n {"id": "b" "conversations": []}\n]', ":3:13: invalid JSON"),
    # A bad JSONL line is one bad record (validate counts it and goes on: tests/robustness/test_annotation_files.py).
    ("jsonl", '{"id": "a", "conversations": []}\n{"id": "b", conversations: []}\n',
     " line 2, column 13: invalid JSON (JSONL"),
])
def test_malformed_json_names_line_and_column(layout, text, where, tmp_path, capsys):
    path = tmp_path / f"bad.{'json' if layout == 'list' else 'jsonl'}"
    path.write_text(text)
    assert main(["data", "validate", str(path)]) == (2 if layout == "list" else 1)
    printed = capsys.readouterr()
    assert f"{path}{where}" in printed.err + printed.out
    with pytest.raises(AnnotationError, match=re.escape(f"{path}{where}")):
        load_records(str(path))


# ---- bad configs ---------------------------------------------------------------------------------------------------
def _train_yaml(tmp_path, data_path, **sections) -> Path:
    cfg = {"model": tiny_model_config(), "data": {"path": str(data_path)},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "device": "cpu", "report_to": []}}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("override, message", [
    ("train.lerning_rate=1e-4", "train.lerning_rate: unknown key; did you mean learning_rate?"),
    ("stage.visoin=full", "stage.visoin: unknown key; did you mean vision?"),
    ("data.image_dirs=x", "data.image_dirs: unknown key; did you mean image_dir?"),
    ("model.vision.name=clipp",
     "model.vision.name: unknown vision encoder 'clipp'; did you mean clip? known: clip, hf, open_clip"),
    ("model.connector.name=nope", "model.connector.name: unknown connector 'nope'; known: attention_pool, mlp"),
    ("model.llm.family=gpt9", "model.llm.family: unknown LLM family 'gpt9'; known: auto, llama"),
    ("model.template=chatmll", "model.template: unknown chat template 'chatmll'"),
    ("model.vision.image_size_px=32", "model.vision.image_size_px: unknown key for 'clip'; did you mean image_std?"),
    ("trainer.max_steps=3", "trainer: unknown section; did you mean train?"),
])
def test_config_errors_name_the_key_through_medm_train(override, message, tmp_path, toy_data, capsys):
    """`medm train` exits 2 with one line naming the bad key / component before building anything."""
    path = _train_yaml(tmp_path, toy_data)
    with pytest.raises(ConfigError):
        load_train_config(str(path), [override])
    assert main(["train", str(path), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists()


# ---- over-long samples, volumes ------------------------------------------------------------------------------------
def test_over_long_samples_are_cut_or_dropped_by_id(tiny_model, tmp_path, caplog):
    model, tok = tiny_model
    _png(tmp_path / "a.png")
    long_question = "Describe every finding in the chest film in detail please. " * 20
    items = [{"id": "short", "image": ["a.png"], "conversations": TURNS},
             {"id": "too-long", "image": ["a.png"], "conversations": [
                 {"from": "human", "value": f"<image>\n{long_question}"}, {"from": "gpt", "value": "No."}]},
             {"id": "long-answer", "image": ["a.png"], "conversations": [
                 {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": long_question}]}]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(items))
    with caplog.at_level(logging.WARNING, logger="medm.data.dataset"):
        ds = build_dataset(DataArgs(path=str(path), image_dir=str(tmp_path), max_length=96), model, tok)
    assert [ds.record(i).id for i in range(len(ds))] == ["short", "long-answer"]
    assert ds.num_dropped == 1
    assert "dropped 1 of 3 record(s)" in caplog.text and "'too-long'" in caplog.text
    item = ds[1]  # the long answer is cut at max_length, its image kept
    assert item["length"] == len(item["input_ids"]) == 96 and item["pixel_values"].shape[0] == 1
    assert all(ds[i]["length"] <= 96 for i in range(len(ds)))


@pytest.fixture(scope="module")
def tiny_3d():
    cfg = tiny_model_config(vision=None)
    cfg["vision3d"] = {"name": "vit3d", **tiny_vision("vit3d")}
    cfg["connector3d"] = {"name": "spatial_pool", "stride": 2}
    torch.manual_seed(0)
    return build_model(cfg)


def test_volume_edge_cases_through_the_3d_dataset(tiny_3d, tmp_path, caplog):
    """NaN / Inf voxels are replaced with a warning naming the file; singleton axes load; a 4D volume is skipped
    and counted at load time, naming the file and id."""
    model, tok = tiny_3d
    rng = np.random.default_rng(0)
    nan = rng.normal(0, 100, (12, 12, 12)).astype(np.float32)
    nan[0, 0, :3] = [np.nan, np.inf, -np.inf]
    _nifti(tmp_path / "nan.nii.gz", nan)
    _nifti(tmp_path / "trailing1.nii.gz", rng.normal(0, 100, (12, 12, 12, 1)))
    np.save(tmp_path / "lead1.npy", rng.normal(0, 100, (1, 10, 12, 12)).astype(np.float32))
    np.save(tmp_path / "one_slice.npy", rng.normal(0, 100, (1, 12, 12)).astype(np.float32))
    _nifti(tmp_path / "fmri.nii.gz", np.zeros((12, 12, 12, 2)))
    names = ["nan.nii.gz", "trailing1.nii.gz", "lead1.npy", "one_slice.npy", "fmri.nii.gz"]
    path = tmp_path / "vol.json"
    path.write_text(json.dumps([{"id": n.split(".")[0], "image3d": [n], "conversations": TURNS3D} for n in names]))
    ds = build_dataset(DataArgs(path=str(path), image_dir=str(tmp_path)), model, tok)
    size = tuple(model.config.vision3d["image_size"])

    with pytest.warns(UserWarning, match=r"nan.nii.gz: 3 of 1728 voxels are NaN or infinite"):
        x = ds[0]["pixel_values_3d"]
    assert x.shape[-3:] == size and torch.isfinite(x).all()
    for i in (1, 2, 3):
        x = ds[i]["pixel_values_3d"]
        assert x.shape[-3:] == size and torch.isfinite(x).all(), names[i]
    with caplog.at_level(logging.WARNING, logger="medm.data.dataset"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the substitute's NaN warning again
        item = ds[4]  # the 4D volume: skipped, replaced by the next good 3D sample (nan.nii.gz's, cyclically)
        substitute = ds[0]
    assert "skipping sample 'fmri'" in caplog.text and "fmri.nii.gz" in caplog.text and "is 4D" in caplog.text
    assert ds.bad_samples.count == 1
    torch.testing.assert_close(item["input_ids"], substitute["input_ids"])


def test_nonfinite_error_policy_names_the_file(tmp_path):
    from medm.data.volumes import VolumeLoadError, VolumePreprocess

    bad = np.ones((8, 8, 8), np.float32)
    bad[1, 1, 1] = np.nan
    _nifti(tmp_path / "nan.nii.gz", bad)
    pre = VolumePreprocess({"nonfinite": "error"}, (8, 8, 8))
    with pytest.raises(VolumeLoadError, match=r"nan.nii.gz.*1 of 512 voxels are NaN or infinite"):
        pre(tmp_path / "nan.nii.gz")
