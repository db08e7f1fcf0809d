"""`vqa`: closed / open question answering on any predictions file whose rows have an `answer`.

Fields read from each prediction row: `prediction`, `answer`, `answer_type` (CLOSED / OPEN, case and spaces
ignored; when missing, CLOSED exactly when the answer is yes / no), `question` (lets the strict protocol catch
choice answers naming both options), and for the breakdown, where present, `question_type` and `image_organ`.
"""

from __future__ import annotations

from typing import Any

from medm.eval.metrics import NO, YES, normalize_answer
from medm.eval.protocols import CLOSED, OPEN, PROTOCOLS, aggregate, get_protocol, item_scores, score
from medm.eval.tasks._base import Breakdown, Column, Task, TaskError, row_name
from medm.registry import TASK

PROTOCOL_NOTES = {
    "strict": "strict: a closed yes/no question is right when the first yes / no the prediction states is the "
              "answer; another closed answer must appear as whole words in the prediction's first clause with no "
              "other option of the question named; open questions get token recall (each reference token matched "
              "once), open accuracy = the answer appears as whole words, exact match = normalised strings equal.",
    "llava-med": "llava-med: LLaVA-Med's batch scorer, kept to compare with published numbers: closed right when the "
                 "answer is a substring of the prediction (\"no\" is inside \"i do not know\"), open recall counts "
                 "shared words as often as the prediction repeats them. It overstates accuracy; medm reports "
                 "`strict`.",
}


def answer_type_of(row: dict[str, Any], where: str, index: int) -> str:
    """CLOSED / OPEN from the row's `answer_type`, else CLOSED exactly when the answer is yes / no."""
    raw = row.get("answer_type")
    if raw is None:
        return CLOSED if normalize_answer(row["answer"]) in (YES, NO) else OPEN
    value = str(raw).strip().upper()
    if value not in (CLOSED, OPEN):
        raise TaskError(f"{where}: {row_name(row, index)} has answer_type {raw!r}; expected CLOSED or OPEN")
    return value


@TASK.register("vqa")
class VqaTask(Task):
    """Closed / open VQA scored by a protocol (`medm.eval.protocols`), broken down by answer type and, where the
    rows have them, question type and organ."""

    title = "VQA"
    protocols = tuple(PROTOCOLS)
    columns = (Column("n", "n", percent=False), Column("closed_accuracy", "closed acc"),
               Column("open_recall", "open recall"), Column("open_accuracy", "open acc"),
               Column("exact_match", "exact match"), Column("overall", "overall"))
    reliance_columns = (Column("closed_accuracy", "closed acc"), Column("open_recall", "open recall"))
    breakdowns = (Breakdown("answer_type", "answer type"), Breakdown("question_type", "question type"),
                  Breakdown("image_organ", "organ"))

    def prepare(self, rows, where, image_dir=None):
        out = super().prepare(rows, where, image_dir)
        for i, row in enumerate(out):
            row["answer_type"] = answer_type_of(row, where, i)
        return out

    def score(self, rows, protocol):
        return score(rows, protocol)

    def scorer(self, rows, protocol):
        items, name = item_scores(rows, protocol), get_protocol(protocol).name
        return lambda idx: aggregate([items[i] for i in idx], name)

    def protocol_note(self, protocol):
        return PROTOCOL_NOTES.get(protocol, "")
