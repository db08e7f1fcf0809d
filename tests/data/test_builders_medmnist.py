"""MedMNIST builder: fixtures in the real `.npz` layout (2D grey, colour, multi-label, 3D), errors, the CLI, and the
real PneumoniaMNIST / BreastMNIST files."""

import json

import numpy as np
import pytest
from PIL import Image

from medm.cli import main
from medm.data.annotations import load_records
from medm.data.builders._common import SourceError
from medm.data.builders.medmnist import MEDMNIST, build_medmnist


def _npz(path, images, labels):
    arrays = {}
    for split, (x, y) in zip(("train", "val", "test"), zip(images, labels)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    np.savez(path, **arrays)
    return str(path)


def _grey(rng, n, size=28):
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8)


def _read(path):
    with open(path) as f:
        return json.load(f)


def _validate(path, image_dir):
    assert main(["data", "validate", path, "--image-dir", image_dir]) == 0


def test_2d_grey_records_images_and_readme(tmp_path):
    rng = np.random.default_rng(0)
    xs = [_grey(rng, 5), _grey(rng, 3), _grey(rng, 4)]
    ys = [np.array([[0], [1], [1], [0], [1]], np.uint8), np.array([[1], [0], [0]], np.uint8),
          np.array([[0], [0], [1], [1]], np.uint8)]
    src = _npz(tmp_path / "pneumoniamnist.npz", xs, ys)
    paths = build_medmnist(str(tmp_path / "out"), src, flag="pneumoniamnist")
    assert set(paths) == {"train", "val", "test", "readme", "image_dir"}
    test = _read(paths["test"])
    assert [r["id"] for r in test] == [f"pneumoniamnist-test-{i}" for i in range(4)]
    r = test[2]
    assert r["answer"] == "pneumonia" and r["label"] == 1 and r["answer_type"] == "CLOSED"
    assert r["conversations"][1] == {"from": "gpt", "value": "pneumonia"}
    human = r["conversations"][0]["value"]
    assert human.startswith("<image>\nWhat does this chest X-ray show?")
    assert "Options: normal; pneumonia." in human and r["options"] == ["normal", "pneumonia"]
    # The PNG holds exactly the source pixels.
    png = np.array(Image.open(tmp_path / "out" / r["image"][0]))
    assert png.dtype == np.uint8 and np.array_equal(png, xs[2][2])
    assert [x["answer"] for x in _read(paths["train"])] == ["normal", "pneumonia", "pneumonia", "normal", "pneumonia"]
    readme = open(paths["readme"]).read()
    assert "| test.json | 4 | 4 | normal 2, pneumonia 2 |" in readme
    for split in ("train", "val", "test"):
        _validate(paths[split], paths["image_dir"])


def test_flat_labels_colour_images_limit_and_label_override(tmp_path):
    rng = np.random.default_rng(1)
    xs = [rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8) for _ in range(3)]
    ys = [np.array([0, 6, 3, 1, 2, 5], np.uint8)] * 3  # (N,) labels, as BreastMNIST ships them
    src = _npz(tmp_path / "derma.npz", xs, ys)
    paths = build_medmnist(str(tmp_path / "out"), src, flag="dermamnist", limit=3, splits="train")
    train = _read(paths["train"])
    assert set(paths) == {"train", "readme", "image_dir"} and len(train) == 3
    assert [r["answer"] for r in train] == ["actinic keratoses and intraepithelial carcinoma", "vascular lesions",
                                            "dermatofibroma"]
    img = Image.open(tmp_path / "out" / train[1]["image"][0])
    assert img.mode == "RGB" and np.array_equal(np.array(img), xs[0][1])
    names = [f"class {i}" for i in range(7)]
    relabelled = _read(build_medmnist(str(tmp_path / "o2"), src, flag="dermamnist", labels=names, limit=2,
                                      splits=["train"], question="Name the lesion.")["train"])
    assert relabelled[1]["answer"] == "class 6"
    assert relabelled[1]["conversations"][0]["value"].startswith("<image>\nName the lesion. Options: class 0; class 1")


def test_multi_label_chest(tmp_path):
    rng = np.random.default_rng(2)
    y = np.zeros((3, 14), np.uint8)
    y[0, [2, 4]] = 1  # effusion, mass
    y[2, 13] = 1
    src = _npz(tmp_path / "chest.npz", [_grey(rng, 3)] * 3, [y] * 3)
    records = _read(build_medmnist(str(tmp_path / "out"), src, flag="chestmnist", splits="val")["val"])
    assert [r["answer"] for r in records] == ["effusion, mass", "no finding", "hernia"]
    assert records[0]["label"] == y[0].tolist()
    assert "separated by commas" in records[0]["question"]


def test_3d_volumes_are_npy_with_image3d(tmp_path):
    rng = np.random.default_rng(3)
    vols = [rng.integers(0, 256, (2, 28, 28, 28), dtype=np.uint8) for _ in range(3)]
    src = _npz(tmp_path / "organmnist3d.npz", vols, [np.array([[6], [10]], np.uint8)] * 3)
    paths = build_medmnist(str(tmp_path / "out"), src, flag="organmnist3d", splits="test")
    records = _read(paths["test"])
    r = records[0]
    assert "image" not in r and r["image3d"] == ["volumes/organmnist3d_test_00000.npy"]
    assert r["conversations"][0]["value"].startswith("<image3d>\nWhich organ") and r["answer"] == "liver"
    assert records[1]["answer"] == "spleen"
    assert np.array_equal(np.load(tmp_path / "out" / r["image3d"][0]), vols[2][0])
    rec = load_records(paths["test"], for_training=True)[0]
    assert rec.image3d == r["image3d"] and rec.image == []
    _validate(paths["test"], paths["image_dir"])


def test_errors_name_the_sample_and_the_option(tmp_path):
    rng = np.random.default_rng(4)
    src = _npz(tmp_path / "bad.npz", [_grey(rng, 2)] * 3, [np.array([[0], [2]], np.uint8)] * 3)
    with pytest.raises(SourceError, match=r"bad.npz, train sample 1: class index 2 is outside 0..1"):
        build_medmnist(str(tmp_path / "o"), src, flag="pneumoniamnist")
    with pytest.raises(ValueError, match="--labels gives 3 name.*pneumoniamnist has 2 classes"):
        build_medmnist(str(tmp_path / "o"), src, flag="pneumoniamnist", labels="a,b,c")
    with pytest.raises(ValueError, match="unknown MedMNIST flag 'xraymnist'"):
        build_medmnist(str(tmp_path / "o"), src, flag="xraymnist")
    with pytest.raises(ValueError, match="without --flag, give --labels"):
        build_medmnist(str(tmp_path / "o"), src)
    with pytest.raises(SourceError, match=r"no val_images.*arrays in the file: train_images"):
        np.savez(tmp_path / "train_only.npz", train_images=_grey(rng, 1), train_labels=np.zeros((1, 1)))
        build_medmnist(str(tmp_path / "o"), str(tmp_path / "train_only.npz"), flag="breastmnist")
    with pytest.raises(FileNotFoundError, match="MedMNIST file not found"):
        build_medmnist(str(tmp_path / "o"), str(tmp_path / "nope.npz"), flag="breastmnist")
    # A custom set without a flag: names, dimensionality and question come from the options.
    records = _read(build_medmnist(str(tmp_path / "c"), src, labels=["no", "yes", "maybe"], dim=2, limit=2,
                                   splits="test")["test"])
    assert [r["answer"] for r in records] == ["no", "maybe"] and records[0]["data_source"] == "medmnist-medmnist"


def test_cli_build_passes_options(tmp_path, capsys):
    rng = np.random.default_rng(5)
    src = _npz(tmp_path / "breastmnist.npz", [_grey(rng, 4)] * 3, [np.array([0, 1, 1, 0], np.uint8)] * 3)
    out = tmp_path / "out"
    assert main(["data", "build", "medmnist", "--src", src, "--flag", "breastmnist", "--out", str(out),
                 "--limit", "2", "--splits", "test"]) == 0
    assert "test: " in capsys.readouterr().out
    records = _read(out / "test.json")
    assert [r["answer"] for r in records] == ["malignant", "normal, benign"]
    assert "Options: malignant; normal, benign." in records[0]["question"]


def test_label_table_is_consistent():
    assert len(MEDMNIST["pathmnist"].labels) == 9 and len(MEDMNIST["chestmnist"].labels) == 14
    assert len(MEDMNIST["organamnist"].labels) == 11 and MEDMNIST["organmnist3d"].dim == 3
    assert MEDMNIST["chestmnist"].multi_label and not MEDMNIST["dermamnist"].multi_label
    assert all(len(set(i.labels)) == len(i.labels) for i in MEDMNIST.values())


@pytest.mark.parametrize("flag,n_classes", [("pneumoniamnist", 2), ("breastmnist", 2)])
def test_real_medmnist_subset(shared_data, tmp_path, flag, n_classes):
    src = shared_data / "medmnist" / f"{flag}.npz"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    paths = build_medmnist(str(tmp_path / flag), str(src), flag=flag, limit=25)
    with np.load(src) as data:
        labels = data["test_labels"].reshape(-1)[:25]
        first = data["test_images"][0]
    test = _read(paths["test"])
    assert len(test) == 25
    assert [r["label"] for r in test] == labels.tolist()
    assert [r["answer"] for r in test] == [MEDMNIST[flag].labels[v] for v in labels]
    assert np.array_equal(np.array(Image.open(tmp_path / flag / test[0]["image"][0])), first)
    for split in ("train", "val", "test"):
        _validate(paths[split], paths["image_dir"])
