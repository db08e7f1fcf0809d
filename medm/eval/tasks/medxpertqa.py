"""`medxpertqa`: MedXpertQA MM (5 options), scored as its `eval/utils.py::answer_cleansing` reads zero-shot answers
(`medxpertqa` rule of `medm.eval.choice`), overall and per medical task, body system and question type
(Reasoning / Understanding).

Reads the records `medm data build medxpertqa` writes, or a published `MM/test.jsonl` (`medm infer --layout
medxpertqa`, images under `images/`: pass the MedXpertQA folder as `--image-dir`).
"""

from __future__ import annotations

from medm.data.annotations import parse_record
from medm.data.builders.medxpertqa import convert_file
from medm.eval.tasks._base import Breakdown
from medm.eval.tasks._choice import ChoiceTask
from medm.registry import TASK


@TASK.register("medxpertqa")
class MedXpertQaTask(ChoiceTask):
    title = "MedXpertQA MM"
    rule = "medxpertqa"
    breakdowns = (Breakdown("medical_task", "medical task"), Breakdown("body_system", "body system"),
                  Breakdown("question_type", "question type"))
    source_layout = "MedXpertQA MM/test.jsonl: id, question, options, label, images, medical_task, body_system, " \
                    "question_type"

    def load_source(self, path):
        return [parse_record(r, r["id"]) for r in convert_file(path)]
