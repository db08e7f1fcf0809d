"""Synthetic phantom VQA: grayscale 'scans' with an organ outline and 0-2 bright lesions at known places.

Used by `medm demo` and tests. Answers come only from the image, so a model that learns beats the
majority-answer baseline and the same model on blank images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from medm.data.annotations import IMAGE_TOKEN
from medm.registry import BUILDER

QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
KINDS = ("presence", "count", "location", "size")


@dataclass
class Lesion:
    quadrant: int  # index into QUADRANTS
    size: str  # "large" | "small"
    cy: float
    cx: float
    r: float


def _draw(rng: np.random.Generator, size: int, lesions: list[Lesion]) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    # Organ: a filled ellipse of soft-tissue grey with a brighter rim, on dark background, plus noise.
    ay, ax = size * rng.uniform(0.40, 0.46), size * rng.uniform(0.40, 0.46)
    d = ((yy - c) / ay) ** 2 + ((xx - c) / ax) ** 2
    img = np.where(d <= 1.0, 90.0, 15.0)
    img += np.where(np.abs(d - 1.0) < 0.08, 60.0, 0.0)
    for les in lesions:
        img = np.where((yy - les.cy) ** 2 + (xx - les.cx) ** 2 <= les.r ** 2, 220.0, img)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _lesions(rng: np.random.Generator, size: int) -> list[Lesion]:
    n = rng.choice([0, 1, 2], p=[0.5, 0.25, 0.25])
    quads = rng.permutation(4)[:n]
    sizes = ["large", "small"] if n == 2 else [str(rng.choice(["large", "small"]))] * n
    out = []
    for q, s in zip(quads, sizes):
        r = rng.uniform(0.08, 0.11) * size if s == "large" else rng.uniform(0.03, 0.045) * size
        # Keep the lesion inside its quadrant and inside the organ.
        lo, hi = size * 0.22, size * 0.36
        off_y, off_x = rng.uniform(lo, hi - r * 0.3), rng.uniform(lo, hi - r * 0.3)
        cy = size / 2 - off_y if q in (0, 1) else size / 2 + off_y
        cx = size / 2 - off_x if q in (0, 2) else size / 2 + off_x
        out.append(Lesion(int(q), s, cy, cx, r))
    return out


def _questions(lesions: list[Lesion]) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for one image."""
    n = len(lesions)
    qs = [("presence", "Is there a lesion?", "yes" if n else "no"),
          ("count", "How many lesions are there?", str(n))]
    if n == 1:
        qs.append(("location", "Where is the lesion?", QUADRANTS[lesions[0].quadrant]))
        qs.append(("size", "How large is the lesion?", lesions[0].size))
    elif n == 2:
        for les in lesions:
            qs.append(("location", f"Where is the {les.size} lesion?", QUADRANTS[les.quadrant]))
    return qs


def _caption(lesions: list[Lesion]) -> str:
    if not lesions:
        return "A scan with no lesion."
    parts = [f"a {les.size} lesion in the {QUADRANTS[les.quadrant]}" for les in lesions]
    return "A scan with " + " and ".join(parts) + "."


@BUILDER.register("phantoms")
def build_phantoms(out: str, n_train: int = 4000, n_test: int = 200, size: int = 64, seed: int = 0) -> dict[str, str]:
    """Write `images/*.png`, `train.json`, `test.json` (VQA records) and `captions.json` (pretrain records).

    Args:
        out: output directory (created).
        n_train, n_test: number of training / test images (each gives several questions).
        size: image side in pixels.
        seed: random seed; the same seed writes the same data.

    Returns the written file paths by role. Test images are drawn after train images from the same seed,
    so no test image appears in training.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "test": [], "captions": []}
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        lesions = _lesions(rng, size)
        name = f"images/phantom_{i:05d}.png"
        Image.fromarray(_draw(rng, size, lesions), mode="L").save(os.path.join(out, name))
        for j, (kind, q, a) in enumerate(_questions(lesions)):
            splits[split].append({
                "id": f"phantom_{i:05d}_{j}", "image": [name], "question_type": kind, "answer": a,
                "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{q}"}, {"from": "gpt", "value": a}],
            })
        if split == "train":
            splits["captions"].append({
                "id": f"phantom_{i:05d}_cap", "image": [name],
                "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\nDescribe the image."},
                                  {"from": "gpt", "value": _caption(lesions)}],
            })
    paths = {}
    for split, records in splits.items():
        paths[split] = os.path.join(out, f"{split}.json")
        with open(paths[split], "w") as f:
            json.dump(records, f, indent=1)
    return paths
