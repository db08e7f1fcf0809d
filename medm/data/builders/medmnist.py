"""MedMNIST v2 (Yang et al. 2023) `.npz` files to classification-as-VQA records.

`medm data build medmnist --src pneumoniamnist.npz --out data/pneumoniamnist [--flag pneumoniamnist] [--limit 200]`

Without `--flag` (and `--labels`), the flag is the file's name as MedMNIST publishes it: `breastmnist.npz`,
`organmnist3d_64.npz` (MedMNIST+ sizes) -> breastmnist, organmnist3d.

Source layout: one `.npz` per dataset with `{split}_images` and `{split}_labels` for split in train / val / test.
Images are (N, H, W) grey or (N, H, W, 3) colour for 2D sets, (N, D, H, W) for 3D sets; labels are (N, 1) or (N,)
class indices, or (N, C) 0/1 for the multi-label ChestMNIST.

Every sample becomes a multiple-choice question that lists the classes, answered by the class name::

    {"id": "pneumoniamnist-test-0", "image": ["images/pneumoniamnist_test_00000.png"],
     "conversations": [{"from": "human", "value": "<image>\\nWhat does this chest X-ray show? Options: normal;
                        pneumonia. Answer with one option."}, {"from": "gpt", "value": "pneumonia"}],
     "answer": "pneumonia", "answer_type": "CLOSED", "question": "...", "options": ["normal", "pneumonia"],
     "label": 1, "data_source": "medmnist-pneumoniamnist", "split": "test"}

2D images are written as PNG (`images/`), 3D volumes as `.npy` arrays (D, H, W) under `volumes/` and referenced by
`image3d` with an `<image3d>` placeholder. Multi-label answers list the present findings, comma-separated, in class
order, or "no finding". Paths are relative to `--out` (returned as `image_dir`).

Label names are MedMNIST's own (`medmnist.INFO[flag]["label"]`), written as published; `--labels a,b,c` (or a
YAML list, for names holding commas) replaces them, and `--question` replaces the question stem.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from medm.data.annotations import IMAGE3D_TOKEN, IMAGE_TOKEN, write_json_records
from medm.data.builders._common import SourceError, as_list, image_dir_note, markdown_table, write_readme
from medm.registry import BUILDER

SPLITS = ("train", "val", "test")
NO_FINDING = "no finding"  # multi-label answer when no class is present ("none" would normalise to "0")


@dataclass(frozen=True)
class MedMnistInfo:
    """What a MedMNIST flag holds: its class names in label order, dimensionality and task, and the question."""

    labels: tuple[str, ...]
    question: str
    dim: int = 2
    multi_label: bool = False


_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
           "lung-right", "pancreas", "spleen")

# MedMNIST v2 label names (medmnist/info.py), in label-index order.
MEDMNIST: dict[str, MedMnistInfo] = {
    "pathmnist": MedMnistInfo(
        ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
         "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
        "Which tissue type does this colorectal histology patch show?"),
    "chestmnist": MedMnistInfo(
        ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia", "pneumothorax",
         "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"),
        "Which of these findings does this chest X-ray show?", multi_label=True),
    "dermamnist": MedMnistInfo(
        ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma", "benign keratosis-like lesions",
         "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions"),
        "What is the diagnosis of the skin lesion in this dermatoscopic image?"),
    "octmnist": MedMnistInfo(
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        "What does this retinal OCT image show?"),
    "pneumoniamnist": MedMnistInfo(("normal", "pneumonia"), "What does this chest X-ray show?"),
    "retinamnist": MedMnistInfo(("0", "1", "2", "3", "4"),
                                "What is the diabetic retinopathy grade (0 to 4) of this fundus image?"),
    "breastmnist": MedMnistInfo(("malignant", "normal, benign"), "What does this breast ultrasound image show?"),
    "bloodmnist": MedMnistInfo(
        ("basophil", "eosinophil", "erythroblast",
         "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
         "neutrophil", "platelet"),
        "Which type of blood cell does this microscope image show?"),
    "tissuemnist": MedMnistInfo(
        ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
         "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
         "Thick Ascending Limb"),
        "Which kidney cortex cell type does this microscope image show?"),
    "organamnist": MedMnistInfo(_ORGANS, "Which organ is at the centre of this axial abdominal CT image?"),
    "organcmnist": MedMnistInfo(_ORGANS, "Which organ is at the centre of this coronal abdominal CT image?"),
    "organsmnist": MedMnistInfo(_ORGANS, "Which organ is at the centre of this sagittal abdominal CT image?"),
    "organmnist3d": MedMnistInfo(_ORGANS, "Which organ does this abdominal CT volume show?", dim=3),
    "nodulemnist3d": MedMnistInfo(("benign", "malignant"), "Is the lung nodule in this chest CT volume benign or "
                                                           "malignant?", dim=3),
    "adrenalmnist3d": MedMnistInfo(("normal", "hyperplasia"), "Does this adrenal gland shape volume show a normal "
                                                              "gland or hyperplasia?", dim=3),
    "fracturemnist3d": MedMnistInfo(("buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"),
                                    "Which type of rib fracture does this chest CT volume show?", dim=3),
    "vesselmnist3d": MedMnistInfo(("vessel", "aneurysm"), "Is this brain vessel segment from MR angiography a "
                                                          "healthy vessel or an aneurysm?", dim=3),
    "synapsemnist3d": MedMnistInfo(("inhibitory synapse", "excitatory synapse"),
                                   "Which type of synapse does this electron microscopy volume show?", dim=3),
}


def prompt(info: MedMnistInfo, question: str | None = None) -> str:
    """The human turn text after the placeholder: question stem, the options, and how to answer."""
    stem = question or info.question
    options = "; ".join(info.labels)
    how = ("Answer with every finding present, separated by commas, or \"no finding\"." if info.multi_label
           else "Answer with one option.")
    return f"{stem} Options: {options}. {how}"


def answer_of(label: np.ndarray, info: MedMnistInfo, where: str) -> tuple[str, Any]:
    """(answer text, JSON label) of one sample's label row; raises SourceError on an out-of-range label."""
    flat = np.asarray(label).reshape(-1)
    n = len(info.labels)
    if info.multi_label:
        if flat.size != n or not np.isin(flat, (0, 1)).all():
            raise SourceError(f"{where}: multi-label row must be {n} values of 0/1, got {flat.tolist()}")
        present = [info.labels[i] for i in np.flatnonzero(flat)]
        return (", ".join(present) if present else NO_FINDING), [int(v) for v in flat]
    if flat.size != 1:
        raise SourceError(f"{where}: expected one class index, got {flat.tolist()} (a multi-label set? its flag "
                          "must be multi-label)")
    value = int(flat[0])
    if not 0 <= value < n or value != flat[0]:
        raise SourceError(f"{where}: class index {flat[0].item()!r} is outside 0..{n - 1} ({n} label names)")
    return info.labels[value], value


def _resolve_info(flag: str | None, labels: Any, dim: int | None, multi_label: bool | None) -> MedMnistInfo:
    names = tuple(str(v) for v in as_list(labels, "labels"))
    if flag is not None:
        if flag not in MEDMNIST:
            raise ValueError(f"unknown MedMNIST flag {flag!r}; known: {', '.join(sorted(MEDMNIST))} (or leave "
                             "--flag out and give --labels and --dim)")
        base = MEDMNIST[flag]
        if names and len(names) != len(base.labels):
            raise ValueError(f"--labels gives {len(names)} name(s) but {flag} has {len(base.labels)} classes: "
                             f"{', '.join(base.labels)}")
        return MedMnistInfo(names or base.labels, base.question, dim or base.dim,
                            base.multi_label if multi_label is None else multi_label)
    if not names or dim not in (2, 3):
        raise ValueError("without --flag, give --labels (class names in label order) and --dim 2 or 3")
    return MedMnistInfo(names, "What does this image show?", dim, bool(multi_label))


def flag_of(src: str) -> str | None:
    """The MedMNIST flag a file is named after, as published (`breastmnist.npz`, `organmnist3d_64.npz`), or None."""
    stem = re.sub(r"_\d+$", "", os.path.basename(src).removesuffix(".npz").lower())
    return stem if stem in MEDMNIST else None


def _write_sample(array: np.ndarray, info: MedMnistInfo, out: str, rel: str, where: str) -> None:
    path = os.path.join(out, rel)
    if info.dim == 3:
        if array.ndim != 3:
            raise SourceError(f"{where}: a 3D sample must be (D, H, W), got shape {array.shape}")
        np.save(path, np.ascontiguousarray(array))
        return
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise SourceError(f"{where}: a 2D sample must be (H, W) or (H, W, 3), got shape {array.shape} (a 3D set? "
                          "pass --dim 3)")
    if array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 255:
            raise SourceError(f"{where}: pixel values {array.min()}..{array.max()} are outside 0..255")
        array = array.astype(np.uint8)
    Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB").save(path)


@BUILDER.register("medmnist")
def build_medmnist(out: str, src: str, flag: str | None = None, labels: Any = None, question: str | None = None,
                   splits: Any = "train,val,test", limit: int | None = None, dim: int | None = None,
                   multi_label: bool | None = None) -> dict[str, str]:
    """Convert one MedMNIST `.npz` into `out/{split}.json` records, `out/images/*.png` or `out/volumes/*.npy`.

    Args:
        out: output directory (created).
        src: the `.npz` file (e.g. `pneumoniamnist.npz`, `organmnist3d_64.npz`).
        flag: MedMNIST dataset flag (a key of `MEDMNIST` here: pneumoniamnist, chestmnist, organmnist3d, ...);
            picks the label names, question, dimensionality and task. Default (without `labels`): the file name's
            (`breastmnist.npz`, `organmnist3d_64.npz`) when it is a known flag.
        labels: class names in label order, replacing the flag's (comma-separated or a YAML list).
        question: question stem replacing the flag's; the options and answering rule are appended.
        splits: splits to convert (comma-separated or a list); each needs `{split}_images` / `{split}_labels`.
        limit: convert only the first `limit` samples of each split (quick subsets).
        dim: 2 or 3; only needed without a flag (or to override it).
        multi_label: labels are (N, C) 0/1 rows; only needed without a flag.

    Returns:
        Written paths by role (each split, "readme") and "image_dir" (= `out`, the base of the image paths).

    Raises:
        FileNotFoundError: no such `.npz`. SourceError: missing arrays, shape mismatches, out-of-range labels.
    """
    if flag is None and labels is None:
        flag = flag_of(src)
    info = _resolve_info(flag, labels, dim, multi_label)
    name = flag or "medmnist"
    if not os.path.isfile(src):
        raise FileNotFoundError(f"MedMNIST file not found: {src}")
    split_names = [str(s) for s in as_list(splits, "splits")]
    if limit is not None and int(limit) < 1:
        raise ValueError(f"--limit must be a positive number of samples per split, got {limit!r}")
    media_dir = "volumes" if info.dim == 3 else "images"
    os.makedirs(os.path.join(out, media_dir), exist_ok=True)
    paths: dict[str, str] = {}
    counts: dict[str, tuple[int, int, Counter]] = {}
    with np.load(src) as data:
        for split in split_names:
            keys = (f"{split}_images", f"{split}_labels")
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise SourceError(f"{src}: no {' or '.join(missing)} (arrays in the file: {', '.join(data.files)})")
            images, ys = data[keys[0]], data[keys[1]]
            if len(images) != len(ys):
                raise SourceError(f"{src}: {keys[0]} has {len(images)} samples but {keys[1]} has {len(ys)}")
            n = len(images) if limit is None else min(len(images), int(limit))
            records, answers = [], Counter()
            for i in range(n):
                where = f"{src}, {split} sample {i}"
                answer, label = answer_of(ys[i], info, where)
                rel = os.path.join(media_dir, f"{name}_{split}_{i:05d}" + (".npy" if info.dim == 3 else ".png"))
                _write_sample(images[i], info, out, rel, where)
                token = IMAGE3D_TOKEN if info.dim == 3 else IMAGE_TOKEN
                text = prompt(info, question)
                records.append({
                    "id": f"{name}-{split}-{i}", ("image3d" if info.dim == 3 else "image"): [rel],
                    "conversations": [{"from": "human", "value": f"{token}\n{text}"},
                                      {"from": "gpt", "value": answer}],
                    "answer": answer, "answer_type": "CLOSED", "question": text, "options": list(info.labels),
                    "label": label, "data_source": f"medmnist-{name}", "split": split,
                })
                answers.update(answer.split(", ") if info.multi_label and answer != NO_FINDING else [answer])
            paths[split] = os.path.join(out, f"{split}.json")
            write_json_records(paths[split], records)
            counts[split] = (n, len(images), answers)
    paths["readme"] = write_readme(os.path.join(out, "README.md"), _readme(src, out, name, info, counts, limit))
    paths["image_dir"] = os.path.abspath(out)
    return paths


def _readme(src: str, out: str, name: str, info: MedMnistInfo, counts: dict[str, tuple[int, int, Counter]],
            limit: int | None) -> list[str]:
    rows = []
    for split, (n, total, answers) in counts.items():
        classes = ", ".join(f"{lab} {answers[lab]}" for lab in (*info.labels, NO_FINDING) if answers[lab])
        rows.append((f"{split}.json", n, total, classes))
    lines = [f"# MedMNIST {name} (medm records)", "",
             f"Built by `medm data build medmnist --src {src} --out {out}` ({info.dim}D, "
             f"{'multi-label' if info.multi_label else 'single-label'}, {len(info.labels)} classes"
             + (f", first {limit} samples per split" if limit is not None else "") + ").", "",
             image_dir_note(os.path.abspath(out)), "", "Question: " + prompt(info), ""]
    lines += markdown_table(("file", "records", "samples in source", "answers per class"), rows)
    return lines
