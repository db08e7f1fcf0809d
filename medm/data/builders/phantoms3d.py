"""Synthetic 3D phantom VQA: small `.npy` volumes with a body outline and 0-2 bright lesions at known places.

Used by `medm demo --3d`, the 3D scripts' TINY=1 runs and tests. Answers come only from the voxels, so a model that
learns beats the majority-answer baseline and the same model on blanked volumes.

Geometry (depth first, `(D, H, W)`, as medm reads `.npy` volumes): the axes follow the RAS depth-first layout of
`medm.data.volumes`, so depth runs inferior -> superior and columns run patient left -> right. A lesion is on the
`left` when its centre column is below W / 2, and in the `lower`, `middle` or `upper` third by its centre slice
(`lower` = the first D / 3 slices). Every lesion lies wholly inside its third and its half, so no answer sits on a
border. Voxels are uint8: background ~15, body ~90 with a ~150 rim, lesions ~220, plus Gaussian noise (sd 8).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from medm.data.annotations import IMAGE3D_TOKEN
from medm.registry import BUILDER

SIDES = ("left", "right")
LEVELS = ("lower", "middle", "upper")  # thirds along depth, inferior -> superior
KINDS = ("presence", "count", "side", "level")
# Lesion radii as fractions of each axis (depth, rows, columns), drawn uniformly in these ranges.
_RADIUS = {"large": (0.12, 0.14), "small": (0.07, 0.085)}
LESION_VALUE, BODY_VALUE, RIM_VALUE, BACKGROUND_VALUE = 220.0, 90.0, 150.0, 15.0


@dataclass
class Lesion3D:
    """One ellipsoidal lesion, in voxel coordinates of a depth-first volume."""

    side: int  # index into SIDES
    level: int  # index into LEVELS
    size: str  # "large" | "small"
    center: tuple[float, float, float]  # (z, y, x)
    radius: tuple[float, float, float]  # (rz, ry, rx)

    def mask(self, shape: tuple[int, int, int]) -> np.ndarray:
        """(D, H, W) bool: the lesion's voxels."""
        zz, yy, xx = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]].astype(np.float32)
        (cz, cy, cx), (rz, ry, rx) = self.center, self.radius
        return ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _draw(rng: np.random.Generator, shape: tuple[int, int, int], lesions: list[Lesion3D]) -> np.ndarray:
    d, h, w = shape
    _, yy, xx = np.mgrid[0:d, 0:h, 0:w].astype(np.float32)
    # Body: an elliptic cylinder along depth (a torso), its cross-section slowly changing from slice to slice. Its
    # size varies little between volumes: a body that moves by voxels would swamp the lesions in what a
    # random-init encoder sees, and the demo model would take far longer to start reading them.
    zfrac = np.linspace(-1.0, 1.0, d, dtype=np.float32)[:, None, None]
    ay = h * rng.uniform(0.42, 0.44) * (1.0 - 0.05 * zfrac ** 2)
    ax = w * rng.uniform(0.44, 0.46) * (1.0 - 0.05 * zfrac ** 2)
    dist = ((yy - h / 2) / ay) ** 2 + ((xx - w / 2) / ax) ** 2
    vol = np.where(dist <= 1.0, BODY_VALUE, BACKGROUND_VALUE)
    vol = np.where(np.abs(dist - 1.0) < 0.12, RIM_VALUE, vol)
    for les in lesions:
        vol = np.where(les.mask(shape), LESION_VALUE, vol)
    vol = vol + rng.normal(0, 8, vol.shape)
    return np.clip(vol, 0, 255).astype(np.uint8)


def _span(first: int, last: int, r: float, rng: np.random.Generator) -> float:
    """A centre for a lesion of radius `r` whose voxels (|i - c| <= r) all lie in indices first..last."""
    r = min(r, (last - first) / 2 + 0.9)
    return float(rng.uniform(first - 0.9 + r, last + 0.9 - r))


def _lesions(rng: np.random.Generator, shape: tuple[int, int, int]) -> list[Lesion3D]:
    d, h, w = shape
    n = int(rng.choice([0, 1, 2], p=[0.5, 0.25, 0.25]))
    # Two lesions take distinct (side, level) cells and never leave them; on the same side they skip a third, and
    # the halves keep a gap at the midline, so two lesions never touch.
    cells = [(s, lv) for s in range(len(SIDES)) for lv in range(len(LEVELS))]
    pairs = [(a, b) for a in cells for b in cells if a < b and not (a[0] == b[0] and abs(a[1] - b[1]) == 1)]
    if n == 1:
        picked = [cells[int(rng.integers(len(cells)))]]
    elif n == 2:
        a, b = pairs[int(rng.integers(len(pairs)))]
        picked = [a, b] if rng.random() < 0.5 else [b, a]  # which one is the large lesion
    else:
        picked = []
    sizes = ["large", "small"] if n == 2 else [str(rng.choice(["large", "small"]))] * n
    out = []
    for (side, level), size in zip(picked, sizes):
        lo, hi = _RADIUS[size]
        rz, ry, rx = (float(rng.uniform(lo, hi) * n_) for n_ in (d, h, w))
        # Voxel indices of the lesion's third along depth, and of its half (short of the midline) across.
        first, last = int(np.ceil(level * d / 3)), int(np.ceil((level + 1) * d / 3)) - 1
        cz = _span(first, last, rz, rng)
        cy = float(rng.uniform(0.38, 0.62) * h)
        # Towards the body's edge by up to 12% of the width, from the midline.
        off = float(rng.uniform(0, 0.12) * w)
        left_last, right_first = int(np.ceil(w / 2)) - 2, int(w // 2) + 1
        cx = left_last + 0.9 - rx - off if side == 0 else right_first - 0.9 + rx + off
        out.append(Lesion3D(side, level, size, (cz, cy, cx), (rz, ry, rx)))
    return out


def _questions(lesions: list[Lesion3D]) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for one volume."""
    n = len(lesions)
    qs = [("presence", "Is there a lesion?", "yes" if n else "no"),
          ("count", "How many lesions are there?", str(n))]
    if n == 1:
        qs.append(("side", "Which side is the lesion on?", SIDES[lesions[0].side]))
        qs.append(("level", "Which third is the lesion in?", LEVELS[lesions[0].level]))
    elif n == 2:
        for les in lesions:
            qs.append(("side", f"Which side is the {les.size} lesion on?", SIDES[les.side]))
            qs.append(("level", f"Which third is the {les.size} lesion in?", LEVELS[les.level]))
    return qs


def _caption(lesions: list[Lesion3D]) -> str:
    if not lesions:
        return "A volume with no lesion."
    parts = [f"a {les.size} lesion on the {SIDES[les.side]} in the {LEVELS[les.level]} third" for les in lesions]
    return "A volume with " + " and ".join(parts) + "."


@BUILDER.register("phantoms3d")
def build_phantoms3d(out: str, n_train: int = 2000, n_test: int = 200,
                     shape: list[int] | tuple[int, ...] = (24, 32, 32), seed: int = 0) -> dict[str, str]:
    """Write `volumes/*.npy` (uint8, depth first), `train.json`, `test.json` (VQA records with `image3d`) and
    `captions.json` (pretrain records).

    Args:
        out: output directory (created).
        n_train, n_test: number of training / test volumes (each gives several questions).
        seed: random seed; the same seed writes the same data.
        shape: volume size (D, H, W), D >= 9 so each third holds a lesion. The default suits the demo model
            (configs/model/tiny-demo3d.yaml): 8x8x8 patches, three per depth, one per third.

    Every record carries `question_type` and `lesions` (side, level, size, centre and radii in voxels, depth first)
    for checks. Returns the written file paths by role. Test volumes are drawn after the training ones from the same
    seed, so no test volume appears in training.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1 or shape[0] < 9:
        raise ValueError(f"phantoms3d: shape {list(shape)} must be (D, H, W) with D >= 9 (three thirds of depth)")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "volumes"), exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "test": [], "captions": []}
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        lesions = _lesions(rng, shape)
        name = f"volumes/phantom3d_{i:05d}.npy"
        np.save(os.path.join(out, name), _draw(rng, shape, lesions))
        meta = [{**asdict(les), "side": SIDES[les.side], "level": LEVELS[les.level]} for les in lesions]
        for j, (kind, q, a) in enumerate(_questions(lesions)):
            splits[split].append({
                "id": f"phantom3d_{i:05d}_{j}", "image3d": [name], "question_type": kind, "answer": a,
                "lesions": meta,
                "conversations": [{"from": "human", "value": f"{IMAGE3D_TOKEN}\n{q}"}, {"from": "gpt", "value": a}],
            })
        if split == "train":
            splits["captions"].append({
                "id": f"phantom3d_{i:05d}_cap", "image3d": [name], "lesions": meta,
                "conversations": [{"from": "human", "value": f"{IMAGE3D_TOKEN}\nDescribe the volume."},
                                  {"from": "gpt", "value": _caption(lesions)}],
            })
    paths = {}
    for split, records in splits.items():
        paths[split] = os.path.join(out, f"{split}.json")
        with open(paths[split], "w") as f:
            json.dump(records, f, indent=1)
    return paths
