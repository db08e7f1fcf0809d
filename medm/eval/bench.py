"""`medm bench`: run a suite of benchmarks (infer + eval per task) and write one table of headline figures.

    suite = load_suite("radiology-vqa")                      # configs/bench/radiology-vqa.yaml, or a YAML path
    result = run_bench(suite, "runs/finetune", "runs/bench/radiology-vqa/finetune", compare="runs/bench/.../base")

Each task writes `OUT/<task name>/preds.jsonl`, `metrics.json` and `report.md` (as `medm infer` + `medm eval`);
the suite writes `OUT/bench.md` and `OUT/bench.csv`: per task its headline figure, 95% bootstrap interval and n,
and with `compare` (another model's bench folder for the same suite) the other model's figure, the paired
difference (this - other), its interval and the paired bootstrap p-value. Running the same command again resumes:
finished predictions are kept, a killed task's file is completed (`run_inference(resume=True)`), and the model is
loaded only when some task still has questions to answer.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from medm.config import ConfigError, arg, from_dict, load_yaml
from medm.registry import TASK

SUITE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                         "bench")


@dataclass
class BenchTask:
    """One benchmark of a suite."""

    name: str = arg(help="row label and output folder (unique within the suite)")
    task: str = arg(help="registered eval task (`medm list`): vqa-rad, omnimedvqa, report-zh, ...")
    data: str = arg(help="question file; relative paths start from the suite's data root (--data-root)")
    layout: str = arg("records", "records (medm records), or the task's published layout (`medm infer --layout`)")
    image_dir: str | None = arg(None, "directory relative image paths start from (relative: from the data root)")
    protocol: str | None = arg(None, "scoring protocol; default: the task's")
    metric: str | None = arg(None, "headline figure (a metrics.json key); default: the task's first percentage")
    limit: int | None = arg(None, "answer only the first N questions", ge=1)
    max_new_tokens: int | None = arg(None, "longest answer in tokens; default: the suite's")


@dataclass
class Suite:
    """A named list of benchmarks with shared generation settings."""

    name: str = arg(help="suite name (the YAML file's stem for shipped suites)")
    tasks: list[BenchTask] = arg(help="the benchmarks, in table order")
    description: str = arg("", "one line on what the suite measures")
    max_new_tokens: int = arg(64, "longest answer in tokens, unless a task sets its own", ge=1)
    batch_size: int = arg(8, "questions per generate call", ge=1)


def load_suite(name_or_path: str) -> Suite:
    """A suite from `configs/bench/<name>.yaml` or a YAML path; errors name the file and the key."""
    path = name_or_path if name_or_path.endswith((".yaml", ".yml")) else os.path.join(SUITE_DIR, f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(SUITE_DIR) if f.endswith(".yaml")) if os.path.isdir(SUITE_DIR) else []
        raise FileNotFoundError(f"no bench suite {name_or_path!r} ({path}); shipped suites: {', '.join(known)}")
    raw = load_yaml(path)
    raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    tasks = raw.pop("tasks", None)
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"{path}: 'tasks' must be a non-empty list of benchmarks")
    raw["tasks"] = [from_dict(BenchTask, t, f"{path}: tasks[{i}]") for i, t in enumerate(tasks)]
    suite = from_dict(Suite, raw, path)

    names = [t.name for t in suite.tasks]
    for t in suite.tasks:
        if t.task not in TASK.names():
            raise ConfigError(f"{path}: task {t.name!r}: unknown eval task {t.task!r}; known: "
                              f"{', '.join(TASK.names())}")
        if names.count(t.name) > 1:
            raise ConfigError(f"{path}: task name {t.name!r} appears more than once")
    return suite


@dataclass
class BenchRow:
    """One task's line of the table."""

    name: str
    task: str
    metric: str
    n: int
    value: float | None
    ci: list[float] | None
    compare: dict[str, Any] | None = None  # the paired comparison of `metric`, or None


@dataclass
class BenchResult:
    suite: Suite
    model: str
    out: str
    rows: list[BenchRow] = field(default_factory=list)
    compare: str | None = None
    paths: dict[str, str] = field(default_factory=dict)


def _device(device: str | None) -> str:
    import torch  # defers torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else device


def _join(root: str | None, path: str | None) -> str | None:
    return path if path is None or root is None or os.path.isabs(path) else os.path.join(root, path)


def _complete(preds: str, ids: list[str]) -> bool:
    from medm.infer.predictions import read_predictions  # defers torch, transformers

    if not os.path.isfile(preds):
        return False
    try:
        rows, _ = read_predictions(preds, resuming=True)
    except ValueError:
        return False
    return {str(r["id"]) for r in rows} >= set(ids)


def headline(task_obj: Any, spec: BenchTask) -> str:
    """The figure a task's row shows: the suite's `metric`, else the task's first percentage column."""
    return spec.metric or next(c.key for c in task_obj.columns if c.percent)


def run_bench(suite: Suite, model: str, out: str, *, compare: str | None = None, data_root: str | None = None,
              bootstrap: int = 1000, seed: int = 0, device: str | None = "auto", dtype: str | None = None,
              batch_size: int | None = None, limit: int | None = None, only: list[str] | None = None,
              progress: bool = False) -> BenchResult:
    """Infer and evaluate every task of `suite` (or the tasks named in `only`) with the checkpoint `model` into
    `out` (resumable), then write `bench.md` and `bench.csv`. `compare` is another model's bench folder for the
    same suite."""
    from medm.eval.report import evaluate, write_report  # defers torch, transformers
    from medm.infer.generate import GenerationSettings, Predictor  # defers torch, transformers
    from medm.infer.predictions import run_inference  # defers torch, transformers

    result = BenchResult(suite, model, out, compare=compare)
    unknown = sorted(set(only or []) - {t.name for t in suite.tasks})
    if unknown:
        raise ValueError(f"suite {suite.name!r} has no task {unknown[0]!r}; its tasks: "
                         f"{', '.join(t.name for t in suite.tasks)}")
    predictor = None
    for spec in suite.tasks:
        if only and spec.name not in only:
            row = _row_from_disk(spec, out, compare)  # an earlier run's result keeps its line in the table
            if row is not None:
                result.rows.append(row)
            continue
        task_obj = TASK.build(spec.task)
        data, image_dir = _join(data_root, spec.data), _join(data_root, spec.image_dir)
        records = task_obj.load_records(data, spec.layout)
        n_max = min(x for x in (spec.limit, limit, len(records)) if x is not None)
        records = records[:n_max]
        task_dir = os.path.join(out, spec.name)
        preds = os.path.join(task_dir, "preds.jsonl")
        if not _complete(preds, [r.id for r in records]):
            if predictor is None:
                predictor = Predictor.from_pretrained(model, dtype=dtype, device=_device(device))
            predictor.image_dir = image_dir
            settings = GenerationSettings(max_new_tokens=spec.max_new_tokens or suite.max_new_tokens)
            run_inference(predictor, records, preds, data=data, batch_size=batch_size or suite.batch_size,
                          settings=settings, resume=True, progress=progress)
        other = os.path.join(compare, spec.name, "preds.jsonl") if compare else None
        if other is not None and not os.path.isfile(other):
            raise FileNotFoundError(f"--compare {compare}: no predictions for task {spec.name!r} ({other}); run the "
                                    "same suite with the other model first")
        ev = evaluate(task_obj, preds, protocol=spec.protocol, image_dir=image_dir, bootstrap=bootstrap, seed=seed,
                      compare=other)
        write_report(ev, task_dir)
        key = headline(task_obj, spec)
        result.rows.append(BenchRow(spec.name, spec.task, key, ev.metrics["n"], ev.metrics.get(key),
                                    (ev.ci or {}).get(key), (ev.comparison or {}).get(key) if other else None))
    result.paths = write_table(result)
    return result


def _row_from_disk(spec: BenchTask, out: str, compare: str | None) -> BenchRow | None:
    """The table line of a task evaluated by an earlier run (its metrics.json), or None."""
    path = os.path.join(out, spec.name, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        m = json.load(f)
    key = headline(TASK.build(spec.task), spec)
    cmp = (m.get("comparison") or {}).get(key) if compare else None
    return BenchRow(spec.name, spec.task, key, m.get("n", 0), m.get(key), (m.get("ci") or {}).get(key), cmp)


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def _ci(ci: list[float] | None) -> str:
    return "-" if not ci else f"{ci[0]:.2f} to {ci[1]:.2f}"


def table_rows(result: BenchResult) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the bench table (the same for Markdown and CSV)."""
    head = ["task", "benchmark", "figure", "n", "value", "95% CI"]
    if result.compare:
        head += ["other", "difference", "difference 95% CI", "p"]
    rows = []
    for r in result.rows:
        cells = [r.name, r.task, r.metric, str(r.n), _f(r.value), _ci(r.ci)]
        if result.compare:
            c = r.compare or {}
            p = c.get("p")
            cells += [_f(c.get("other")), "-" if c.get("diff") is None else f"{c['diff']:+.2f}", _ci(c.get("ci")),
                      "-" if p is None else f"{p:.3f}"]
        rows.append(cells)
    return head, rows


def write_table(result: BenchResult) -> dict[str, str]:
    """`bench.md` and `bench.csv` in the bench folder; returns their paths."""
    os.makedirs(result.out, exist_ok=True)
    head, rows = table_rows(result)
    paths = {"markdown": os.path.join(result.out, "bench.md"), "csv": os.path.join(result.out, "bench.csv")}
    lines = [f"# Bench: {result.suite.name}", "", f"- model: `{result.model}`"]
    if result.suite.description:
        lines.append(f"- suite: {result.suite.description}")
    if result.compare:
        lines.append(f"- compared with: `{result.compare}` (difference = this - other, paired bootstrap)")
    lines += ["- each task's folder holds `preds.jsonl`, `metrics.json` and `report.md`; intervals are 95% "
              "percentile-bootstrap intervals over questions", "",
              "| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(paths["csv"], "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        w.writerows(rows)
    return paths


def suite_fields() -> list[str]:
    """The keys a suite YAML and a task entry accept (for docs)."""
    return [f.name for f in dataclasses.fields(Suite)] + [f.name for f in dataclasses.fields(BenchTask)]
