"""VQA-RAD builder: a small fixture in both real layouts (rows shaped like the release files), and the real data."""

import json
import os

import pytest
from PIL import Image

from medm.data.annotations import load_records
from medm.data.builders.vqa_rad import VqaRadError, build_vqa_rad

# Rows copied in shape from split/trainset.json / testset.json, with the release's quirks: an integer answer and
# an answer_type with a trailing space.
TRAIN = [
    {"qid": 1, "image_name": "synpic1.jpg", "image_organ": "HEAD", "answer": "Yes", "answer_type": "CLOSED",
     "question_type": "PRES", "question": "Are regions of the brain infarcted?", "phrase_type": "freeform"},
    {"qid": 2, "image_name": "synpic2.jpg", "image_organ": "ABD", "answer": 4, "answer_type": "OPEN",
     "question_type": "COUNT", "question": "How many gallstones are identified?", "phrase_type": "freeform"},
    {"qid": 3, "image_name": "synpic2.jpg", "image_organ": "ABD", "answer": "Maybe", "answer_type": "CLOSED ",
     "question_type": "Other", "question": "Is this an infectious process?", "phrase_type": "frame"},
]
TEST = [
    {"qid": 11, "image_name": "synpic1.jpg", "image_organ": "HEAD", "answer": "MRI", "answer_type": "CLOSED",
     "question_type": "MODALITY", "question": "Is this an MRI or a CT scan?", "phrase_type": "freeform"},
    {"qid": 13, "image_name": "synpic2.jpg", "image_organ": "ABD", "answer": "Liver", "answer_type": "OPEN",
     "question_type": "ORGAN", "question": "What organ is enlarged?", "phrase_type": "para"},
]
# Shaped like "VQA_RAD Dataset Public.json": a string qid "0" beside integer ones, MedPix case fields.
PUBLIC = [
    {"qid": "0", "phrase_type": "freeform", "qid_linked_id": "03f451ca", "image_case_url": "https://medpix/case?id=1",
     "image_name": "synpic1.jpg", "image_organ": "HEAD", "evaluation": "not evaluated",
     "question": "Are regions of the brain infarcted?", "question_rephrase": "NULL", "question_relation": "NULL",
     "question_frame": "NULL", "question_type": "PRES", "answer": "Yes", "answer_type": "CLOSED"},
    {"qid": 1511, "phrase_type": "freeform", "qid_linked_id": "06e26b2c", "image_case_url": "https://medpix/case?id=2",
     "image_name": "synpic2.jpg", "image_organ": "ABD", "evaluation": "not evaluated",
     "question": "How many gallstones are identified?", "question_relation": "NULL", "question_frame": "NULL",
     "question_type": "COUNT", "answer": 4, "answer_type": "OPEN"},
    {"qid": 2156, "phrase_type": "freeform", "qid_linked_id": "0a1b", "image_case_url": "https://medpix/case?id=3",
     "image_name": "synpic2.jpg", "image_organ": "ABD", "evaluation": "not evaluated",
     "question": "Is this an infectious process?", "question_rephrase": "NULL", "question_relation": "NULL",
     "question_frame": "NULL", "question_type": "OTHER", "answer": "Maybe", "answer_type": "CLOSED "},
]


def _write_src(root, train=TRAIN, test=TEST, public=PUBLIC, images=("synpic1.jpg", "synpic2.jpg", "synpic9.jpg")):
    os.makedirs(root / "split")
    os.makedirs(root / "images")
    (root / "split" / "trainset.json").write_text(json.dumps(train))
    (root / "split" / "testset.json").write_text(json.dumps(test))
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(public))
    for name in images:
        Image.new("L", (8, 8), 128).save(root / "images" / name)
    return root


@pytest.fixture
def src(tmp_path):
    return _write_src(tmp_path / "vqa_rad")


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_split_layout_writes_train_and_test_records(src, tmp_path):
    out = tmp_path / "out"
    paths = build_vqa_rad(str(out), str(src))
    assert set(paths) == {"train", "test", "readme", "image_dir"}
    assert paths["image_dir"] == str((src / "images").resolve())
    train, test = _read(paths["train"]), _read(paths["test"])
    assert [r["id"] for r in train] == ["vqa-rad-train-1", "vqa-rad-train-2", "vqa-rad-train-3"]
    assert [r["id"] for r in test] == ["vqa-rad-test-11", "vqa-rad-test-13"]
    r = test[0]
    assert r["image"] == ["synpic1.jpg"]  # relative to image_dir
    assert r["conversations"] == [{"from": "human", "value": "<image>\nIs this an MRI or a CT scan?"},
                                  {"from": "gpt", "value": "MRI"}]
    assert (r["answer"], r["answer_type"], r["question_type"], r["image_organ"]) == ("MRI", "CLOSED", "MODALITY",
                                                                                      "HEAD")
    assert r["question"] == "Is this an MRI or a CT scan?"  # kept for the strict protocol's choice questions
    assert (r["qid"], r["phrase_type"], r["image_name"], r["split"]) == (11, "freeform", "synpic1.jpg", "test")
    # The release's quirks are cleaned: integer answer -> string (in both places), "CLOSED " -> "CLOSED".
    assert train[1]["answer"] == "4" and train[1]["conversations"][1]["value"] == "4"
    assert train[2]["answer_type"] == "CLOSED" and train[2]["question_type"] == "OTHER"
    # The records are valid medm training records whose images resolve against image_dir.
    recs = load_records(paths["test"], for_training=True)
    assert all(os.path.isfile(os.path.join(paths["image_dir"], x.image[0])) for x in recs)


def test_split_readme_counts_and_leakage_note(src, tmp_path):
    paths = build_vqa_rad(str(tmp_path / "out"), str(src))
    readme = open(paths["readme"]).read()
    assert "| train.json | 3 | 2 (1 yes/no, 1 other) | 1 | 2 |" in readme
    assert "| test.json | 2 | 1 (0 yes/no, 1 other) | 1 | 2 |" in readme
    assert "1 numeric answer(s)" in readme and "1 answer_type value(s)" in readme
    assert "split is by question" in readme and "2 of the 2 test images also appear in training" in readme
    assert "synpic9.jpg" in readme  # an image no question uses
    assert f"--image-dir {paths['image_dir']}" in readme


def test_public_layout_writes_all_json(src, tmp_path):
    paths = build_vqa_rad(str(tmp_path / "pub"), str(src), layout="public")
    assert set(paths) == {"all", "readme", "image_dir"}
    rows = _read(paths["all"])
    assert [r["id"] for r in rows] == ["vqa-rad-all-0", "vqa-rad-all-1511", "vqa-rad-all-2156"]
    assert rows[1]["answer"] == "4" and rows[2]["answer_type"] == "CLOSED"
    assert rows[0]["image_case_url"] == "https://medpix/case?id=1"  # source fields kept
    assert "question_rephrase" not in rows[1]  # ... as written, nothing invented
    assert not os.path.exists(tmp_path / "pub" / "train.json")


def test_absolute_paths(src, tmp_path):
    paths = build_vqa_rad(str(tmp_path / "out"), str(src), absolute_paths=True)
    for r in _read(paths["train"]):
        assert os.path.isabs(r["image"][0]) and os.path.isfile(r["image"][0])
    assert "Image paths are absolute" in open(paths["readme"]).read()


def test_errors_name_file_qid_and_field(tmp_path):
    bad_type = [dict(TEST[0], answer_type="MAYBE")]
    root = _write_src(tmp_path / "a", test=bad_type)
    with pytest.raises(VqaRadError, match=r"testset.json, qid 11: field 'answer_type' .*'MAYBE'"):
        build_vqa_rad(str(tmp_path / "out_a"), str(root))
    root = _write_src(tmp_path / "b", test=[dict(TEST[0], answer=None)])
    with pytest.raises(VqaRadError, match="qid 11: field 'answer'"):
        build_vqa_rad(str(tmp_path / "out_b"), str(root))
    root = _write_src(tmp_path / "c", test=[TEST[0], TEST[0]])
    with pytest.raises(VqaRadError, match="qid 11: qid repeats"):
        build_vqa_rad(str(tmp_path / "out_c"), str(root))
    root = _write_src(tmp_path / "d", images=("synpic1.jpg",))
    with pytest.raises(FileNotFoundError, match="vqa-rad-train-2: synpic2.jpg"):
        build_vqa_rad(str(tmp_path / "out_d"), str(root))
    assert not os.path.exists(tmp_path / "out_d" / "train.json")  # nothing half-written
    build_vqa_rad(str(tmp_path / "out_d"), str(root), check_images=False)  # unless asked
    with pytest.raises(FileNotFoundError, match=r"split/trainset.json .*layout 'public' reads VQA_RAD Dataset"):
        build_vqa_rad(str(tmp_path / "out_e"), str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="layout 'csv'"):
        build_vqa_rad(str(tmp_path / "out_f"), str(root), layout="csv")


def test_registered_as_vqa_rad():
    from medm.registry import BUILDER

    assert BUILDER.get("vqa-rad") is build_vqa_rad


def test_real_vqa_rad(shared_data, tmp_path):
    src = shared_data / "vqa_rad"
    if not (src / "split" / "testset.json").is_file():
        pytest.skip(f"VQA-RAD split not found under {src}")
    paths = build_vqa_rad(str(tmp_path / "split"), str(src))
    test, train = _read(paths["test"]), _read(paths["train"])
    assert len(test) == 451 and len(train) == 3064
    assert sum(r["answer_type"] == "CLOSED" for r in test) == 272
    assert sum(r["answer_type"] == "OPEN" for r in test) == 179
    for r in test + train:
        assert isinstance(r["answer"], str) and r["answer"] == r["conversations"][1]["value"]
        assert r["answer_type"] in ("CLOSED", "OPEN")
    readme = open(paths["readme"]).read()
    assert "203 of the 203 test images also appear in training" in readme
    public = _read(build_vqa_rad(str(tmp_path / "pub"), str(src), layout="public")["all"])
    assert len(public) == 2248
    assert all(isinstance(r["answer"], str) for r in public)
    assert sum(r["answer_type"] == "CLOSED" for r in public) == 1299  # 1297 + the two "CLOSED " rows
