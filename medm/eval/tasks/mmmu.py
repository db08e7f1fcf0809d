"""`mmmu`: MMMU's Health & Medicine multiple-choice questions, scored with MMMU's `parse_multi_choice_response`
(`mmmu` rule of `medm.eval.choice`; its random fallback is seeded per question and counted in `n_unparsed`),
overall and per subject and subfield.

Reads the records `medm data build mmmu` writes (the parquet layout's images must be written out first, so there is
no `--layout mmmu`).
"""

from __future__ import annotations

from medm.eval.tasks._base import Breakdown
from medm.eval.tasks._choice import ChoiceTask
from medm.registry import TASK


@TASK.register("mmmu")
class MmmuTask(ChoiceTask):
    title = "MMMU Health & Medicine"
    rule = "mmmu"
    breakdowns = (Breakdown("subject", "subject"), Breakdown("subfield", "subfield"))
    notes = ("MMMU papers report the validation split (answers of the test split are hidden).",)
