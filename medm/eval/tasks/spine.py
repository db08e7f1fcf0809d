"""`spine`: the lumbar spine MRI tasks of `medm data build spine` (docs/spine_labels.md).

Fields read from each prediction row (the builder writes them into every record and `medm infer` copies them):
`prediction`, `answer`, `spine_task` (qd, sl, zjppt, zyzg or positioning), `options` (the task's class names;
default the schema's, `medm.data.builders.spine.DEFAULT_CLASSES`), `level` (breakdown), and for positioning
`image_size` [width, height] (needed for answers on the 0-1000 grid).

Classification tasks (qd, sl, zjppt, zyzg): the prediction's class is the option it equals after VQA
normalisation, else the single option named as whole words in its first clause (an option inside a longer named
option counts once: "disc bulge" names only "bulge"); naming none or several is unparsed and wrong. Reported per
task: accuracy and macro-F1 (per-class F1 = 2TP / (2TP + FP + FN), averaged over the classes that occur as answer or
prediction, as scikit-learn's `f1_score(average="macro")`; an unparsed prediction is a miss for its answer's class).
Positioning: IoU of the first predicted box with the reference box (the best of them when the answer holds
several), mean IoU and Acc@0.5. All values are percentages.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from medm.data.builders.spine import DEFAULT_CLASSES
from medm.eval.metrics import box_iou, contains_phrase, first_clause, normalize_answer, parse_boxes, tokens
from medm.eval.tasks._base import Breakdown, Column, Task, TaskError, row_name
from medm.registry import TASK

PROTOCOL = "spine"
CLASS_TASKS = ("qd", "sl", "zjppt", "zyzg")
POSITIONING = "positioning"
THRESHOLD = 0.5


def parse_class(prediction: str, options: Sequence[str]) -> str | None:
    """The option a prediction names (rules in the module docstring), or None."""
    norm = {o: normalize_answer(o) for o in options}
    pred = normalize_answer(prediction)
    exact = [o for o, n in norm.items() if n == pred]
    if exact:
        return exact[0]
    clause = tokens(first_clause(prediction))
    named = [o for o, n in norm.items() if n and contains_phrase(clause, n.split())]
    # "disc bulge" with options "bulge" and "disc bulge": keep the longest option that covers the others.
    named = [o for o in named if not any(o != p and contains_phrase(norm[p].split(), norm[o].split())
                                         for p in named)]
    return named[0] if len(named) == 1 else None


def macro_f1(gold: Sequence[str], predicted: Sequence[str | None]) -> float | None:
    """Macro-F1 in [0, 1] over the classes occurring in `gold` or `predicted` (None = unparsed, no class)."""
    tp, fp, fn = Counter(), Counter(), Counter()
    for g, p in zip(gold, predicted):
        if g == p:
            tp[g] += 1
        else:
            fn[g] += 1
            if p is not None:
                fp[p] += 1
    classes = set(gold) | {p for p in predicted if p is not None}
    if not classes:
        return None
    return sum(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in classes) / len(classes)


def _gold_boxes(answer: Any, size: tuple[int, int] | None) -> list[tuple[float, ...]]:
    if isinstance(answer, str):
        return parse_boxes(answer, size)
    if isinstance(answer, Sequence) and len(answer) == 4 and all(isinstance(v, (int, float)) for v in answer):
        return [tuple(float(v) for v in answer)]
    if isinstance(answer, Sequence) and answer and all(isinstance(b, Sequence) and len(b) == 4 for b in answer):
        return [tuple(float(v) for v in b) for b in answer]
    return []


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def score_spine(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of prepared rows (see the module docstring): overall, and `{task}_*` per task present.

    Returns:
        `n`, `n_unparsed`, `accuracy` and `macro_f1` (classification rows; macro-F1 averaged over the tasks
        present), `mean_iou` and `acc_at_iou` (positioning rows), and per task `{task}_n`, `{task}_accuracy`,
        `{task}_macro_f1` or `positioning_n`, `positioning_mean_iou`, `positioning_acc_at_iou`; None where a
        metric has no rows.
    """
    out: dict[str, Any] = {"protocol": PROTOCOL, "n": len(rows), "n_unparsed": 0}
    correct_all, n_class, f1s = 0, 0, []
    for task in CLASS_TASKS:
        sub = [r for r in rows if r["spine_task"] == task]
        if not sub:
            continue
        gold = [r["answer"] for r in sub]
        pred = [parse_class(r["prediction"], r["options"]) for r in sub]
        out["n_unparsed"] += sum(p is None for p in pred)
        correct = sum(g == p for g, p in zip(gold, pred))
        f1 = macro_f1(gold, pred)
        out.update({f"{task}_n": len(sub), f"{task}_accuracy": _pct(correct / len(sub)),
                    f"{task}_macro_f1": _pct(f1)})
        correct_all, n_class = correct_all + correct, n_class + len(sub)
        f1s.append(f1)
    out["accuracy"] = _pct(correct_all / n_class) if n_class else None
    out["macro_f1"] = _pct(sum(f1s) / len(f1s)) if f1s else None
    ious = []
    for r in (r for r in rows if r["spine_task"] == POSITIONING):
        size = tuple(r["image_size"]) if r.get("image_size") else None
        boxes = parse_boxes(r["prediction"], size)
        out["n_unparsed"] += not boxes
        ious.append(max(box_iou(boxes[0], g) for g in r["gold_boxes"]) if boxes else 0.0)
    out["mean_iou"] = _pct(sum(ious) / len(ious)) if ious else None
    out["acc_at_iou"] = _pct(sum(v >= THRESHOLD for v in ious) / len(ious)) if ious else None
    if ious:
        out.update({"positioning_n": len(ious), "positioning_mean_iou": out["mean_iou"],
                    "positioning_acc_at_iou": out["acc_at_iou"]})
    return out


@TASK.register("spine")
class SpineTask(Task):
    """Lumbar spine MRI: classification tasks by accuracy and macro-F1, positioning by IoU and Acc@0.5."""

    title = "Lumbar spine MRI"
    protocols = (PROTOCOL,)
    columns = (Column("n", "n", percent=False), Column("accuracy", "acc"), Column("macro_f1", "macro-F1"),
               Column("mean_iou", "mean IoU"), Column("acc_at_iou", "Acc@0.5"),
               Column("n_unparsed", "unparsed", percent=False))
    reliance_columns = (Column("accuracy", "acc"), Column("macro_f1", "macro-F1"), Column("acc_at_iou", "Acc@0.5"))
    breakdowns = (Breakdown("spine_task", "task"), Breakdown("level", "level"))
    notes = ("The `all` row's macro-F1 is the mean of the tasks' macro-F1; see the task rows for each task.",)

    def prepare(self, rows, where, image_dir=None):
        out = super().prepare(rows, where, image_dir)
        for i, row in enumerate(out):
            task = row.get("spine_task")
            if task not in (*CLASS_TASKS, POSITIONING):
                raise TaskError(f"{where}: {row_name(row, i)} has spine_task {task!r}; expected one of "
                                f"{', '.join((*CLASS_TASKS, POSITIONING))} (records from `medm data build spine`)")
            if task == POSITIONING:
                size = tuple(row["image_size"]) if row.get("image_size") else None
                try:
                    row["gold_boxes"] = _gold_boxes(row["answer"], size)
                except ValueError as e:
                    raise TaskError(f"{where}: {row_name(row, i)}: {e}") from None
                if not row["gold_boxes"]:
                    raise TaskError(f"{where}: {row_name(row, i)}: answer {row['answer']!r} holds no box")
                try:
                    parse_boxes(row["prediction"], size)
                except ValueError as e:
                    raise TaskError(f"{where}: {row_name(row, i)}: {e}") from None
                continue
            options = row.get("options") or DEFAULT_CLASSES[task]
            if row["answer"] not in options:
                raise TaskError(f"{where}: {row_name(row, i)}: answer {row['answer']!r} is not one of its options "
                                f"{list(options)}")
            row["options"] = list(options)
        return out

    def score(self, rows, protocol):
        return score_spine(rows)

    def protocol_note(self, protocol):
        return ("spine: a class answer is right when the prediction equals the answer or names it, alone, in its "
                "first clause; macro-F1 per task over the classes present; positioning by IoU of the first box, "
                "Acc@0.5 = share with IoU >= 0.5.")
