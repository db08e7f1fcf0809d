"""Training logs beside the checkpoints: `metrics.jsonl` (one line per Trainer log), the `loss.png` curve, the model
card of every checkpoint (`ModelCardCallback`; the card itself is medm.interop.model_card), and `results.json` (the
validation figures and the best checkpoint of a run that evaluated)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from transformers import TrainerCallback

from medm.interop.model_card import CARD_FILE, METRICS_FILE, read_metrics, validation_figures, write_model_card
from medm.train.stages import checkpoint_format, resolve_plan

logger = logging.getLogger(__name__)
LOSS_PLOT = "loss.png"
RESULTS_FILE = "results.json"


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


def plot_loss(output_dir: str, scores: list[str] | None = None) -> str | None:
    """Write loss.png from metrics.jsonl (training loss, and validation loss when evaluated); None when nothing was
    logged.

    Args:
        scores: validation figures in percent (e.g. eval_closed_accuracy of `train.eval_task`) drawn under the loss,
            on their own axis, where logged.
    """
    rows = read_metrics(output_dir)
    points = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not points:
        return None
    curves = {k: [(r["step"], r[k]) for r in rows if "eval_loss" in r and isinstance(r.get(k), (int, float))]
              for k in scores or []}
    curves = {k: v for k, v in curves.items() if v}
    # A bare Figure renders with Agg and leaves pyplot's global backend alone (no display on training machines).
    from matplotlib.figure import Figure  # defers matplotlib

    fig = Figure(figsize=(6, 6.5 if curves else 4), dpi=100)
    ax, *below = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2)) if curves else [fig.subplots()]
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None,
            label="training")
    if val:
        ax.plot([p[0] for p in val], [p[1] for p in val], marker="o", label="validation")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(os.path.basename(os.path.abspath(output_dir)))
    ax.grid(alpha=0.3)
    if curves:
        ax.set_xlabel("")
        for name, pts in curves.items():
            below[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name.removeprefix("eval_"))
        below[0].set_xlabel("step")
        below[0].set_ylabel("validation (%)")
        below[0].legend(fontsize="small")
        below[0].grid(alpha=0.3)
    fig.tight_layout()
    out = os.path.join(output_dir, LOSS_PLOT)
    fig.savefig(out)
    return out


def write_results(output_dir: str, state, args) -> str:
    """Write output_dir/results.json: the run's evaluations (`medm.interop._card_figures.validation_figures` with
    the whole curve: best checkpoint, its step and figures, the last figures) and whether the final weights in
    output_dir are the best checkpoint's (`load_best_model_at_end`)."""
    results = {"global_step": state.global_step,
               **validation_figures(dataclasses.asdict(state), args.metric_for_best_model, curve=True)}
    if "best_step" in results:
        results["final_weights"] = "best" if args.load_best_model_at_end and "best_checkpoint" in results else "last"
    path = os.path.join(output_dir, RESULTS_FILE)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    return path


class ModelCardCallback(TrainerCallback):
    """Writes the card of every checkpoint-N a run saves, and of its output_dir when training ends (the final
    weights are saved there right after).

    Args:
        train_config: the run's `TrainConfig` (data files and stage plan for the card).
    """

    def __init__(self, train_config):
        self.train_config = train_config

    def _write(self, ckpt_dir: str, state, model, notes: list[str] | None = None) -> None:
        if not state.is_world_process_zero or model is None:
            return
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        try:
            modes = resolve_plan(base, self.train_config.stage)
            write_model_card(ckpt_dir, config=base.config, fmt=checkpoint_format(modes),
                             train_config=self.train_config, state=state,
                             modes={k: m.name + (f":{m.blocks}" if m.blocks else "") for k, m in modes.items()},
                             notes=notes)
        except Exception as e:  # a card must never cost a run its final weights (saved after on_train_end)
            logger.warning("could not write the model card %s: %s: %s", os.path.join(ckpt_dir, CARD_FILE),
                           type(e).__name__, e)

    def on_save(self, args, state, control, model=None, **kwargs):
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt):
            self._write(ckpt, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        notes = None
        if args.load_best_model_at_end and state.best_model_checkpoint:
            # The Trainer restored the best checkpoint before this call: the weights saved next are its.
            notes = [f"The weights here are those of `{state.best_model_checkpoint}` (step {state.best_global_step}), "
                     f"the best by {args.metric_for_best_model} (train.load_best_model_at_end)."]
        self._write(args.output_dir, state, model, notes)
        if model is not None and hasattr(model, "create_or_update_model_card"):
            # The final adapter is saved right after this, and PEFT's save_pretrained then rewrites README.md as a
            # generic PEFT card (its own tags, an empty base_model); write ours again after it.
            peft_update = model.create_or_update_model_card

            def update(output_dir: str) -> None:
                peft_update(output_dir)
                self._write(output_dir, state, model, notes)

            model.create_or_update_model_card = update
