"""`vqa-rad`: VQA-RAD (Lau et al. 2018), 451 test questions on radiology images (272 closed, 179 open).

Reads the published layout: the common split file `split/testset.json` (or `trainset.json`, or the release file
`VQA_RAD Dataset Public.json`), a JSON list of rows with `qid`, `image_name`, `question`, `answer`, `answer_type`
(CLOSED / OPEN; two rows read "CLOSED "), `question_type` (may hold several labels: "PRES, POS") and `image_organ`
(HEAD / CHEST / ABD). Rows become the same records `medm data build vqa-rad` writes (ids `vqa-rad-test-<qid>`,
image paths relative to the images folder: pass `--image-dir <vqa_rad>/images`).

Scoring is the `vqa` task's, broken down by answer type, question type (each label of a multi-label row counts in
its own group) and organ.
"""

from __future__ import annotations

import os

from medm.data.annotations import Record, parse_record
from medm.data.builders.vqa_rad import convert_row
from medm.eval.tasks._base import Breakdown, TaskError, read_source_rows
from medm.eval.tasks.vqa import VqaTask
from medm.registry import TASK

SPLIT_NOTE = ("The common VQA-RAD split (trainset.json / testset.json) is by question, not by image: every test image "
              "also appears in training questions, so these scores measure answering new questions about seen "
              "images.")


@TASK.register("vqa-rad")
class VqaRadTask(VqaTask):
    """VQA-RAD's published rows; scores as `vqa` with VQA-RAD's multi-label question types."""

    title = "VQA-RAD"
    breakdowns = (Breakdown("answer_type", "answer type"), Breakdown("question_type", "question type", sep=","),
                  Breakdown("image_organ", "organ"))
    notes = (SPLIT_NOTE,
             "Question types are multi-labelled (\"PRES, POS\" counts in both groups), so their counts can sum to "
             "more than n.")
    source_layout = "VQA-RAD split/testset.json (or trainset.json, or the public release file): qid, image_name, " \
                    "question, answer, answer_type, question_type, image_organ"
    split = "test"  # goes into the record ids (vqa-rad-test-<qid>), as `medm data build vqa-rad` writes them

    def load_source(self, path: str) -> list[Record]:
        records, seen = [], set()
        name = os.path.basename(path)
        for i, row in enumerate(read_source_rows(path, "VQA-RAD")):
            where = f"{path}, qid {row.get('qid', f'<row {i}>') if isinstance(row, dict) else f'<row {i}>'}"
            raw, _ = convert_row(row, self.split, where)
            if raw["id"] in seen:
                raise TaskError(f"{where}: qid repeats an earlier row (ids must be unique)")
            seen.add(raw["id"])
            records.append(parse_record(raw, f"{name}:{i}"))
        return records
