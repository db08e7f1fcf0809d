"""Evaluate a predictions file with a task and write what `medm eval` writes: `metrics.json` and `report.md`.

    result = evaluate("vqa-rad", "runs/eval/preds.jsonl", protocol="strict", blank="runs/eval/preds_blank.jsonl")
    write_report(result, "runs/eval")      # metrics.json, report.md
    print(render_markdown(result))

`metrics.json` holds the task's headline metrics as flat keys (percentages 0-100 and counts; see docs/eval.md),
the same metrics of the blank-image run prefixed `blank_` when one is given, and `breakdown`: per grouping field
(`answer_type`, `question_type`, `image_organ`, ...) and group, the same keys again.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from medm.eval.bootstrap import DEFAULT_RESAMPLES, bootstrap_ci, paired_comparison
from medm.eval.tasks._base import Breakdown, Column, Task, TaskError
from medm.infer.predictions import load_predictions
from medm.registry import TASK

NONE_GROUP = "(none)"
BLANK_PREFIX = "blank_"


@dataclass
class GroupResult:
    """Metrics of the questions whose field `breakdown.key` has the value `group`."""

    breakdown: Breakdown
    group: str
    metrics: dict[str, Any]
    blank: dict[str, Any] | None = None
    ci: dict[str, list[float] | None] | None = None


@dataclass
class EvalResult:
    """Everything one evaluation found; `metrics_json` and `render_markdown` present it."""

    task: Task
    protocol: str
    predictions: str
    metrics: dict[str, Any]
    blank_predictions: str | None = None
    blank: dict[str, Any] | None = None
    groups: list[GroupResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bootstrap: dict[str, Any] | None = None  # {"resamples", "seed", "level", "method"} when intervals were drawn
    ci: dict[str, list[float] | None] | None = None  # {metric: [lo, hi]} of the headline figures
    compare_predictions: str | None = None
    comparison: dict[str, dict[str, Any]] | None = None  # bootstrap.paired_comparison: this file - the other


def group_rows(rows: list[dict[str, Any]], breakdown: Breakdown) -> dict[str, list[int]]:
    """Row indices per group of `breakdown`, groups sorted; a row without the field goes to "(none)"."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        value = row.get(breakdown.key)
        labels = [NONE_GROUP] if value is None else [str(value).strip()]
        if breakdown.sep is not None and value is not None:
            labels = [s.strip() for s in str(value).split(breakdown.sep) if s.strip()] or [NONE_GROUP]
        for label in dict.fromkeys(labels):
            groups[label].append(i)
    return {g: groups[g] for g in sorted(groups)}


def _pair_blank(rows: list[dict[str, Any]], blank_rows: list[dict[str, Any]], pred: str,
                blank: str, what: str = "blank-image predictions") -> list[dict[str, Any]]:
    """The other run's rows in the order of `rows`: each main row with the other prediction (a blank-image run, or
    another model's for `--compare`). The two files must hold the same ids with the same answers."""
    by_id = {str(r["id"]): r for r in blank_rows}
    ids = [str(r["id"]) for r in rows]
    missing = [i for i in ids if i not in by_id]
    extra = sorted(set(by_id) - set(ids))
    if missing or extra:
        parts = ([f"{len(missing)} id(s) of {pred} are missing (e.g. {missing[0]!r})"] if missing else []) + \
                ([f"{len(extra)} id(s) are not in {pred} (e.g. {extra[0]!r})"] if extra else [])
        raise TaskError(f"{blank}: the {what} must answer the same questions: " + "; ".join(parts))
    paired = []
    for row in rows:
        other = by_id[str(row["id"])]
        if str(other["answer"]) != str(row["answer"]):
            raise TaskError(f"{blank}: id {row['id']!r} has answer {other['answer']!r}, but {pred} has "
                            f"{row['answer']!r}; are both files answers to the same data?")
        paired.append({**row, "prediction": other["prediction"]})
    return paired


def evaluate(task: str | Task, predictions: str, *, protocol: str | None = None, blank: str | None = None,
             image_dir: str | None = None, bootstrap: int = 0, seed: int = 0, level: float = 95.0,
             compare: str | None = None) -> EvalResult:
    """Score a `medm infer` predictions file with a task, overall and per group, optionally against blank images.

    Args:
        task: a registered task name (`medm list`) or a Task.
        predictions: the JSONL file `medm infer` wrote.
        protocol: the task's scoring protocol (VQA tasks: "strict" or "llava-med"); None: the task's default.
        blank: predictions for the same questions made with blank images (`medm infer --blank-images`).
        image_dir: base directory of relative image paths (the grounding task reads image sizes).
        bootstrap: resamples for the percentile intervals of every figure, overall and per group (0: none).
        seed / level: the bootstrap's seed and confidence level in percent (`medm.eval.bootstrap`).
        compare: another model's predictions for the same questions: paired differences (this - other), their
            intervals and paired bootstrap p-values (`bootstrap` resamples, 1000 when 0).

    Raises:
        KeyError: unknown task (the message lists the known ones). ValueError: unknown protocol.
        FileNotFoundError / PredictionFileError / TaskError: a file that is missing, unreadable, or lacks what
            the task needs (the message names the file and the row id).
    """
    task = TASK.build(task) if isinstance(task, str) else task
    protocol = task.check_protocol(protocol)
    rows = task.prepare(load_predictions(predictions), predictions, image_dir)
    if not rows:
        raise TaskError(f"{predictions}: holds no predictions")
    blank_rows = None
    if blank is not None:
        raw_blank = load_predictions(blank)
        blank_rows = _pair_blank(rows, task.prepare(raw_blank, blank, image_dir), predictions, blank)
    result = EvalResult(task, protocol, predictions, task.score(rows, protocol), blank_predictions=blank,
                        blank=task.score(blank_rows, protocol) if blank_rows is not None else None)
    for b in task.breakdowns:
        if not any(row.get(b.key) is not None for row in rows):
            continue  # the data has no such field
        for group, idx in group_rows(rows, b).items():
            sub = [rows[i] for i in idx]
            result.groups.append(GroupResult(b, group, task.score(sub, protocol),
                                             task.score([blank_rows[i] for i in idx], protocol)
                                             if blank_rows is not None else None))
    result.notes = list(task.notes)
    unanswered = sum(1 for row in rows if row.get("unanswered"))
    if unanswered:
        result.metrics["unanswered"] = unanswered
        result.notes.append(f"{unanswered} of {len(rows)} question(s) are unanswered: `medm infer` could not read "
                            f"their image or volume (the `error` lines of {predictions}); they count as wrong.")
    if bootstrap:
        result.bootstrap = {"resamples": bootstrap, "seed": seed, "level": level, "method": "percentile"}
        result.ci = bootstrap_ci(task.scorer(rows, protocol), len(rows), bootstrap, seed, level)
        for g, (_, idx) in zip(result.groups, _group_indices(rows, task)):
            g.ci = bootstrap_ci(task.scorer([rows[i] for i in idx], protocol), len(idx), bootstrap, seed, level)
    if compare is not None:
        other = _pair_blank(rows, task.prepare(load_predictions(compare), compare, image_dir), predictions, compare,
                            "predictions to compare")
        result.compare_predictions = compare
        result.comparison = paired_comparison(task.scorer(rows, protocol), task.scorer(other, protocol), len(rows),
                                              bootstrap or DEFAULT_RESAMPLES, seed, level)
    if blank is not None and not all(r.get("blank_images") for r in raw_blank):
        result.notes.append(f"{blank} does not mark every row `blank_images` (was it written by "
                            "`medm infer --blank-images`?).")
    return result


def _group_indices(rows: list[dict[str, Any]], task: Task):
    """(breakdown, row indices) per reported group, in the order `evaluate` adds the groups."""
    for b in task.breakdowns:
        if any(row.get(b.key) is not None for row in rows):
            for idx in group_rows(rows, b).values():
                yield b, idx


def _with_blank(metrics: dict[str, Any], blank: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(metrics)
    if blank is not None:
        out.update({BLANK_PREFIX + k: v for k, v in blank.items() if k != "protocol"})
    return out


def metrics_json(result: EvalResult) -> dict[str, Any]:
    """The content of `metrics.json`: flat headline keys, `blank_*` keys, and `breakdown`."""
    breakdown: dict[str, dict[str, Any]] = defaultdict(dict)
    for g in result.groups:
        breakdown[g.breakdown.key][g.group] = {**_with_blank(g.metrics, g.blank), "ci": g.ci}
    return {"task": result.task.name, "protocol": result.protocol, "predictions": result.predictions,
            "blank_predictions": result.blank_predictions,
            **{k: v for k, v in _with_blank(result.metrics, result.blank).items() if k != "protocol"},
            "bootstrap": result.bootstrap, "ci": result.ci,
            "compare_predictions": result.compare_predictions, "comparison": result.comparison,
            "breakdown": dict(breakdown)}


def _fmt(value: Any, column: Column) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if column.percent else str(int(value))


def _delta(a: Any, b: Any) -> str:
    return "-" if a is None or b is None else f"{b - a:+.2f}"


def _rows(result: EvalResult):
    """(label, metrics, blank metrics) for the "all" row and every group row."""
    yield "all", result.metrics, result.blank
    for g in result.groups:
        yield f"{g.breakdown.label}: {g.group}", g.metrics, g.blank


def metrics_table(result: EvalResult) -> str:
    """The Markdown table of the task's columns: all questions, then each group."""
    cols = result.task.columns
    lines = ["| group | " + " | ".join(c.header for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for label, m, _ in _rows(result):
        lines.append(f"| {label} | " + " | ".join(_fmt(m.get(c.key), c) for c in cols) + " |")
    return "\n".join(lines)


def reliance_table(result: EvalResult) -> str:
    """Markdown table of the reliance columns with the image, with blank images, and the change (blank - image)."""
    cols = result.task.reliance_columns
    head = ["n"] + [f"{c.header} ({kind})" for c in cols for kind in ("image", "blank", "change")]
    lines = ["| group | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for label, m, b in _rows(result):
        cells = [str(m.get("n", "-"))]
        for c in cols:
            cells += [_fmt(m.get(c.key), c), _fmt(b.get(c.key), c), _delta(m.get(c.key), b.get(c.key))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_ci(ci: list[float] | None) -> str:
    return "-" if not ci else f"{ci[0]:.2f} to {ci[1]:.2f}"


def ci_table(result: EvalResult) -> str:
    """Markdown table of each percentage column's interval: all questions, then each group."""
    cols = [c for c in result.task.columns if c.percent]
    lines = ["| group | " + " | ".join(c.header for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for (label, _, _), ci in zip(_rows(result), [result.ci] + [g.ci for g in result.groups]):
        lines.append(f"| {label} | " + " | ".join(_fmt_ci((ci or {}).get(c.key)) for c in cols) + " |")
    return "\n".join(lines)


def comparison_table(result: EvalResult) -> str:
    """Markdown table of the paired comparison: each figure for both files, the difference, its interval, p."""
    lines = ["| figure | this | other | difference | 95% interval | p |", "|---|---:|---:|---:|---:|---:|"]
    for c in result.task.columns:
        d = (result.comparison or {}).get(c.key)
        if c.percent and d is not None:
            p = "-" if d["p"] is None else f"{d['p']:.3f}"
            lines.append(f"| {c.header} | {d['this']:.2f} | {d['other']:.2f} | {d['diff']:+.2f} | "
                         f"{_fmt_ci(d['ci'])} | {p} |")
    return "\n".join(lines)


def render_markdown(result: EvalResult) -> str:
    """`report.md`: what was scored and how, the metrics table, and the image-reliance table with `blank`."""
    task, n = result.task, result.metrics.get("n")
    lines = [f"# {task.title or task.name} evaluation", "",
             f"- task: `{task.name}`; predictions: `{result.predictions}` ({n} questions)",
             f"- protocol: `{result.protocol}`" + (f". {task.protocol_note(result.protocol)}"
                                                   if task.protocol_note(result.protocol) else "")]
    lines += [f"- {note}" for note in result.notes]
    lines += ["", metrics_table(result)]
    if result.blank is not None:
        lines += ["", "## Image reliance", "",
                  f"The same questions answered with every image replaced by a blank one (`{result.blank_predictions}`"
                  "); change = blank - image. A model that uses the image loses accuracy without it; a change "
                  "near 0 means the answers come from the question alone.", "", reliance_table(result)]
    if result.ci is not None:
        b = result.bootstrap
        lines += ["", f"## {b['level']:g}% confidence intervals", "",
                  f"Percentile bootstrap over questions ({b['resamples']} resamples, seed {b['seed']}): the range "
                  "in which the figure would fall on most test sets of this size drawn like this one.", "",
                  ci_table(result)]
    if result.comparison is not None:
        lines += ["", "## Paired comparison", "",
                  f"This file against `{result.compare_predictions}` on the same questions: difference = this - "
                  "other; its interval and the two-sided p-value come from the paired bootstrap (the same "
                  "resampled questions score both).", "", comparison_table(result)]
    return "\n".join(lines) + "\n"


def write_report(result: EvalResult, out_dir: str) -> dict[str, str]:
    """Write `metrics.json` and `report.md` into `out_dir` (created); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"metrics": os.path.join(out_dir, "metrics.json"), "report": os.path.join(out_dir, "report.md")}
    with open(paths["metrics"], "w", encoding="utf-8") as f:
        json.dump(metrics_json(result), f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(paths["report"], "w", encoding="utf-8") as f:
        f.write(render_markdown(result))
    return paths
