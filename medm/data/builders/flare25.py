"""FLARE 2025 Task 5 (2D multimodal medical image understanding, `FLARE-MedFM/FLARE-Task5-MLLM-2D`): the
folder-of-datasets layout, 19 datasets in 8 modality categories, to medm records.

`medm data build flare25 --src data/FLARE-Task5-MLLM-2D --out data/flare25 [--splits train,val] [--datasets a,b]`

Source layout (as the challenge baselines' `prepare_data.py`, medfm-flare/FLARE25-QWen2.5VL, reads it)::

    <src>/training/<Category>/<dataset>/imagesTr/...            <dataset>_questions_train.json
    <src>/validation-public/<Category>/<dataset>/imagesVal/...  <dataset>_questions_val.json
    <src>/validation-hidden/<Category>/<dataset>/imagesVal/...  <dataset>_questions_val_withGT.json
    <src>/testing/<Category>/<dataset>/imagesTs/...             <dataset>_questions_test.json

Each questions file is a JSON list of `ImageName` (one file name, or a list of them for multi-image questions;
resolved by base name in the dataset's images folder), `Question`, `Answer` (may be a number; absent in test files),
`TaskType` (Classification, Multi-label Classification, Detection, Counting, Regression, Report Generation, ...),
`Modality`; other fields are kept. Categories are e.g. Retinography, Ultrasound, Xray, Clinical, Microscopy,
Endoscopy, Dermatology, Mammography.

medm records take several images, so a multi-image question keeps all of them, in order, one `<image>` placeholder
each (the baselines keep only the first). Output `<split>.json` (train, val, val-hidden, test), ids
`flare25-<split>-<dataset>-<row>`, fields `task_type`, `modality`, `category`, `dataset`; paths relative to `--src`.
Test questions without an answer become inference records (no gpt turn).
"""

from __future__ import annotations

import glob
import os
from typing import Any

from medm.data.builders._common import SourceError, as_list, check_images, read_json_list, text_field
from medm.data.builders._mc import check_unique, text_record, with_media, write_splits
from medm.registry import BUILDER

# split -> (top folder, images folder, questions file suffix)
SPLITS = {"train": ("training", "imagesTr", "_questions_train.json"),
          "val": ("validation-public", "imagesVal", "_questions_val.json"),
          "val-hidden": ("validation-hidden", "imagesVal", "_questions_val_withGT.json"),
          "test": ("testing", "imagesTs", "_questions_test.json")}
_MAPPED = ("ImageName", "Question", "Answer", "TaskType", "Modality")


def convert_row(row: Any, index: int, split: str, category: str, dataset: str, image_folder: str,
                where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise SourceError(f"{where}: expected an object, got {type(row).__name__}")
    names = row.get("ImageName")
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise SourceError(f"{where}: field 'ImageName' must be a file name or a list of them, got {names!r}")
    images = [os.path.join(image_folder, os.path.basename(n)) for n in names]
    fields = {k: v for k, v in row.items() if k not in _MAPPED}
    fields.update({"task_type": row.get("TaskType"), "modality": row.get("Modality"), "category": category,
                   "dataset": dataset, "n_images": len(images)})
    rid, question = f"flare25-{split}-{dataset}-{index}", text_field(row, "Question", where)
    if row.get("Answer") is None:
        return {"id": rid, "image": images, "conversations": [{"from": "human",
                                                               "value": with_media(question, len(images))}],
                "question": question, **fields, "data_source": "flare25", "split": split}
    return text_record(rid, images, question, text_field(row, "Answer", where), "flare25", split, fields)


def convert_dataset(src: str, split: str, category: str, dataset: str) -> list[dict[str, Any]]:
    top, images, suffix = SPLITS[split]
    folder = os.path.join(top, category, dataset)
    path = os.path.join(src, folder, dataset + suffix)
    return [convert_row(row, i, split, category, dataset, os.path.join(folder, images), f"{path}, row {i + 1}")
            for i, row in enumerate(read_json_list(path, "FLARE25 questions file"))]


@BUILDER.register("flare25")
def build_flare25(out: str, src: str, splits: Any = "train,val", datasets: Any = None,
                  check_images_exist: bool = True) -> dict[str, str]:
    """Convert the FLARE25 Task 5 folders under `src` into `out/<split>.json`.

    Args:
        out: output directory (created).
        src: the dataset root (`training/`, `validation-public/`, ...).
        splits: train, val, val-hidden, test (comma-separated).
        datasets: dataset folder names to keep (e.g. "IU_XRay,chestdr"); default all found.
        check_images_exist: fail, naming the questions, when an image file is missing.
    """
    keep = {str(d) for d in as_list(datasets, "datasets")}
    result = {}
    for split in (str(s) for s in as_list(splits, "splits")):
        if split not in SPLITS:
            raise ValueError(f"unknown FLARE25 split {split!r}; known: {', '.join(SPLITS)}")
        top, _, suffix = SPLITS[split]
        found = sorted(glob.glob(os.path.join(src, top, "*", "*", "*" + suffix)))
        pairs = [(p.split(os.sep)[-3], p.split(os.sep)[-2]) for p in found]
        pairs = [(c, d) for c, d in pairs if not keep or d in keep]
        if not pairs:
            pattern = os.path.join(src, top, "<Category>", "<dataset>", "<dataset>" + suffix)
            raise FileNotFoundError(f"no FLARE25 questions files {pattern}" + (f" for {sorted(keep)}" if keep else ""))
        result[split] = [r for c, d in pairs for r in convert_dataset(src, split, c, d)]
        check_unique(result[split], os.path.join(src, top))
    image_dir = os.path.abspath(src)
    if check_images_exist:
        for records in result.values():
            check_images(records, image_dir, "FLARE25")
    return write_splits(out, result, "FLARE 2025 Task 5 (2D)", f"medm data build flare25 --src {src} --out {out}",
                        image_dir, by="task_type",
                        notes=["Multi-image questions keep every image (`n_images`)."])
