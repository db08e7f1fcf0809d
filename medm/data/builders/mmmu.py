"""MMMU (Yue et al. 2024), the Health & Medicine discipline: college-level multimodal multiple choice, to medm
records.

`medm data build mmmu --src data/MMMU --out data/mmmu [--subjects Clinical_Medicine,...] [--splits validation]`

Source layout (the `MMMU/MMMU` dataset repository: one folder per subject, parquet files per split)::

    MMMU/Basic_Medical_Science/dev-00000-of-00001.parquet  validation-00000-of-00001.parquet  test-...
    MMMU/Clinical_Medicine/...  Diagnostics_and_Laboratory_Medicine/  Pharmacy/  Public_Health/

Columns: `id` ("validation_Clinical_Medicine_1"), `question` (with "<image 1>" markers), `options` (a Python list
written as a string, as MMMU's `construct_prompt` `eval`s it; read here with `ast.literal_eval`), `answer` (the
letter; "?" in the test split, whose answers are hidden), `question_type` ("multiple-choice" / "open"),
`image_1` .. `image_7` (`{"bytes", "path"}` or null), `img_type`, `topic_difficulty`, `subfield`, `explanation`.

Output: `<split>.json`, ids `mmmu-<id>`; each image is written to `images/<id>_<k>.<ext>` under `--out` and every
image of a question goes into `image`, in order (MMMU's own script passes only `image_1`; the text keeps its
"<image k>" markers, so a model can tell them apart). The prompt is MMMU's multiple-choice format, `answer` the
letter, `choice_rule: mmmu`. Open questions (a few percent) and rows without an answer are left out and counted in
the README.
"""

from __future__ import annotations

import ast
import glob
import os
from collections import Counter
from typing import Any

from medm.data.builders._common import SourceError, as_list, text_field
from medm.data.builders._mc import check_unique, choice_record, write_splits
from medm.eval.choice import letters
from medm.registry import BUILDER

RULE = "mmmu"
HEALTH_AND_MEDICINE = ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                       "Pharmacy", "Public_Health")
_MAPPED = ("id", "question", "options", "answer", "explanation") + tuple(f"image_{k}" for k in range(1, 8))


def _save_image(value: Any, out_dir: str, stem: str, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value.get("bytes"):
        raise SourceError(f"{where}: an image column must hold {{'bytes', 'path'}}, got {type(value).__name__}")
    ext = os.path.splitext(str(value.get("path") or ""))[1] or ".png"
    name = f"{stem}{ext}"
    with open(os.path.join(out_dir, name), "wb") as f:
        f.write(value["bytes"])
    return os.path.join("images", name)


def convert_row(row: dict[str, Any], subject: str, split: str, where: str, out: str) -> dict[str, Any] | str:
    """A record, or the reason the row is left out ("open", "no answer")."""
    if row.get("question_type") != "multiple-choice":
        return "open"
    answer = str(row.get("answer") or "").strip()
    try:
        texts = ast.literal_eval(text_field(row, "options", where))
    except (ValueError, SyntaxError):
        raise SourceError(f"{where}: field 'options' is not a list literal: {row.get('options')!r}") from None
    options = dict(zip(letters(len(texts)), (str(t) for t in texts)))
    if answer not in options:
        return "no answer"
    rid = text_field(row, "id", where)
    images = [p for k in range(1, 8) if (p := _save_image(row.get(f"image_{k}"), os.path.join(out, "images"),
                                                           f"{rid}_{k}", where)) is not None]
    fields = {k: v for k, v in row.items() if k not in _MAPPED}
    return choice_record(f"mmmu-{rid}", images, text_field(row, "question", where), options, answer, RULE, "mmmu",
                         split, {**fields, "subject": subject})


@BUILDER.register("mmmu")
def build_mmmu(out: str, src: str, subjects: Any = ",".join(HEALTH_AND_MEDICINE), splits: Any = "validation"
               ) -> dict[str, str]:
    """Convert MMMU subjects under `src` into `out/<split>.json` and `out/images/`.

    Args:
        out: output directory (created); images are written to `out/images`.
        src: the MMMU dataset folder (one folder per subject).
        subjects: subject folders (default the five of Health & Medicine).
        splits: dev, validation (default: the split papers report, answers public), test (answers hidden).
    """
    import pyarrow.parquet as pq  # defers pyarrow

    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    result, skipped = {}, Counter()
    for split in (str(s) for s in as_list(splits, "splits")):
        records = []
        for subject in (str(s) for s in as_list(subjects, "subjects")):
            files = sorted(glob.glob(os.path.join(src, subject, f"{split}-*.parquet")))
            if not files:
                raise FileNotFoundError(f"no MMMU file {os.path.join(src, subject, split + '-*.parquet')}")
            for path in files:
                for i, row in enumerate(pq.read_table(path).to_pylist()):
                    rec = convert_row(row, subject, split, f"{path}, row {i + 1}", out)
                    if isinstance(rec, str):
                        skipped[(split, rec)] += 1
                    else:
                        records.append(rec)
        check_unique(records, src)
        result[split] = records
    notes = [f"Left out of {s}: {n} {why} question(s)." for (s, why), n in sorted(skipped.items())]
    return write_splits(out, result, "MMMU Health & Medicine", f"medm data build mmmu --src {src} --out {out}",
                        os.path.abspath(out), by="subject", notes=notes)
