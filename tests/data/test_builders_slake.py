"""SLAKE builder on a fixture in the Slake1.0 release layout (train / validate / test JSON, imgs/xmlabN/source.jpg)."""

import json
import os

import pytest
from PIL import Image

from medm.cli import main
from medm.data.builders._common import SourceError
from medm.data.builders.slake import build_slake


def _row(qid, img, q, a, atype="OPEN", lang="en", **kw):
    # Field order and values as in the release files.
    return {"img_id": int(img.split("/")[0][5:]), "img_name": img, "question": q, "answer": a, "q_lang": lang,
            "location": kw.get("location", "Abdomen"), "modality": kw.get("modality", "CT"), "answer_type": atype,
            "base_type": "vqa", "content_type": kw.get("content_type", "Organ"), "triple": ["vhead", "_", "_"],
            "qid": qid}


TRAIN = [
    _row(0, "xmlab0/source.jpg", "What modality is used to take this image?", "MRI", content_type="Modality",
         modality="MRI"),
    _row(1, "xmlab0/source.jpg", "Does the picture contain liver?", "Yes", "CLOSED"),
    _row(2, "xmlab0/source.jpg", "图片中包含肝脏吗?", "是", "CLOSED", lang="zh"),
]
VALIDATE = [_row(10, "xmlab1/source.jpg", "Which organ is abnormal?", "Lung", location="Chest")]
TEST = [
    _row(20, "xmlab1/source.jpg", "Is the lung healthy?", "No", "CLOSED", location="Chest"),
    _row(21, "xmlab1/source.jpg", "这是什么成像方式?", "CT", lang="zh"),
    _row(22, "xmlab0/source.jpg", "Where is the liver?", "Left", "OPEN "),
]


def _src(root, train=TRAIN, validate=VALIDATE, test=TEST, images=("xmlab0", "xmlab1")):
    for name, rows in (("train", train), ("validate", validate), ("test", test)):
        os.makedirs(root, exist_ok=True)
        (root / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False))
    for folder in images:
        os.makedirs(root / "imgs" / folder)
        Image.new("RGB", (12, 12), (40, 40, 40)).save(root / "imgs" / folder / "source.jpg")
    return root


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_english_records_by_default(tmp_path):
    src = _src(tmp_path / "Slake1.0")
    paths = build_slake(str(tmp_path / "out"), str(src))
    assert set(paths) == {"train", "val", "test", "readme", "image_dir"}
    assert paths["image_dir"] == str((src / "imgs").resolve())
    train, val, test = (_read(paths[s]) for s in ("train", "val", "test"))
    assert [r["id"] for r in train] == ["slake-train-0", "slake-train-1"]
    assert [r["id"] for r in val] == ["slake-val-10"] and [r["id"] for r in test] == ["slake-test-20", "slake-test-22"]
    r = train[1]
    assert r["image"] == ["xmlab0/source.jpg"]
    assert r["conversations"] == [{"from": "human", "value": "<image>\nDoes the picture contain liver?"},
                                  {"from": "gpt", "value": "Yes"}]
    assert (r["answer"], r["answer_type"], r["q_lang"], r["content_type"], r["location"]) == (
        "Yes", "CLOSED", "en", "Organ", "Abdomen")
    assert r["triple"] == ["vhead", "_", "_"] and r["data_source"] == "slake" and r["split"] == "train"
    assert test[1]["answer_type"] == "OPEN"  # "OPEN " stripped
    readme = open(paths["readme"]).read()
    assert "| train.json | 2 | 1 (1 yes/no) | 1 | 1 |" in readme and "train.json: en 2, zh 1" in readme
    for split in ("train", "val", "test"):
        assert main(["data", "validate", paths[split], "--image-dir", paths["image_dir"]]) == 0


def test_language_selection(tmp_path):
    src = _src(tmp_path / "Slake1.0")
    zh = _read(build_slake(str(tmp_path / "zh"), str(src), lang="zh", splits="train,test")["test"])
    assert [(r["id"], r["answer"]) for r in zh] == [("slake-test-21", "CT")]
    both = _read(build_slake(str(tmp_path / "all"), str(src), lang="all", splits=["train"])["train"])
    assert [r["q_lang"] for r in both] == ["en", "en", "zh"]
    assert both[2]["question"] == "图片中包含肝脏吗?"
    with pytest.raises(ValueError, match="--lang must be one of en, zh, all"):
        build_slake(str(tmp_path / "x"), str(src), lang="fr")


def test_errors(tmp_path):
    src = _src(tmp_path / "a", test=[dict(TEST[0], answer_type="MAYBE")])
    with pytest.raises(SourceError, match=r"test.json, qid 20: field 'answer_type' must be OPEN or CLOSED"):
        build_slake(str(tmp_path / "o"), str(src))
    src = _src(tmp_path / "b", images=("xmlab0",))
    with pytest.raises(FileNotFoundError, match="slake-val-10: xmlab1/source.jpg"):
        build_slake(str(tmp_path / "ob"), str(src))
    assert not os.path.exists(tmp_path / "ob" / "train.json")  # nothing half-written
    src = _src(tmp_path / "c", train=[TRAIN[0], TRAIN[0]])
    with pytest.raises(SourceError, match="qid 0: qid repeats"):
        build_slake(str(tmp_path / "oc"), str(src))
    with pytest.raises(FileNotFoundError, match="SLAKE split file not found"):
        build_slake(str(tmp_path / "od"), str(tmp_path / "missing"))
