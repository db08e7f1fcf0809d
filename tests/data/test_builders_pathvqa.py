"""PathVQA builder on a fixture in the JSON layout beside the release's image tree (images/{split}/name.jpg)."""

import json
import os

import pytest
from PIL import Image

from medm.cli import main
from medm.data.builders._common import SourceError
from medm.data.builders.pathvqa import build_pathvqa

SPLITS = {
    "train": [{"image": "train_0422", "question": "Is there inflammation?", "answer": "yes"},
              {"image": "train_0422", "question": "What is present?", "answer": "granulomas"},
              {"image": "train_0007", "question": "Are the nuclei enlarged?", "answer": "No"}],
    "val": [{"image": "val_0001", "question": "How is the tissue stained?", "answer": "with h&e"}],
    "test": [{"image": "test_0001", "question": "Does this image show necrosis?", "answer": "yes", "qid": 77},
             {"image": "test_0001", "question": "What does this show?", "answer": "yes", "answer_type": "OPEN"}],
}


def _src(root, splits=SPLITS, skip_image=None):
    os.makedirs(root)
    for split, rows in splits.items():
        (root / f"{split}.json").write_text(json.dumps(rows))
        os.makedirs(root / "images" / split)
        for row in rows:
            if row["image"] != skip_image:
                Image.new("RGB", (10, 10), (200, 120, 160)).save(root / "images" / split / f"{row['image']}.jpg")
    return root


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_json_layout_to_records(tmp_path):
    src = _src(tmp_path / "pvqa")
    paths = build_pathvqa(str(tmp_path / "out"), str(src))
    assert paths["image_dir"] == str(src.resolve())
    train, test = _read(paths["train"]), _read(paths["test"])
    assert [r["id"] for r in train] == ["pathvqa-train-0", "pathvqa-train-1", "pathvqa-train-2"]
    assert train[0]["image"] == ["images/train/train_0422.jpg"] and train[0]["image_name"] == "train_0422"
    assert [r["answer_type"] for r in train] == ["CLOSED", "OPEN", "CLOSED"]  # yes / no -> CLOSED, "No" too
    assert train[1]["conversations"] == [{"from": "human", "value": "<image>\nWhat is present?"},
                                         {"from": "gpt", "value": "granulomas"}]
    assert test[0]["id"] == "pathvqa-test-77" and test[1]["answer_type"] == "OPEN"  # the source's type wins
    readme = open(paths["readme"]).read()
    assert "| train.json | 3 | 2 (2 yes/no) | 1 | 2 |" in readme
    for split in ("train", "val", "test"):
        assert main(["data", "validate", paths[split], "--image-dir", paths["image_dir"]]) == 0


def test_image_names_with_folder_and_extension(tmp_path):
    src = _src(tmp_path / "pvqa", {"test": SPLITS["test"]})
    (src / "test.json").write_text(json.dumps([{"image": "test/test_0001.jpg", "question": "Q?", "answer": "no"}]))
    paths = build_pathvqa(str(tmp_path / "out"), str(src), splits="test", image_folder="images")
    assert _read(paths["test"])[0]["image"] == ["images/test/test_0001.jpg"]


def test_errors(tmp_path):
    src = _src(tmp_path / "a", skip_image="val_0001")
    with pytest.raises(FileNotFoundError, match="pathvqa-val-0: images/val/val_0001.jpg"):
        build_pathvqa(str(tmp_path / "o"), str(src))
    src = _src(tmp_path / "b", {"train": [{"image": "x", "question": "Q?", "answer": ""}]})
    with pytest.raises(SourceError, match=r"train.json, row 0: field 'answer' must be a non-empty string"):
        build_pathvqa(str(tmp_path / "o"), str(src), splits="train")
    src = _src(tmp_path / "c", {"train": [{"image": "x", "question": "Q?", "answer": "a", "answer_type": "BOTH"}]})
    with pytest.raises(SourceError, match="answer_type' must be OPEN or CLOSED"):
        build_pathvqa(str(tmp_path / "o"), str(src), splits="train")
