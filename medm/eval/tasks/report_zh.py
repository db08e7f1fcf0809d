"""`report-zh`: Chinese radiology reports (OpenI-zh from `medm data build openi-zh`, or any records whose answer is a
Chinese report), scored like `report` but always by character: ROUGE-1/2/L, BLEU-1..4 and METEOR over one token per
Chinese character (and one per run of Latin letters / digits, "CT", "3cm"), punctuation dropped.

Character-level ROUGE is what Chinese report-generation papers report when they name no segmenter; a figure from a
word segmenter (jieba) is not comparable.
"""

from __future__ import annotations

from medm.eval.tasks.report import ReportTask
from medm.registry import TASK


@TASK.register("report-zh")
class ReportZhTask(ReportTask):
    title = "Chinese report generation"
    tokenizer = "chars"
