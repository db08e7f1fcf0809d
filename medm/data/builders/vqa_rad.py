"""VQA-RAD (Lau et al. 2018, radiology VQA on MedPix images) to medm conversation records.

Reads either layout of the public data under `--src`:

- `layout="split"` (default): the common benchmark split `split/trainset.json` + `split/testset.json` (3064 / 451
  questions; fields qid, image_name, image_organ, answer, answer_type, question_type, question, phrase_type) ->
  `train.json`, `test.json`.
- `layout="public"`: the release file `VQA_RAD Dataset Public.json` (2248 questions with the MedPix case fields) ->
  `all.json`.

Each question becomes::

    {"id": "vqa-rad-test-11", "image": ["synpic42202.jpg"],
     "conversations": [{"from": "human", "value": "<image>\\nIs there evidence of an aortic aneurysm?"},
                       {"from": "gpt", "value": "yes"}],
     "answer": "yes", "answer_type": "CLOSED", "question_type": "PRES", "image_organ": "CHEST",
     "question": "...", <every other source field as written>, "data_source": "vqa-rad", "split": "test"}

Clean-ups, each counted in the README written beside the records: integer answers (4, 12) become strings;
`answer_type` is stripped and upper-cased (two rows read "CLOSED "); `question_type` and `image_organ` are stripped
and upper-cased ("Other" -> "OTHER"); answers and questions are stripped. Nothing is dropped: duplicate rows are
counted, not removed, so question counts match the papers.

Image paths are written relative to the images folder of `--src` (`image_dir` in the returned dict and the README;
pass it on as `--image-dir`), or absolute with `absolute_paths=True`. The common split is by question, not by image:
every test image also appears in training questions (the README counts them).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from medm.data.annotations import IMAGE_TOKEN, write_json_records
from medm.data.jsonlist import read_json_list
from medm.registry import BUILDER

PUBLIC_FILE = "VQA_RAD Dataset Public.json"
SPLIT_FILES = {"train": os.path.join("split", "trainset.json"), "test": os.path.join("split", "testset.json")}
LAYOUTS = ("split", "public")
ANSWER_TYPES = ("CLOSED", "OPEN")
# Source fields turned into record fields (the rest are copied as written).
_MAPPED = ("question", "answer", "answer_type", "question_type", "image_organ")


class VqaRadError(ValueError):
    """A source file or row that cannot be converted; the message names the file, qid and field."""


def _answer_text(value: Any, where: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise VqaRadError(f"{where}: field 'answer' must be a string or a number, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if not text:
        raise VqaRadError(f"{where}: field 'answer' is empty")
    return text


def _text_field(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise VqaRadError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def convert_row(row: dict[str, Any], split: str, where: str,
                image_prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """One source row -> (medm record, names of the clean-ups applied: "numeric_answer", "answer_type_spaces").

    Args:
        row: a row of the public file or of a split file.
        split: "train" / "test" / "all"; goes into the id and the `split` field.
        where: "file, qid N" for error messages.
        image_prefix: joined before `image_name` (empty: the bare file name, relative to the images folder).
    """
    if not isinstance(row, dict):
        raise VqaRadError(f"{where}: expected an object, got {type(row).__name__}")
    if "qid" not in row:
        raise VqaRadError(f"{where}: missing field 'qid'")
    fixes = []
    question = _text_field(row, "question", where)
    image_name = _text_field(row, "image_name", where)
    if not isinstance(row.get("answer"), str):
        fixes.append("numeric_answer")
    answer = _answer_text(row.get("answer"), where)
    raw_type = row.get("answer_type")
    answer_type = str(raw_type).strip().upper() if raw_type is not None else None
    if answer_type not in ANSWER_TYPES:
        raise VqaRadError(f"{where}: field 'answer_type' must be CLOSED or OPEN, got {raw_type!r}")
    if raw_type != answer_type:
        fixes.append("answer_type_spaces")
    record: dict[str, Any] = {
        "id": f"vqa-rad-{split}-{row['qid']}",
        "image": [os.path.join(image_prefix, image_name) if image_prefix else image_name],
        "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}],
        "answer": answer,
        "answer_type": answer_type,
        "question_type": _text_field(row, "question_type", where).upper(),
        "image_organ": _text_field(row, "image_organ", where).upper(),
        "question": question,
    }
    record.update({k: v for k, v in row.items() if k not in _MAPPED})
    record.update({"data_source": "vqa-rad", "split": split})
    return record, fixes


def _read_rows(path: str) -> list[dict[str, Any]]:
    return read_json_list(path, what="VQA-RAD file", items="questions", jsonl=False, error=VqaRadError)


def _convert_file(path: str, split: str, image_prefix: str, fix_counts: Counter) -> list[dict[str, Any]]:
    records, seen = [], set()
    for i, row in enumerate(_read_rows(path)):
        where = f"{path}, qid {row.get('qid', f'<row {i}>') if isinstance(row, dict) else f'<row {i}>'}"
        record, fixes = convert_row(row, split, where, image_prefix)
        if record["id"] in seen:
            raise VqaRadError(f"{where}: qid repeats an earlier row (ids must be unique)")
        seen.add(record["id"])
        fix_counts.update(fixes)
        records.append(record)
    return records


def _check_images(records: list[dict[str, Any]], image_dir: str, absolute: bool) -> None:
    missing = [(r["id"], r["image"][0]) for r in records
               if not os.path.isfile(r["image"][0] if absolute else os.path.join(image_dir, r["image"][0]))]
    if missing:
        shown = ", ".join(f"{rid}: {name}" for rid, name in missing[:5])
        raise FileNotFoundError(f"{len(missing)} VQA-RAD question(s) name images missing from {image_dir}: {shown}"
                                + (" ..." if len(missing) > 5 else ""))


def _summary(name: str, records: list[dict[str, Any]]) -> list[str]:
    types = Counter(r["answer_type"] for r in records)
    closed_yn = sum(1 for r in records if r["answer_type"] == "CLOSED" and r["answer"].lower() in ("yes", "no"))
    organs = Counter(r["image_organ"] for r in records)
    dupes = len(records) - len({(r["image"][0], r["question"].lower(), r["answer"].lower()) for r in records})
    return [
        f"| {name} | {len(records)} | {types['CLOSED']} ({closed_yn} yes/no, {types['CLOSED'] - closed_yn} other) "
        f"| {types['OPEN']} | {len({r['image'][0] for r in records})} "
        f"| {', '.join(f'{k} {v}' for k, v in sorted(organs.items()))} | {dupes} |"
    ]


def _write_readme(path: str, src: str, layout: str, image_dir: str, absolute: bool,
                  splits: dict[str, list[dict[str, Any]]], fix_counts: Counter, unused_images: list[str]) -> None:
    lines = [
        "# VQA-RAD (medm records)",
        "",
        f"Built by `medm data build vqa-rad --src {src} --out {os.path.dirname(path)}` from the "
        + ("common split (`split/trainset.json`, `split/testset.json`)." if layout == "split"
           else f"public release file (`{PUBLIC_FILE}`)."),
        "",
        ("Image paths are absolute." if absolute else
         f"Image paths are relative to the images folder: pass `--image-dir {image_dir}`."),
        "",
        "| file | questions | CLOSED | OPEN | images | organs | duplicate image/question/answer rows |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, records in splits.items():
        lines += _summary(f"{split}.json", records)
    lines += ["", "Clean-ups: "
              f"{fix_counts['numeric_answer']} numeric answer(s) written as strings; "
              f"{fix_counts['answer_type_spaces']} answer_type value(s) stripped / upper-cased (e.g. \"CLOSED \"). "
              "question_type and image_organ are upper-cased; duplicate rows are kept."]
    if "train" in splits and "test" in splits:
        train_images = {r["image"][0] for r in splits["train"]}
        test_images = {r["image"][0] for r in splits["test"]}
        train_pairs = {(r["image"][0], r["question"].lower()) for r in splits["train"]}
        same_q = sum((r["image"][0], r["question"].lower()) in train_pairs for r in splits["test"])
        lines += ["", f"The split is by question, not by image: {len(test_images & train_images)} of the "
                      f"{len(test_images)} test images also appear in training questions, and {same_q} test "
                      "question(s) repeat a training question on the same image. Test scores measure answering "
                      "new questions about seen images."]
    if unused_images:
        lines += ["", f"{len(unused_images)} image(s) in the images folder belong to no question: "
                      + ", ".join(unused_images[:10]) + (" ..." if len(unused_images) > 10 else "")]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


@BUILDER.register("vqa-rad")
def build_vqa_rad(out: str, src: str, layout: str = "split", image_folder: str = "images",
                  absolute_paths: bool = False, check_images: bool = True) -> dict[str, str]:
    """Convert VQA-RAD under `src` into `out/{train,test}.json` (split layout) or `out/all.json` (public layout).

    Args:
        out: output directory (created).
        src: the VQA-RAD folder holding `split/` and / or the public JSON file, and the images folder.
        layout: "split" (the common train / test benchmark split) or "public" (the release file, one `all.json`).
        image_folder: images folder inside `src` ("VQA_RAD Image Folder" in the original download).
        absolute_paths: write absolute image paths instead of names relative to the images folder.
        check_images: fail, naming the questions, when an image file is missing.

    Returns:
        Written paths by role ("train" / "test" or "all", "readme") and "image_dir", the folder the relative
        image paths resolve against.

    Raises:
        FileNotFoundError: a source file or an image is missing. VqaRadError: a row that cannot be converted.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown VQA-RAD layout {layout!r}; known: {', '.join(LAYOUTS)}")
    image_dir = os.path.abspath(os.path.join(src, image_folder))
    prefix = image_dir if absolute_paths else ""
    sources = SPLIT_FILES if layout == "split" else {"all": PUBLIC_FILE}
    for rel in sources.values():
        if not os.path.isfile(os.path.join(src, rel)):
            other = "public" if layout == "split" else "split"
            raise FileNotFoundError(f"VQA-RAD file not found: {os.path.join(src, rel)} (layout {layout!r} reads "
                                    f"{' and '.join(sources.values())} under --src; layout {other!r} reads "
                                    f"{' and '.join(SPLIT_FILES.values()) if other == 'split' else PUBLIC_FILE})")
    fix_counts: Counter = Counter()
    splits = {split: _convert_file(os.path.join(src, rel), split, prefix, fix_counts) for split, rel in sources.items()}
    used = {os.path.basename(r["image"][0]) for records in splits.values() for r in records}
    listed = os.listdir(image_dir) if os.path.isdir(image_dir) else []
    unused = sorted(n for n in set(listed) - used if n.lower().endswith((".jpg", ".jpeg", ".png")))
    if check_images:
        for records in splits.values():
            _check_images(records, image_dir, absolute_paths)
    os.makedirs(out, exist_ok=True)
    paths = {}
    for split, records in splits.items():
        paths[split] = os.path.join(out, f"{split}.json")
        write_json_records(paths[split], records)
    paths["readme"] = os.path.join(out, "README.md")
    _write_readme(paths["readme"], src, layout, image_dir, absolute_paths, splits, fix_counts, unused)
    paths["image_dir"] = image_dir
    return paths
