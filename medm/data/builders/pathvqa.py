"""PathVQA (He et al. 2020, pathology VQA) from a local JSON copy to medm records.

`medm data build pathvqa --src data/pvqa --out data/pathvqa`

Source layout: the QA pairs as JSON, one file per split, beside the release's image tree::

    pvqa/train.json  val.json  test.json
    pvqa/images/train/train_0422.jpg  images/val/val_0001.jpg  images/test/test_0001.jpg

Each split file is a JSON list of `{"image": "train_0422", "question": "...", "answer": "..."}` (the fields of the
release's `qas/{split}/{split}_qa.pkl`, which medm does not unpickle: convert it once with
`json.dump(pickle.load(f), g)` on a machine you trust). `image` is joined to `--image-folder` (default
`images/{split}`, `{split}` filled in) and gets `--image-ext` (".jpg") when it has no extension, so names with a
folder or an extension ("train/train_0422.jpg" with `--image-folder images`) work too. Optional row fields: `id`
/ `qid` (else the row index), `answer_type` (else yes / no answers are CLOSED and all others OPEN), and any others,
which are kept.

Output: `train.json`, `val.json`, `test.json` with ids `pathvqa-{split}-{id}`; image paths are relative to `--src`.
"""

from __future__ import annotations

import os
from typing import Any

from medm.data.annotations import write_json_records
from medm.data.builders._common import (
    SourceError,
    as_list,
    check_images,
    closed_if_yes_no,
    image_dir_note,
    qa_record,
    qa_summary,
    read_json_list,
    text_field,
    write_readme,
)
from medm.registry import BUILDER

SPLITS = ("train", "val", "test")
_MAPPED = ("image", "question", "answer", "answer_type", "id", "qid")


def image_path(image: str, split: str, image_folder: str, image_ext: str) -> str:
    """The image path relative to the source folder, e.g. ("train_0422", "train") -> images/train/train_0422.jpg."""
    name = image if os.path.splitext(image)[1] else image + image_ext
    return os.path.join(image_folder.format(split=split), name)


def convert_row(row: Any, index: int, split: str, where: str, image_folder: str, image_ext: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise SourceError(f"{where}: expected an object, got {type(row).__name__}")
    answer = text_field(row, "answer", where)
    raw_type = row.get("answer_type")
    if raw_type is None:
        answer_type = closed_if_yes_no(answer)
    else:
        answer_type = str(raw_type).strip().upper()
        if answer_type not in ("CLOSED", "OPEN"):
            raise SourceError(f"{where}: field 'answer_type' must be OPEN or CLOSED, got {raw_type!r}")
    key = row.get("id", row.get("qid", index))
    fields = {k: v for k, v in row.items() if k not in _MAPPED}
    fields["image_name"] = row.get("image")
    return qa_record(f"pathvqa-{split}-{key}", image_path(text_field(row, "image", where), split, image_folder,
                                                          image_ext),
                     text_field(row, "question", where), answer, answer_type, "pathvqa", split, fields)


@BUILDER.register("pathvqa")
def build_pathvqa(out: str, src: str, splits: Any = "train,val,test", image_folder: str = "images/{split}",
                  image_ext: str = ".jpg", check_images_exist: bool = True) -> dict[str, str]:
    """Convert PathVQA JSON files under `src` into `out/{split}.json`.

    Args:
        out: output directory (created).
        src: folder holding `{split}.json` and the images.
        splits: splits to convert (comma-separated or a list).
        image_folder: image folder relative to `src`; `{split}` is replaced by the split name.
        image_ext: extension added to image names that have none.
        check_images_exist: fail, naming the questions, when an image file is missing.

    Returns:
        Written paths by role (each split, "readme") and "image_dir" (= `src`, the base of the image paths).
    """
    names = [str(s) for s in as_list(splits, "splits")]
    image_dir = os.path.abspath(src)
    result: dict[str, list[dict[str, Any]]] = {}
    for split in names:
        path = os.path.join(src, f"{split}.json")
        records, seen = [], set()
        for i, row in enumerate(read_json_list(path, "PathVQA split file")):
            where = f"{path}, row {i}"
            record = convert_row(row, i, split, where, image_folder, image_ext)
            if record["id"] in seen:
                raise SourceError(f"{where}: id {record['id']!r} repeats an earlier row (ids must be unique)")
            seen.add(record["id"])
            records.append(record)
        if check_images_exist:
            check_images(records, image_dir, "PathVQA")
        result[split] = records
    os.makedirs(out, exist_ok=True)
    paths = {}
    for split, records in result.items():
        paths[split] = os.path.join(out, f"{split}.json")
        write_json_records(paths[split], records)
    lines = ["# PathVQA (medm records)", "", f"Built by `medm data build pathvqa --src {src} --out {out}`. Answer "
             "types: the source's `answer_type` where present, else yes / no answers are CLOSED and others OPEN.",
             "", image_dir_note(image_dir), ""]
    lines += qa_summary(result)
    paths["readme"] = write_readme(os.path.join(out, "README.md"), lines)
    paths["image_dir"] = image_dir
    return paths
