"""`report`: report generation (findings / impression text) scored by ROUGE and BLEU against the reference report.

Fields read from each prediction row: `prediction` (the generated report) and `answer` (the reference report;
records carry it as `answer` or as their final gpt turn). Texts are tokenised by the task's `tokenizer`
(`medm.eval.text`): `auto` (default) scores a pair holding Chinese / Japanese / Korean characters by character and
any other pair as English (lower-cased and VQA-normalised: punctuation, articles, number words). Metrics are means
over reports of sentence-level scores, as percentages: ROUGE-1 / ROUGE-2 / ROUGE-L F-measure (`rouge-score`'s
definitions), cumulative BLEU-1..4 (`nltk`, smoothing method1, so a short report's BLEU-4 is not forced to 0) and
METEOR (`nltk`, exact and stem matches, no WordNet synonyms). `n_chars` counts the reports scored by character.
"""

from __future__ import annotations

from medm.eval.metrics import bleu_scores, rouge
from medm.eval.tasks._base import Column, Task
from medm.eval.text import meteor, resolve_tokenizer
from medm.registry import TASK

PROTOCOL = "rouge-bleu"
KEYS = ("rouge1", "rouge2", "rougeL", "bleu1", "bleu2", "bleu3", "bleu4", "meteor")


@TASK.register("report")
class ReportTask(Task):
    """Generated reports against reference reports: mean ROUGE-1/2/L and BLEU-1..4."""

    title = "Report generation"
    protocols = (PROTOCOL,)
    columns = (Column("n", "n", percent=False), Column("rouge1", "ROUGE-1"), Column("rouge2", "ROUGE-2"),
               Column("rougeL", "ROUGE-L"), Column("bleu1", "BLEU-1"), Column("bleu4", "BLEU-4"),
               Column("meteor", "METEOR"))
    reliance_columns = (Column("rougeL", "ROUGE-L"), Column("bleu4", "BLEU-4"))
    tokenizer = "auto"  # medm.eval.text: auto (CJK by character, else words), chars or words

    def prepare(self, rows, where, image_dir=None):
        out = super().prepare(rows, where, image_dir)
        for row in out:
            row["answer"] = str(row["answer"])
        return out

    def row_scores(self, row) -> dict[str, float]:
        """One report's scores in [0, 1] (KEYS) and `chars` (1.0 when it was scored by character)."""
        pred, ref, tok = row["prediction"], row["answer"], self.tokenizer
        return {**rouge(pred, ref, tokenizer=tok), **bleu_scores(pred, ref, tokenizer=tok),
                "meteor": meteor(pred, ref, tok), "chars": float(resolve_tokenizer(tok, pred, ref) == "chars"),
                "empty": float(not pred.strip())}

    def aggregate(self, per_row: list[dict[str, float]]) -> dict:
        n = len(per_row)
        return {"protocol": PROTOCOL, "n": n, "n_empty": int(sum(r["empty"] for r in per_row)),
                "n_chars": int(sum(r["chars"] for r in per_row)),
                **{k: 100.0 * sum(r[k] for r in per_row) / n if n else None for k in KEYS}}

    def score(self, rows, protocol):
        return self.aggregate([self.row_scores(r) for r in rows])

    def scorer(self, rows, protocol):
        per_row = [self.row_scores(r) for r in rows]
        return lambda idx: self.aggregate([per_row[i] for i in idx])

    def protocol_note(self, protocol):
        how = {"auto": "Chinese / Japanese / Korean text by character, other text by VQA-normalised words",
               "chars": "by character (one token per CJK character, one per other alphanumeric run)",
               "words": "by VQA-normalised words"}[self.tokenizer]
        return (f"rouge-bleu: mean sentence-level ROUGE-1/2/L F-measure, cumulative BLEU-1..4 (smoothing method1) "
                f"and METEOR (exact + stem matches), tokenised {how}.")
