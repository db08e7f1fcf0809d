"""`slake`: SLAKE (Liu et al. 2021), bilingual (English / Chinese) radiology VQA.

Reads the published layout: `test.json` (or `validate.json`, `train.json`) of the SLAKE 1.0 release, a JSON list of
rows with `qid`, `img_name` (e.g. "xmlab102/source.jpg", relative to the release's `imgs/` folder: pass
`--image-dir <Slake1.0>/imgs`), `question`, `answer`, `answer_type` (OPEN / CLOSED), `q_lang` ("en" / "zh"),
`content_type` (Modality, Position, Organ, Abnormality, ...), `modality` (CT / MRI / X-Ray), `location` (body
region), and `img_id`, `base_type`, `triple`, which are kept. Rows are converted by the `slake` data builder's
`convert_row`, so the records equal those of `medm data build slake` (ids `slake-test-<qid>`), English questions
only as there (`lang`); for both languages build with `medm data build slake --lang all` and infer on the records.

Scoring is the `vqa` task's, broken down by answer type, language, content type, modality and location.
"""

from __future__ import annotations

import os

from medm.data.annotations import Record, parse_record
from medm.data.builders.slake import convert_row
from medm.eval.tasks._base import Breakdown, TaskError, read_source_rows
from medm.eval.tasks.vqa import VqaTask
from medm.registry import TASK


@TASK.register("slake")
class SlakeTask(VqaTask):
    """SLAKE's published rows; scores as `vqa`."""

    title = "SLAKE"
    breakdowns = (Breakdown("answer_type", "answer type"), Breakdown("q_lang", "language"),
                  Breakdown("content_type", "content type"), Breakdown("modality", "modality"),
                  Breakdown("location", "location"))
    notes = ("Papers report SLAKE's English test questions (the published layout reads those; the `language` rows "
             "show each language when the records hold both).",)
    source_layout = "SLAKE 1.0 test.json / validate.json / train.json: qid, img_name, question, answer, " \
                    "answer_type, q_lang, content_type, modality, location"
    split = "test"  # goes into the record ids (slake-test-<qid>), as `medm data build slake` writes them
    lang = "en"  # q_lang kept by `load_source`: "en", "zh" or "all" (the builder's default is "en")

    def load_source(self, path: str) -> list[Record]:
        records, seen = [], set()
        name = os.path.basename(path)
        for i, row in enumerate(read_source_rows(path, "SLAKE")):
            where = f"{path}, qid {row.get('qid', f'<row {i}>') if isinstance(row, dict) else f'<row {i}>'}"
            if self.lang != "all" and isinstance(row, dict) and row.get("q_lang") != self.lang:
                continue
            raw = convert_row(row, self.split, where)
            if raw["id"] in seen:
                raise TaskError(f"{where}: qid repeats an earlier row (ids must be unique)")
            seen.add(raw["id"])
            records.append(parse_record(raw, f"{name}:{i}"))
        return records
