"""`report`: report generation (findings / impression text) scored by ROUGE and BLEU against the reference report.

Fields read from each prediction row: `prediction` (the generated report) and `answer` (the reference report;
records carry it as `answer` or as their final gpt turn). Both texts are lower-cased and VQA-normalised
(punctuation, articles, number words; `medm.eval.metrics.normalize_answer`) before scoring. Metrics are means over
reports of sentence-level scores, as percentages: ROUGE-1 / ROUGE-2 / ROUGE-L F-measure (`rouge-score`) and
cumulative BLEU-1..4 (`nltk`, smoothing method1, so a short report's BLEU-4 is not forced to 0).
"""

from __future__ import annotations

from medm.eval.metrics import bleu_scores, rouge
from medm.eval.tasks._base import Column, Task
from medm.registry import TASK

PROTOCOL = "rouge-bleu"
KEYS = ("rouge1", "rouge2", "rougeL", "bleu1", "bleu2", "bleu3", "bleu4")


@TASK.register("report")
class ReportTask(Task):
    """Generated reports against reference reports: mean ROUGE-1/2/L and BLEU-1..4."""

    title = "Report generation"
    protocols = (PROTOCOL,)
    columns = (Column("n", "n", percent=False), Column("rouge1", "ROUGE-1"), Column("rouge2", "ROUGE-2"),
               Column("rougeL", "ROUGE-L"), Column("bleu1", "BLEU-1"), Column("bleu4", "BLEU-4"))
    reliance_columns = (Column("rougeL", "ROUGE-L"), Column("bleu4", "BLEU-4"))

    def prepare(self, rows, where, image_dir=None):
        out = super().prepare(rows, where, image_dir)
        for row in out:
            row["answer"] = str(row["answer"])
        return out

    def score(self, rows, protocol):
        sums = dict.fromkeys(KEYS, 0.0)
        for row in rows:
            for k, v in {**rouge(row["prediction"], row["answer"]), **bleu_scores(row["prediction"],
                                                                                  row["answer"])}.items():
                sums[k] += v
        n = len(rows)
        return {"protocol": PROTOCOL, "n": n, "n_empty": sum(not row["prediction"].strip() for row in rows),
                **{k: 100.0 * s / n if n else None for k, s in sums.items()}}

    def protocol_note(self, protocol):
        return ("rouge-bleu: mean sentence-level ROUGE-1/2/L F-measure and cumulative BLEU-1..4 (smoothing method1) "
                "after lower-casing and VQA normalisation of both texts.")
