"""`flare25`: FLARE 2025 Task 5 questions (records of `medm data build flare25`), scored by the `vqa` task's
protocols and broken down by task type, modality category and dataset.

FLARE's official evaluation uses a metric per task type (accuracy / F1 for classification, IoU for detection, MAE
for counting and regression, text metrics for reports); this task does not reproduce it: it gives the VQA view
(closed = yes/no answers, open = token recall) so runs can be compared within medm.
"""

from __future__ import annotations

from medm.eval.tasks._base import Breakdown
from medm.eval.tasks.vqa import VqaTask
from medm.registry import TASK


@TASK.register("flare25")
class Flare25Task(VqaTask):
    title = "FLARE 2025 Task 5 (2D)"
    breakdowns = (Breakdown("task_type", "task type"), Breakdown("category", "category"),
                  Breakdown("dataset", "dataset"))
    notes = ("FLARE's official per-task-type metrics are not reproduced; these are VQA figures.",)
