"""`pathvqa`: PathVQA (He et al. 2020), pathology VQA; yes/no questions are the closed ones.

Reads the rows of the released `qas/test/test_qa.pkl` (and train / val) written as JSON (a list, or JSONL):
`{"image": "test_0262", "question": "...", "answer": "..."}`, optional `id` / `qid` and `answer_type`. medm never
unpickles; convert a release file you trust once with `python -c "import json, pickle; json.dump(pickle.load(open(
'test_qa.pkl', 'rb')), open('test.json', 'w'))"`. Rows are converted by the `pathvqa` data builder's `convert_row`,
so the records equal those of `medm data build pathvqa`: ids `pathvqa-test-<id, qid or row index>`, image paths
`images/test/<image>.jpg` relative to the PathVQA folder (pass `--image-dir <pvqa>`), a row's own `answer_type`
when it has one, else CLOSED exactly when the answer is yes / no.
"""

from __future__ import annotations

import os

from medm.data.annotations import Record, parse_record, read_json_records
from medm.data.builders.pathvqa import convert_row
from medm.eval.tasks._base import Breakdown, TaskError
from medm.eval.tasks.vqa import VqaTask
from medm.registry import TASK


@TASK.register("pathvqa")
class PathVqaTask(VqaTask):
    """PathVQA's released rows; scores as `vqa` (yes/no = closed)."""

    title = "PathVQA"
    breakdowns = (Breakdown("answer_type", "answer type"),)
    notes = ("PathVQA's closed questions are its yes/no questions; open questions are free-form.",)
    source_layout = "PathVQA qas rows as JSON / JSONL: image (name without extension), question, answer"
    # As `medm data build pathvqa` defaults: ids pathvqa-test-<key>, images under images/test/ with .jpg added.
    split = "test"
    image_folder = "images/{split}"
    image_ext = ".jpg"

    def load_source(self, path: str) -> list[Record]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"PathVQA file not found: {path}")
        records, seen = [], set()
        name = os.path.basename(path)
        for i, row in enumerate(read_json_records(path)):
            where = f"{path}, row {i}"
            raw = convert_row(row, i, self.split, where, self.image_folder, self.image_ext)
            if raw["id"] in seen:
                raise TaskError(f"{where}: id {raw['id']!r} repeats an earlier row (ids must be unique)")
            seen.add(raw["id"])
            records.append(parse_record(raw, f"{name}:{i}"))
        return records
