"""PMC-VQA (Zhang et al. 2023): multiple-choice VQA on PubMed Central figures, to medm records.

`medm data build pmc-vqa --src data/PMC-VQA --out data/pmc_vqa [--splits test_clean,test,train]`

Source layout (the dataset card of `xmcmic/PMC-VQA` / `RadGenome/PMC-VQA`)::

    PMC-VQA/train.csv  test.csv  test_clean.csv      (version 2: train2.csv, test2.csv)
    PMC-VQA/images/PMC1064097_F1.jpg ...              (images.zip unpacked; images2.zip for version 2)

Each CSV row: `Figure_path` (file name in the images folder), `Question`, `Answer` (the right option's text),
`Choice A` .. `Choice D` (written "A:Diffuse uptake pattern"), `Answer_label` (the letter; the card also spells it
`Anwser_label`); other columns (`split`, `Caption`, ...) are kept. `Figure_path` is joined to `--image-folder`.

Output: one file per split (`test_clean.json`, ...), ids `pmc-vqa-<split>-<row>`; the prompt is MedVInT's
("Question: {q}Choices: A:... B:...The Answer is:"), the gpt turn and `answer` the letter, `choice_rule: pmc-vqa`.
"""

from __future__ import annotations

import csv
import os
import re
from typing import Any

from medm.data.builders._common import SourceError, as_list, check_images, text_field
from medm.data.builders._mc import choice_record, write_splits
from medm.registry import BUILDER

RULE = "pmc-vqa"
_PREFIX = re.compile(r"^\s*([A-D])\s*:\s*")
_MAPPED = ("Figure_path", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label",
           "Anwser_label")


def read_csv(path: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PMC-VQA file not found: {path}")
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def convert_row(row: dict[str, Any], index: int, split: str, where: str, image_folder: str) -> dict[str, Any]:
    options = {}
    for letter in "ABCD":
        raw = text_field(row, f"Choice {letter}", where)
        options[letter] = _PREFIX.sub("", raw).strip()
    label = str(row.get("Answer_label") or row.get("Anwser_label") or "").strip().upper()
    if label not in options:
        raise SourceError(f"{where}: field 'Answer_label' must be A-D, got {label!r}")
    fields = {k: v for k, v in row.items() if k not in _MAPPED and k is not None}
    image = os.path.join(image_folder, text_field(row, "Figure_path", where))
    return choice_record(f"pmc-vqa-{split}-{index}", [image], text_field(row, "Question", where), options, label,
                         RULE, "pmc-vqa", split, fields)


def convert_file(path: str, image_folder: str = "images") -> list[dict[str, Any]]:
    split = os.path.splitext(os.path.basename(path))[0]
    return [convert_row(row, i, split, f"{path}, row {i + 2}", image_folder) for i, row in enumerate(read_csv(path))]


@BUILDER.register("pmc-vqa")
def build_pmc_vqa(out: str, src: str, splits: Any = "test_clean", image_folder: str = "images",
                  check_images_exist: bool = True) -> dict[str, str]:
    """Convert PMC-VQA CSV files under `src` into `out/<split>.json`.

    Args:
        out: output directory (created).
        src: the PMC-VQA folder (CSV files and the images folder).
        splits: CSV file stems to convert (default test_clean, the usual test set; test, train, test2, ...).
        image_folder: images folder inside `src` (images2 for version 2).
        check_images_exist: fail, naming the questions, when an image file is missing.
    """
    result = {str(s): convert_file(os.path.join(src, f"{s}.csv"), image_folder) for s in as_list(splits, "splits")}
    image_dir = os.path.abspath(src)
    if check_images_exist:
        for records in result.values():
            check_images(records, image_dir, "PMC-VQA")
    return write_splits(out, result, "PMC-VQA", f"medm data build pmc-vqa --src {src} --out {out}", image_dir)
