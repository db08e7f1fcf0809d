"""python tests/train/dist_worker.py SPEC_JSON  (or under torchrun): several tiny training runs in one process.

SPEC_JSON: {"runs": [{"out": dir, "data": train.json, "model": "medm" | "medm3d" | "qwenvl", "stage": {...},
"train": {...}, "data_args": {...}, "replay": [sample indices] (optional)}, ...]}. Runs of one launch must share
their kind of scale-out (DDP or one ZeRO stage): Accelerate keeps that per process.

Each rank writes `<out>/rank{R}.pt` per run: the logged losses, the sample indices and the media counts of the
batches it trained on, and its final weights (gathered under ZeRO-3), for tests/train/test_distributed_mixed.py.
`replay` makes a one-process run train on exactly those samples in that order (the global batches of a
distributed run), so its losses can be compared step by step.
"""

import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def model_config(kind: str) -> dict:
    from medm.config import load_yaml
    from medm.models.tiny import tiny_model_config, tiny_vision

    if kind == "qwenvl":
        return load_yaml(str(REPO / "configs" / "model" / "tiny-qwen2.5-vl.yaml"))
    cfg = tiny_model_config()
    if kind == "medm3d":
        cfg["vision3d"] = {"name": "vit3d", **tiny_vision("vit3d"), "volume": {"intensity": "uint8"}}
        cfg["connector3d"] = {"name": "spatial_pool", "stride": 2}
    return cfg


def _media(batch: dict) -> dict:
    """How many images and volumes a collated batch holds (either kind's collator)."""
    grid = batch.get("image_grid_thw")
    images = grid.shape[0] if grid is not None else (batch["pixel_values"].shape[0] if "pixel_values" in batch else 0)
    volumes = batch["pixel_values_3d"].shape[0] if "pixel_values_3d" in batch else 0
    return {"images": int(images), "volumes": int(volumes)}


def _recording(build, indices: list, media: list, replay: list | None):
    """Wrap `build_training_inputs`: note every sample index fetched and the media of every batch collated; with
    `replay`, the sampler is that list of indices."""

    def wrapped(cfg, model, tokenizer):
        dataset, collator, sampler = build(cfg, model, tokenizer)
        cls = type(dataset)

        class Recorded(cls):
            def __getitem__(self, i):
                indices.append(int(i))
                return cls.__getitem__(self, i)

        dataset.__class__ = Recorded

        def collate(items):
            batch = collator(items)
            media.append(_media(batch))
            return batch

        return dataset, collate, (list(replay) if replay is not None else sampler)

    return wrapped


def _weights(trainer) -> dict:
    model = trainer.model
    params = list(model.named_parameters())
    if trainer.is_deepspeed_enabled and trainer.deepspeed.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


def run_one(run: dict) -> None:
    from accelerate.state import AcceleratorState, PartialState
    from train_helpers import make_cfg

    import medm.train.trainer as trainer_mod

    out = Path(run["out"])
    cfg = make_cfg(out, Path(run["data"]), run.get("stage"), model=model_config(run["model"]),
                   data_args=run.get("data_args"), **run.get("train", {}))
    indices, media = [], []
    build = trainer_mod.build_training_inputs
    trainer_mod.build_training_inputs = _recording(build, indices, media, run.get("replay"))
    try:
        trainer = trainer_mod.run_training(cfg)
    finally:
        trainer_mod.build_training_inputs = build
    steps, batch = trainer.state.global_step, trainer.args.per_device_train_batch_size
    rank = int(os.environ.get("RANK", "0"))
    ds = trainer.deepspeed if trainer.is_deepspeed_enabled else None
    torch.save({
        "world_size": trainer.args.world_size,
        "zero_stage": ds.zero_optimization_stage() if ds is not None else None,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
        # The data loader may fetch one batch ahead of the last step.
        "indices": indices[:steps * batch], "media": media[:steps],
        "end": _weights(trainer),
    }, out / f"rank{rank}.pt")
    # The next run of this process builds its own Accelerator (same kind of scale-out).
    AcceleratorState._reset_state()
    PartialState._reset_state()


def main() -> None:
    spec = json.loads(sys.argv[1])
    import deepspeed.comm.torch as ds_torch

    # DeepSpeed JIT-compiles a shared-memory all-reduce kernel on its first CPU init (~90 s on 2 cores) that only its
    # inference all-reduce uses; these training runs skip the build.
    ds_torch.build_shm_op = lambda: None
    for run in spec["runs"]:
        run_one(run)
    from medm.train._distributed import finish_process_group

    # As `medm train` does: no rank exits while the other still talks to it (gloo aborts the survivor with -6).
    finish_process_group()


if __name__ == "__main__":
    main()
