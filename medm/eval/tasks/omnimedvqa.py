"""`omnimedvqa`: OmniMedVQA (Hu et al. 2024) multiple choice, scored as its own evaluation code does (`omnimedvqa`
rule of `medm.eval.choice`: the option most similar to the answer by difflib must be the right one), overall and
per modality, question type and source dataset.

Reads the records `medm data build omnimedvqa` writes, or one published `QA_information/<access>/<dataset>.json`
(`medm infer --layout omnimedvqa`, images relative to the `OmniMedVQA` folder: pass it as `--image-dir`).
"""

from __future__ import annotations

from medm.data.annotations import parse_record
from medm.data.builders.omnimedvqa import convert_file
from medm.eval.tasks._base import Breakdown
from medm.eval.tasks._choice import ChoiceTask
from medm.registry import TASK


@TASK.register("omnimedvqa")
class OmniMedVqaTask(ChoiceTask):
    title = "OmniMedVQA"
    rule = "omnimedvqa"
    breakdowns = (Breakdown("modality_type", "modality"), Breakdown("question_type", "question type"),
                  Breakdown("dataset", "dataset"))
    source_layout = "OmniMedVQA QA_information/<access>/<dataset>.json: question, option_A..D, gt_answer, " \
                    "image_path, modality_type, question_type"

    def load_source(self, path):
        return [parse_record(r, r["id"]) for r in convert_file(path)]
