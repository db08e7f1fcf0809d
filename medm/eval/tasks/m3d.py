"""M3D-Bench (Bai et al. 2024) on 3D CT: `m3d-vqa-closed`, `m3d-vqa-open` and `m3d-cap`.

- `m3d-vqa-closed`: four-option questions, right when "{letter}." occurs in the answer, as M3D's
  `Bench/eval/eval_vqa.py` scores them (`m3d` rule of `medm.eval.choice`); per question type.
- `m3d-vqa-open`: the same questions without options, by BLEU-1, ROUGE-1, METEOR (M3D also reports BERTScore,
  which needs a model download and is left out) per question type; M3D computes them with HF `evaluate` on the raw
  text, medm with the `report` task's metrics (lower-cased, VQA-normalised), so values differ slightly.
- `m3d-cap`: captions of M3D-Cap volumes, the `report` task's metrics.

Each reads the records `medm data build m3d-vqa` / `m3d-cap` writes.
"""

from __future__ import annotations

from medm.eval.tasks._base import Breakdown, Column
from medm.eval.tasks._choice import ChoiceTask
from medm.eval.tasks.report import ReportTask
from medm.registry import TASK

QUESTION_TYPE = Breakdown("question_type", "question type")


@TASK.register("m3d-vqa-closed")
class M3dVqaClosedTask(ChoiceTask):
    title = "M3D-VQA (closed)"
    rule = "m3d"
    breakdowns = (QUESTION_TYPE,)


@TASK.register("m3d-vqa-open")
class M3dVqaOpenTask(ReportTask):
    title = "M3D-VQA (open)"
    columns = (Column("n", "n", percent=False), Column("bleu1", "BLEU-1"), Column("rouge1", "ROUGE-1"),
               Column("meteor", "METEOR"))
    breakdowns = (QUESTION_TYPE,)


@TASK.register("m3d-cap")
class M3dCapTask(ReportTask):
    title = "M3D-Cap"
    columns = M3dVqaOpenTask.columns
