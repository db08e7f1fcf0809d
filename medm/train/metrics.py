"""Training logs beside the checkpoints: `metrics.jsonl` (one line per Trainer log), the `loss.png` curve, and the
model card of every checkpoint (`ModelCardCallback`; the card itself is medm.interop.model_card)."""

from __future__ import annotations

import json
import logging
import os

from transformers import TrainerCallback

from medm.interop.model_card import CARD_FILE, METRICS_FILE, read_metrics, write_model_card
from medm.train.stages import checkpoint_format, resolve_plan

logger = logging.getLogger(__name__)
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


def plot_loss(output_dir: str) -> str | None:
    """Write loss.png from metrics.jsonl (training loss, and validation loss when evaluated); None when nothing was
    logged."""
    rows = read_metrics(output_dir)
    points = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not points:
        return None
    # A bare Figure renders with Agg and leaves pyplot's global backend alone (no display on training machines).
    from matplotlib.figure import Figure  # defers matplotlib

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None,
            label="training")
    if val:
        ax.plot([p[0] for p in val], [p[1] for p in val], marker="o", label="validation")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(os.path.basename(os.path.abspath(output_dir)))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = os.path.join(output_dir, LOSS_PLOT)
    fig.savefig(out)
    return out


class ModelCardCallback(TrainerCallback):
    """Writes the card of every checkpoint-N a run saves, and of its output_dir when training ends (the final
    weights are saved there right after).

    Args:
        train_config: the run's `TrainConfig` (data files and stage plan for the card).
    """

    def __init__(self, train_config):
        self.train_config = train_config

    def _write(self, ckpt_dir: str, state, model) -> None:
        if not state.is_world_process_zero or model is None:
            return
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        try:
            modes = resolve_plan(base, self.train_config.stage)
            write_model_card(ckpt_dir, config=base.config, fmt=checkpoint_format(modes),
                             train_config=self.train_config, state=state,
                             modes={k: m.name + (f":{m.blocks}" if m.blocks else "") for k, m in modes.items()})
        except Exception as e:  # a card must never cost a run its final weights (saved after on_train_end)
            logger.warning("could not write the model card %s: %s: %s", os.path.join(ckpt_dir, CARD_FILE),
                           type(e).__name__, e)

    def on_save(self, args, state, control, model=None, **kwargs):
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt):
            self._write(ckpt, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write(args.output_dir, state, model)
        if model is not None and hasattr(model, "create_or_update_model_card"):
            # The final adapter is saved right after this, and PEFT's save_pretrained then rewrites README.md as a
            # generic PEFT card (its own tags, an empty base_model); write ours again after it.
            peft_update = model.create_or_update_model_card

            def update(output_dir: str) -> None:
                peft_update(output_dir)
                self._write(output_dir, state, model)

            model.create_or_update_model_card = update
