"""`iu-xray`: report generation on IU X-ray's R2Gen test split (two views per study), the `report` task's metrics.

Reads the records `medm data build iu-xray` writes, or R2Gen's `annotation.json` (its test split; `medm infer
--layout iu-xray`, images under `images/`: pass the R2Gen data folder as `--image-dir`). R2Gen reports corpus-level
BLEU / METEOR / ROUGE-L (pycocoevalcap) on reports it lower-cases and strips of punctuation; medm's are means of
sentence-level scores, so the two are not the same numbers.
"""

from __future__ import annotations

from medm.data.annotations import parse_record
from medm.data.builders.iu_xray import convert_file
from medm.eval.tasks.report import ReportTask
from medm.registry import TASK


@TASK.register("iu-xray")
class IuXrayTask(ReportTask):
    title = "IU X-ray report generation (R2Gen split)"
    source_layout = "R2Gen annotation.json (test split): id, report, image_path [frontal, lateral], split"
    notes = ("Means of sentence-level scores; R2Gen's published figures are corpus-level (pycocoevalcap).",)

    def load_source(self, path):
        return [parse_record(r, r["id"]) for r in convert_file(path)["test"]]
