"""What a checkpoint directory holds for its model card: the card's `medm:` front matter, the training figures
(trainer_state.json, metrics.jsonl), `medm eval` metrics.json files and the stored parameter count."""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any

import yaml
from safetensors import safe_open

CARD_FILE = "README.md"
METRICS_FILE = "metrics.jsonl"  # what medm.train.metrics.MetricsJsonl logs, one JSON record per line
EVAL_FILE = "metrics.json"
TRAINER_STATE = "trainer_state.json"


# ---- reading what a directory holds ---------------------------------------------------------------------------
def read_card_metadata(ckpt_dir: str) -> dict[str, Any]:
    """The `medm:` block of a card's front matter ({} when there is no card or no block)."""
    path = os.path.join(ckpt_dir, CARD_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        text = f.read()
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return {}
    try:
        meta = yaml.safe_load(text[4:text.index("\n---", 4)]) or {}
    except yaml.YAMLError:
        return {}
    return meta.get("medm") or {} if isinstance(meta, dict) else {}


def _json_safe(value: Any) -> Any:
    # YAML front matter must stay plain: NaN / inf losses become strings.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(output_dir: str) -> list[dict]:
    """The logged records, one per step and kind (training, validation, other; a resumed run re-logs steps after its
    checkpoint: the last one wins)."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    by_step: dict[tuple[int, bool, bool], dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[(rec["step"], "loss" in rec, "eval_loss" in rec)] = rec
    return [by_step[k] for k in sorted(by_step)]


def training_figures(ckpt_dir: str | None, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Final loss, steps, epochs, tokens and runtime from a TrainerState (given, or trainer_state.json in the
    directory) and the directory's metrics.jsonl; keys are left out where nothing records them."""
    if state is None and ckpt_dir and os.path.isfile(os.path.join(ckpt_dir, TRAINER_STATE)):
        with open(os.path.join(ckpt_dir, TRAINER_STATE)) as f:
            state = json.load(f)
    logs = list((state or {}).get("log_history") or [])
    if ckpt_dir:
        logs += read_metrics(ckpt_dir)
    fig: dict[str, Any] = {}
    step_logs = [r for r in logs if "loss" in r]
    if step_logs:
        last = max(step_logs, key=lambda r: r.get("step", 0))
        fig["final_loss"] = _json_safe(float(last["loss"]))
        fig["first_loss"] = _json_safe(float(min(step_logs, key=lambda r: r.get("step", 0))["loss"]))
    summary = [r for r in logs if "train_loss" in r]
    if summary:
        fig["mean_train_loss"] = _json_safe(float(summary[-1]["train_loss"]))
        if "train_runtime" in summary[-1]:
            fig["runtime_s"] = round(float(summary[-1]["train_runtime"]), 1)
    steps = (state or {}).get("global_step") or max((r.get("step", 0) for r in logs), default=0)
    if steps:
        fig["steps"] = int(steps)
    epoch = (state or {}).get("epoch") or max((r.get("epoch") or 0 for r in logs), default=0)
    if epoch:
        fig["epochs"] = round(float(epoch), 3)
    tokens = (state or {}).get("num_input_tokens_seen") or max(
        (r.get("num_input_tokens_seen", 0) for r in logs), default=0)
    if tokens:
        fig["tokens"] = int(tokens)
    return fig


def evaluation_figures(paths: list[str]) -> dict[str, dict[str, Any]]:
    """{label: headline metrics} from `medm eval` metrics.json files (numbers only; the breakdown is left out)."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of metrics (medm eval's metrics.json)")
        label = str(data.get("task") or os.path.basename(os.path.dirname(os.path.abspath(path))))
        if data.get("protocol"):
            label += f" ({data['protocol']})"
        out[label] = {k: _json_safe(v) for k, v in data.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def _find_eval_files(*dirs: str | None) -> list[str]:
    """metrics.json beside the checkpoint, or one folder down (e.g. runs/finetune/eval_vqa_rad/metrics.json)."""
    found: list[str] = []
    for d in dirs:
        if not d or not os.path.isdir(d):
            continue
        for path in [os.path.join(d, EVAL_FILE), *sorted(glob.glob(os.path.join(d, "*", EVAL_FILE)))]:
            if os.path.isfile(path) and os.path.abspath(path) not in map(os.path.abspath, found):
                found.append(path)
    return found


def _count_parameters(ckpt_dir: str) -> int | None:
    """Parameters stored in the directory's safetensors files (headers only; no weights are read)."""
    files = sorted(glob.glob(os.path.join(ckpt_dir, "*.safetensors")))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(path, "pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


# Timing figures every evaluation logs; not validation results.
_EVAL_TIMING = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time")


def _eval_figures(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, int) else _json_safe(float(v)) for k, v in row.items()
            if k.startswith("eval_") and k not in _EVAL_TIMING and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def validation_figures(state: dict[str, Any] | None, metric: str | None = None, curve: bool = False
                       ) -> dict[str, Any]:
    """What the run's evaluations found, from a TrainerState dict: `evaluations` (their number), `last` (the last
    one's figures), and where checkpoints were ranked by `metric` (metric_for_best_model): `metric`,
    `best_metric`, `best_step`, `best_checkpoint` and `best` (that evaluation's figures). `curve`: also every
    evaluation as `{"step", figures...}`. {} when nothing was evaluated."""
    evals = [r for r in (state or {}).get("log_history") or [] if "eval_loss" in r]
    if not evals:
        return {}
    out: dict[str, Any] = {"evaluations": len(evals)}
    if metric and state.get("best_metric") is not None:
        out["metric"] = metric if metric.startswith("eval_") else f"eval_{metric}"
        out["best_metric"] = _json_safe(float(state["best_metric"]))
        step = state.get("best_global_step")
        if not step:  # no checkpoint was saved at that evaluation (save_strategy: no): find it in the logs
            step = next((r.get("step") for r in evals if r.get(out["metric"]) == state["best_metric"]), None)
        if step:
            out["best_step"] = int(step)
            if state.get("best_model_checkpoint"):
                out["best_checkpoint"] = os.path.abspath(state["best_model_checkpoint"])
            row = next((r for r in reversed(evals) if r.get("step") == step), None)
            if row is not None:
                out["best"] = _eval_figures(row)
    out["last"] = {"step": evals[-1].get("step"), **_eval_figures(evals[-1])}
    if curve:
        out["curve"] = [{"step": r.get("step"), **_eval_figures(r)} for r in evals]
    return out
