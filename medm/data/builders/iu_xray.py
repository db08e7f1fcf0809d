"""IU X-ray (Demner-Fushman et al. 2016) in R2Gen's split (Chen et al. 2020): chest X-ray report generation, to
medm records. MIMIC-CXR's R2Gen `annotation.json` has the same layout (one image per study) and builds the same way.

`medm data build iu-xray --src data/iu_xray --out data/iu_xray_records [--splits train,val,test]`

Source layout (R2Gen `data/iu_xray`, read by its `modules/datasets.py`)::

    iu_xray/annotation.json     {"train": [...], "val": [...], "test": [...]}
    iu_xray/images/CXR2384_IM-0942/0.png  1.png

Each item: `id` ("CXR2384_IM-0942"), `report` (findings text), `image_path` (list: IU X-ray has two views per
study, frontal and lateral, relative to `images/`), `split`. Every image of a study goes into the record's `image`
(medm records take several images; each gets its own `<image>` placeholder), the reference report is the answer.
Ids `iu-xray-<split>-<id>`; `--prompt` sets the instruction (R2Gen has none: its model only sees the images).
"""

from __future__ import annotations

import os
from typing import Any

from medm.data.builders._common import SourceError, as_list, check_images, read_json, text_field
from medm.data.builders._mc import check_unique, text_record, write_splits
from medm.registry import BUILDER

PROMPT = "Describe the findings of this chest X-ray."


def convert_item(item: Any, split: str, where: str, image_folder: str, prompt: str, source: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise SourceError(f"{where}: expected an object, got {type(item).__name__}")
    images = item.get("image_path")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
        raise SourceError(f"{where}: field 'image_path' must list image paths, got {item.get('image_path')!r}")
    fields = {k: v for k, v in item.items() if k not in ("id", "report", "image_path", "split")}
    sid = text_field(item, "id", where)
    return text_record(f"{source}-{split}-{sid}", [os.path.join(image_folder, p) for p in images], prompt,
                       text_field(item, "report", where), source, split, {**fields, "study_id": sid})


def convert_file(path: str, splits: Any = "test", image_folder: str = "images", prompt: str = PROMPT,
                 source: str = "iu-xray") -> dict[str, list[dict[str, Any]]]:
    data = read_json(path, "R2Gen annotation file")
    out = {}
    for split in (str(s) for s in as_list(splits, "splits")):
        if not isinstance(data, dict) or not isinstance(data.get(split), list):
            raise SourceError(f"{path}: expected an object with a {split!r} list (train / val / test)")
        out[split] = [convert_item(it, split, f"{path}, {split}[{i}]", image_folder, prompt, source)
                      for i, it in enumerate(data[split])]
        check_unique(out[split], f"{path}, {split}")
    return out


@BUILDER.register("iu-xray")
def build_iu_xray(out: str, src: str, splits: Any = "train,val,test", annotation: str = "annotation.json",
                  image_folder: str = "images", prompt: str = PROMPT, check_images_exist: bool = True
                  ) -> dict[str, str]:
    """Convert R2Gen's `annotation.json` under `src` into `out/{train,val,test}.json`.

    Args:
        out: output directory (created).
        src: the R2Gen data folder (`annotation.json`, `images/`).
        splits: which of train / val / test to write.
        annotation: the annotation file inside `src`.
        image_folder: images folder inside `src`.
        prompt: the instruction each record asks.
        check_images_exist: fail, naming the studies, when an image file is missing.
    """
    result = convert_file(os.path.join(src, annotation), splits, image_folder, prompt)
    image_dir = os.path.abspath(src)
    if check_images_exist:
        for records in result.values():
            check_images(records, image_dir, "IU X-ray")
    return write_splits(out, result, "IU X-ray (R2Gen split)", f"medm data build iu-xray --src {src} --out {out}",
                        image_dir)
