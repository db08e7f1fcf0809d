"""`pmc-vqa`: PMC-VQA multiple choice, scored as MedVInT's `test.py` does (`pmc-vqa` rule of `medm.eval.choice`:
the choice most similar to the answer by difflib must be the right one).

Reads the records `medm data build pmc-vqa` writes, or a published CSV (`test_clean.csv`, `medm infer --layout
pmc-vqa`, images under `images/`: pass the PMC-VQA folder as `--image-dir`).
"""

from __future__ import annotations

from medm.data.annotations import parse_record
from medm.data.builders.pmc_vqa import convert_file
from medm.eval.tasks._choice import ChoiceTask
from medm.registry import TASK


@TASK.register("pmc-vqa")
class PmcVqaTask(ChoiceTask):
    title = "PMC-VQA"
    rule = "pmc-vqa"
    source_layout = "PMC-VQA test_clean.csv / test.csv: Figure_path, Question, Answer, Choice A..D, Answer_label"

    def load_source(self, path):
        return [parse_record(r, r["id"]) for r in convert_file(path)]
