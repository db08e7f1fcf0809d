"""Training logs beside the checkpoints: `metrics.jsonl` (one line per Trainer log) and the `loss.png` curve."""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


class MetricsJsonl(TrainerCallback):
    """Append every Trainer log (`loss`, `learning_rate`, `grad_norm`, ...) with its step to metrics.jsonl.

    Args:
        fresh: a new run (not a resume): an old metrics.jsonl in output_dir is replaced.
    """

    def __init__(self, output_dir: str, fresh: bool = True):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.fresh = fresh

    def on_train_begin(self, args, state, control, **kwargs):
        # A new run in an old output_dir starts a new file; a resumed run appends to its own.
        if self.fresh and state.is_world_process_zero and os.path.isfile(self.path):
            os.remove(self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def read_metrics(output_dir: str) -> list[dict]:
    """The logged records, one per step (a resumed run re-logs steps after its checkpoint: the last one wins)."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    by_step: dict[tuple[int, bool], dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[(rec["step"], "loss" in rec)] = rec
    return [by_step[k] for k in sorted(by_step)]


def plot_loss(output_dir: str) -> str | None:
    """Write loss.png from metrics.jsonl; None when nothing was logged."""
    points = [(r["step"], r["loss"]) for r in read_metrics(output_dir) if "loss" in r]
    if not points:
        return None
    # A bare Figure renders with Agg and leaves pyplot's global backend alone (no display on training machines).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(os.path.basename(os.path.abspath(output_dir)))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = os.path.join(output_dir, LOSS_PLOT)
    fig.savefig(out)
    return out
