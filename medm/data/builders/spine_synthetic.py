"""A small synthetic set in the spine label schema (docs/spine_labels.md), for trying the spine pipeline offline.

    medm data build spine-synthetic --out data/spine_synth && medm data build spine --src data/spine_synth --out d

Each study is a stack of sagittal slices of a toy lumbar spine (six bright vertebral bodies with dark discs between)
with random labels for every task and the disc boxes of the positioning task.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from medm.data.builders.spine import DEFAULT_CLASSES, LEVELS, SCHEMA, SPLIT_FILES
from medm.registry import BUILDER


def _draw_study(rng: np.random.Generator, n_slices: int, size: int) -> tuple[list[np.ndarray], dict[str, list]]:
    """Sagittal slices of a toy lumbar spine: six bright vertebral bodies (L1..S1) with dark discs between, a
    slight curve, noise; the mid slices show the column brightest. Returns slices and disc boxes per level."""
    top, step = size * 0.12, size * 0.13
    height = step * 0.72
    width = size * 0.28
    bend = rng.uniform(-0.06, 0.06) * size
    centers = [size * 0.5 + bend * np.sin(np.pi * k / 5) for k in range(6)]
    base = np.full((size, size), 20.0)
    yy, xx = np.mgrid[0:size, 0:size]
    for k, cx in enumerate(centers):
        y0 = top + k * step
        base[(yy >= y0) & (yy < y0 + height) & (np.abs(xx - cx) < width / 2)] = 170.0
    boxes = {}
    for k, level in enumerate(LEVELS):
        y_gap0, y_gap1 = top + k * step + height, top + (k + 1) * step
        cx = (centers[k] + centers[k + 1]) / 2
        boxes[level] = [int(np.floor(cx - width / 2)), int(np.floor(y_gap0 - 1)), int(np.ceil(cx + width / 2)),
                        int(np.ceil(y_gap1 + 1))]
    slices = []
    for s in range(n_slices):
        fade = 1.0 - abs(s - (n_slices - 1) / 2) / n_slices
        img = base * fade + rng.normal(0, 6, base.shape)
        slices.append(np.clip(img, 0, 255).astype(np.uint8))
    return slices, boxes


def write_synthetic_spine(root: str, splits: dict[str, int] | None = None, n_slices: int = 8, size: int = 64,
                          seed: int = 0, unlabelled_test: bool = False) -> dict[str, str]:
    """Write a small synthetic set in the spine label schema: `root/{split}.json` and slice PNGs.

    Args:
        root: output folder (the `--src` of `medm data build spine`).
        splits: studies per split file, default {"train": 4, "dev": 2, "test": 2}.
        n_slices: sagittal slices per study.
        size: slice width and height in pixels.
        seed: labels and noise are drawn from it (same seed, same files).
        unlabelled_test: write the test studies' labels as null (a hidden-label test set).

    Returns:
        The label file per split and "image_dir" (= root).
    """
    splits = splits or {"train": 4, "dev": 2, "test": 2}
    rng = np.random.default_rng(seed)
    paths = {}
    k = 0
    for split, n in splits.items():
        studies = []
        for _ in range(n):
            sid = f"S{k:04d}"
            k += 1
            os.makedirs(os.path.join(root, sid), exist_ok=True)
            slices, boxes = _draw_study(rng, n_slices, size)
            names = []
            for s, img in enumerate(slices):
                names.append(f"{sid}/sag_{s:02d}.png")
                Image.fromarray(img, mode="L").save(os.path.join(root, names[-1]))
            hidden = unlabelled_test and split == "test"

            def draw(task: str) -> str | None:
                return None if hidden else str(rng.choice(DEFAULT_CLASSES[task]))

            studies.append({
                "study_id": sid, "sagittal": names, "qd": draw("qd"), "sl": draw("sl"),
                "zjppt": {level: draw("zjppt") for level in LEVELS},
                "zyzg": {level: draw("zyzg") for level in LEVELS},
                "positioning": {"slice": n_slices // 2, "boxes": None if hidden else boxes},
            })
        paths[split] = os.path.join(root, SPLIT_FILES.get(split, f"{split}.json"))
        with open(paths[split], "w") as f:
            json.dump({"schema": SCHEMA, "levels": list(LEVELS), "studies": studies}, f, indent=1)
    paths["image_dir"] = os.path.abspath(root)
    return paths


@BUILDER.register("spine-synthetic")
def build_spine_synthetic(out: str, n_train: int = 8, n_dev: int = 2, n_test: int = 2, n_slices: int = 8,
                          size: int = 64, seed: int = 0) -> dict[str, str]:
    """A synthetic spine label set in the challenge schema (docs/spine_labels.md), for trying the spine pipeline:
    `medm data build spine-synthetic --out d && medm data build spine --src d --out d/records`.

    Args:
        out: output directory (created): the label files and the image folders.
        n_train, n_dev, n_test: studies per split.
        n_slices: slices per series.
        size: slice side in pixels.
        seed: random seed; the same seed writes the same data.
    """
    return write_synthetic_spine(out, {"train": n_train, "dev": n_dev, "test": n_test}, n_slices, size, seed)
