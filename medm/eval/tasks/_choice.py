"""The base of the multiple-choice tasks (OmniMedVQA, PMC-VQA, MedXpertQA-MM, MMMU, M3D closed VQA).

Fields read from each prediction row (the builders write them into every record and `medm infer` copies them):
`prediction`, `answer` (the right option's letter) and `options` (`{"A": text, ...}` in order). Scoring is the
benchmark's own rule (`medm.eval.choice`; `--protocol` picks another rule to compare); figures are `accuracy`
(percent right) and `n_unparsed` (answers the rule could not read, or for `mmmu` had to guess).
"""

from __future__ import annotations

from typing import Any

from medm.eval.choice import RULES, get_rule, is_correct
from medm.eval.tasks._base import Column, Task, TaskError, row_name


def _aggregate(per_row: list[tuple[float, int]], rule: str) -> dict[str, Any]:
    n = len(per_row)
    return {"protocol": rule, "n": n, "accuracy": 100.0 * sum(c for c, _ in per_row) / n if n else None,
            "n_unparsed": sum(u for _, u in per_row)}


class ChoiceTask(Task):
    """Accuracy on multiple-choice questions, read by the benchmark's rule."""

    rule: str = "mmmu"
    columns = (Column("n", "n", percent=False), Column("accuracy", "accuracy"),
               Column("n_unparsed", "unparsed", percent=False))
    reliance_columns = (Column("accuracy", "accuracy"),)

    @property
    def protocols(self) -> tuple[str, ...]:  # the task's rule first, then any other
        return (self.rule, *[r for r in RULES if r != self.rule])

    def prepare(self, rows, where, image_dir=None):
        out = super().prepare(rows, where, image_dir)
        for i, row in enumerate(out):
            options = row.get("options")
            if not isinstance(options, dict) or not options:
                raise TaskError(f"{where}: {row_name(row, i)} has no 'options' ({{letter: text}}); task "
                                f"{self.name!r} reads the records its builder writes")
            row["options"] = {str(k): str(v) for k, v in options.items()}
            row["answer"] = str(row["answer"]).strip()
            if row["answer"] not in row["options"]:
                raise TaskError(f"{where}: {row_name(row, i)}: answer {row['answer']!r} is not an option letter "
                                f"({', '.join(row['options'])})")
        return out

    def _row(self, row: dict[str, Any], protocol: str) -> tuple[float, int]:
        right, choice = is_correct(protocol, row["prediction"], row["options"], row["answer"], str(row.get("id", "")))
        return float(right), int(choice.letter is None or choice.guessed)

    def score(self, rows, protocol):
        return _aggregate([self._row(r, protocol) for r in rows], protocol)

    def scorer(self, rows, protocol):
        per_row = [self._row(r, protocol) for r in rows]
        return lambda idx: _aggregate([per_row[i] for i in idx], protocol)

    def protocol_note(self, protocol):
        return f"{protocol}: {get_rule(protocol).source}; accuracy = share of answers whose chosen option is right."
