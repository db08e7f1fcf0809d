"""The 3D phantom builder: every answer agrees with the voxels, records load, splits are disjoint, seeds repeat."""

import json
from collections import defaultdict

import numpy as np
import pytest

from medm.data.annotations import load_records
from medm.data.builders.phantoms3d import KINDS, LEVELS, SIDES, build_phantoms3d
from medm.data.volumes import VolumePreprocess
from medm.registry import BUILDER

# Lesions are ~220, the rim ~150 and the body ~90, each plus noise of sd 8: 185 splits lesion from the rest.
BRIGHT = 185


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """6-connected components of a boolean volume, each as an (n, 3) array of (z, y, x) voxels."""
    left = {tuple(v) for v in np.argwhere(mask)}
    out = []
    while left:
        stack, comp = [left.pop()], []
        while stack:
            z, y, x = stack.pop()
            comp.append((z, y, x))
            for dz, dy, dx in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
                n = (z + dz, y + dy, x + dx)
                if n in left:
                    left.remove(n)
                    stack.append(n)
        out.append(np.array(comp))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms3d")
    return out, build_phantoms3d(str(out), n_train=40, n_test=8, seed=3)


def _by_volume(path):
    groups = defaultdict(dict)
    for rec in json.loads(open(path).read()):
        groups[rec["image3d"][0]][rec["conversations"][0]["value"].split("\n", 1)[1]] = rec
    return groups


def test_answers_agree_with_the_lesion_voxels(built):
    """Counted from the voxels alone: how many bright blobs, which half and which third each lies in."""
    out, paths = built
    seen = set()
    for name, questions in {**_by_volume(paths["train"]), **_by_volume(paths["test"])}.items():
        vol = np.load(out / name)
        assert vol.dtype == np.uint8 and vol.shape == (24, 32, 32)
        d, _, w = vol.shape
        blobs = sorted(_components(vol > BRIGHT), key=len, reverse=True)  # large lesion first
        assert questions["Is there a lesion?"]["answer"] == ("yes" if blobs else "no"), name
        assert questions["How many lesions are there?"]["answer"] == str(len(blobs)), name
        seen.add(len(blobs))
        sizes = [""] if len(blobs) == 1 else ["large ", "small "]
        for blob, size in zip(blobs, sizes):
            halves = {SIDES[int(x >= w / 2)] for x in blob[:, 2]}
            thirds = {LEVELS[int(z // (d / 3))] for z in blob[:, 0]}
            assert len(halves) == 1 and len(thirds) == 1, f"{name}: a lesion crosses a border"
            assert questions[f"Which side is the {size}lesion on?"]["answer"] == halves.pop(), name
            assert questions[f"Which third is the {size}lesion in?"]["answer"] == thirds.pop(), name
        if len(blobs) == 2:
            assert len(blobs[0]) > len(blobs[1]), f"{name}: the large lesion is not the larger blob"
        # The stored geometry names the same voxels the blobs are made of.
        lesions = next(iter(questions.values()))["lesions"]
        assert len(lesions) == len(blobs), name
        zz, yy, xx = np.mgrid[0:24, 0:32, 0:32]
        union = np.zeros(vol.shape, bool)
        for les in lesions:
            (cz, cy, cx), (rz, ry, rx) = les["center"], les["radius"]
            union |= ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        assert np.array_equal(union, vol > BRIGHT), name
    assert seen == {0, 1, 2}  # every count occurs in 48 volumes


def test_records_load_with_kinds_and_disjoint_splits(built):
    out, paths = built
    train, test, captions = (load_records(paths[k]) for k in ("train", "test", "captions"))
    assert {r.extra["question_type"] for r in train} == set(KINDS)
    assert all(r.image3d and not r.image and r.conversations[0]["value"].startswith("<image3d>") for r in train)
    assert {r.image3d[0] for r in test}.isdisjoint({r.image3d[0] for r in train})
    assert len(captions) == 40 and {r.image3d[0] for r in captions} == {r.image3d[0] for r in train}
    assert "third" in captions[0].conversations[1]["value"] or "no lesion" in captions[0].conversations[1]["value"]
    # The volumes read through the 3D preprocessing as uint8 -> [0, 1], depth first.
    x = VolumePreprocess({"intensity": "uint8"}, [24, 32, 32], channels=1)(out / train[0].image3d[0])
    assert x.shape == (1, 24, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_same_seed_same_volumes_other_seed_others(tmp_path):
    a = build_phantoms3d(str(tmp_path / "a"), n_train=3, n_test=1, shape=(9, 12, 12), seed=5)
    b = build_phantoms3d(str(tmp_path / "b"), n_train=3, n_test=1, shape=(9, 12, 12), seed=5)
    build_phantoms3d(str(tmp_path / "c"), n_train=3, n_test=1, shape=(9, 12, 12), seed=6)
    name = "volumes/phantom3d_00003.npy"
    assert np.load(tmp_path / "a" / name).shape == (9, 12, 12)
    assert np.array_equal(np.load(tmp_path / "a" / name), np.load(tmp_path / "b" / name))
    assert not np.array_equal(np.load(tmp_path / "a" / name), np.load(tmp_path / "c" / name))
    assert open(a["train"]).read() == open(b["train"]).read()


def test_bad_shape_is_named_and_builder_is_registered(tmp_path):
    with pytest.raises(ValueError, match=r"phantoms3d: shape \[6, 32, 32\] .*D >= 9"):
        build_phantoms3d(str(tmp_path), n_train=1, n_test=0, shape=(6, 32, 32))
    assert BUILDER.get("phantoms3d") is build_phantoms3d
