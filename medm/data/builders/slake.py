"""SLAKE (Liu et al. 2021, bilingual radiology VQA) from a local copy of its release to medm records.

`medm data build slake --src data/Slake1.0 --out data/slake [--lang en|zh|all]`

Source layout (the published `Slake1.0` folder)::

    Slake1.0/train.json  validate.json  test.json
    Slake1.0/imgs/xmlab0/source.jpg  ...

Each split file is a JSON list of questions: `qid`, `img_id`, `img_name` ("xmlab0/source.jpg", relative to
`imgs/`), `question`, `answer`, `q_lang` ("en" / "zh"), `answer_type` (OPEN / CLOSED), `content_type`, `modality`,
`location`, `base_type`, `triple`. English only by default (`--lang en`; `zh` or `all` for the others).

Output: `train.json`, `val.json` (from `validate.json`), `test.json`; each question becomes a single-turn record with
`answer`, `answer_type` (stripped, upper-cased), `question` and every other source field kept; ids are
`slake-{split}-{qid}`. Image paths are relative to the images folder (`image_dir` in the result and README).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from medm.data.annotations import write_json_records
from medm.data.builders._common import (
    SourceError,
    as_list,
    check_images,
    image_dir_note,
    qa_record,
    qa_summary,
    read_json_list,
    text_field,
    write_readme,
)
from medm.registry import BUILDER

SPLIT_FILES = {"train": "train.json", "val": "validate.json", "test": "test.json"}
LANGS = ("en", "zh", "all")
ANSWER_TYPES = ("CLOSED", "OPEN")
_MAPPED = ("question", "answer", "answer_type")


def convert_row(row: Any, split: str, where: str) -> dict[str, Any]:
    """One SLAKE question -> a medm record (raises SourceError naming `where` and the field)."""
    if not isinstance(row, dict):
        raise SourceError(f"{where}: expected an object, got {type(row).__name__}")
    if row.get("qid") is None:
        raise SourceError(f"{where}: missing field 'qid'")
    answer_type = str(row.get("answer_type", "")).strip().upper()
    if answer_type not in ANSWER_TYPES:
        raise SourceError(f"{where}: field 'answer_type' must be OPEN or CLOSED, got {row.get('answer_type')!r}")
    fields = {k: v for k, v in row.items() if k not in _MAPPED}
    return qa_record(f"slake-{split}-{row['qid']}", text_field(row, "img_name", where),
                     text_field(row, "question", where), text_field(row, "answer", where), answer_type,
                     "slake", split, fields)


@BUILDER.register("slake")
def build_slake(out: str, src: str, lang: str = "en", splits: Any = "train,val,test", image_folder: str = "imgs",
                check_images_exist: bool = True) -> dict[str, str]:
    """Convert SLAKE under `src` into `out/{train,val,test}.json`.

    Args:
        out: output directory (created).
        src: the `Slake1.0` folder (split files and the images folder).
        lang: "en" (default), "zh" or "all": which `q_lang` questions to keep.
        splits: output splits to build, from train / val / test (val reads `validate.json`).
        image_folder: images folder inside `src`.
        check_images_exist: fail, naming the questions, when an image file is missing.

    Returns:
        Written paths by role (each split, "readme") and "image_dir".
    """
    if lang not in LANGS:
        raise ValueError(f"--lang must be one of {', '.join(LANGS)}, got {lang!r}")
    names = [str(s) for s in as_list(splits, "splits")]
    unknown = [s for s in names if s not in SPLIT_FILES]
    if unknown:
        raise ValueError(f"unknown SLAKE split(s) {unknown}; known: {', '.join(SPLIT_FILES)}")
    image_dir = os.path.abspath(os.path.join(src, image_folder))
    result: dict[str, list[dict[str, Any]]] = {}
    langs: dict[str, Counter] = {}
    for split in names:
        path = os.path.join(src, SPLIT_FILES[split])
        rows = read_json_list(path, "SLAKE split file")
        records, seen, counter = [], set(), Counter()
        for i, row in enumerate(rows):
            where = f"{path}, qid {row.get('qid', f'<row {i}>') if isinstance(row, dict) else f'<row {i}>'}"
            q_lang = row.get("q_lang") if isinstance(row, dict) else None
            counter[q_lang] += 1
            if lang != "all" and q_lang != lang:
                continue
            record = convert_row(row, split, where)
            if record["id"] in seen:
                raise SourceError(f"{where}: qid repeats an earlier row (ids must be unique)")
            seen.add(record["id"])
            records.append(record)
        result[split], langs[split] = records, counter
        if check_images_exist:
            check_images(records, image_dir, "SLAKE")
    os.makedirs(out, exist_ok=True)
    paths = {}
    for split, records in result.items():
        paths[split] = os.path.join(out, f"{split}.json")
        write_json_records(paths[split], records)
    lines = ["# SLAKE (medm records)", "", f"Built by `medm data build slake --src {src} --out {out} --lang {lang}`.",
             "", image_dir_note(image_dir), ""]
    lines += qa_summary(result)
    lines += ["", "Questions per language in the source: " + "; ".join(
        f"{SPLIT_FILES[s]}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=str)) for s, c in langs.items())]
    paths["readme"] = write_readme(os.path.join(out, "README.md"), lines)
    paths["image_dir"] = image_dir
    return paths
