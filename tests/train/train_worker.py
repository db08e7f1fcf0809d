"""python tests/train/train_worker.py SPEC_JSON  (or under torchrun): one tiny training run in a fresh process.

SPEC_JSON: {"out": dir, "data": train.json, "stage": {...}, "train": {...}, "data_args": {...}}. Each rank writes
`rank{R}.pt` with its weights at the start and the end of training, what the Trainer ran with and the evaluations it
logged, for tests/train/test_distributed.py and test_generation_eval.py.
"""

import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    spec = json.loads(sys.argv[1])
    import deepspeed.comm.torch as ds_torch

    # DeepSpeed JIT-compiles a shared-memory all-reduce kernel on its first CPU init (~90 s on 2 cores). Only its
    # inference all-reduce uses that kernel, so these training runs skip the build.
    ds_torch.build_shm_op = lambda: None
    from train_helpers import make_cfg
    from transformers import TrainerCallback

    from medm.train._distributed import whole_weights
    from medm.train.trainer import run_training

    out = Path(spec["out"])
    cfg = make_cfg(out, Path(spec["data"]), spec.get("stage"), data_args=spec.get("data_args"),
                   **spec.get("train", {}))
    start = {}

    class RecordStart(TrainerCallback):
        """The starting weights, whole (ZeRO-3 built them partitioned)."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            with whole_weights(model):
                start.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    trainer = run_training(cfg, callbacks=[RecordStart()])
    rank = int(os.environ.get("RANK", "0"))
    ds = trainer.deepspeed if trainer.is_deepspeed_enabled else None
    torch.save({
        "start": start,
        "end": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
        "world_size": trainer.args.world_size,
        "zero_stage": ds.zero_optimization_stage() if ds is not None else None,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "evals": [h for h in trainer.state.log_history if "eval_loss" in h],  # what this rank logged
        # What this rank's first batch holds (each rank reads its own shard of the data).
        "first_batch_pixels": next(iter(trainer.get_train_dataloader()))["pixel_values"].cpu(),
    }, out / f"rank{rank}.pt")
    from medm.train._distributed import finish_process_group

    finish_process_group()  # as `medm train` does: no rank exits while the other still talks to it


if __name__ == "__main__":
    main()
