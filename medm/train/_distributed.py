"""Process-group helpers of `medm train`: ZeRO-3 partitioned weights made whole where a step needs them, and a
clean end of the process group.

ZeRO-3 loading: `run_training` builds its TrainingArguments before the model, which registers transformers'
`HfDeepSpeedConfig` for a ZeRO-3 config; `from_config` / `from_pretrained` then build and load the LLM (and
transformers vision encoders) inside `deepspeed.zero.Init`, each rank keeping only its partition, instead of
materialising the whole model on every rank first. benchmarks/bench_zero3_loading.py measures the host memory.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["finish_process_group", "is_partitioned", "prepare_zero3_loading", "whole_weights"]


def prepare_zero3_loading(args) -> None:
    """With a ZeRO-3 config registered (TrainingArguments made), start DeepSpeed's process group now: `zero.Init`
    checks the batch settings against the number of ranks as the model is built, before the Trainer would start it.

    Args:
        args: the run's transformers `TrainingArguments`.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled  # defers transformers

    if is_deepspeed_zero3_enabled():
        import deepspeed  # defers deepspeed

        deepspeed.init_distributed(dist_backend=args.ddp_backend or "nccl")


def is_partitioned(model: nn.Module) -> bool:
    """True when ZeRO-3 has partitioned the model's parameters (each rank holds a slice: `ds_id` marks them)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def whole_weights(model: nn.Module):
    """Context in which every parameter of `model` is whole on every rank (ZeRO-3 gathers them; rank 0's changes
    are kept on exit), for loading an earlier stage's weights or saving a base checkpoint. A no-op otherwise."""
    if not is_partitioned(model):
        return contextlib.nullcontext()
    import deepspeed  # defers deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0)


def finish_process_group() -> None:
    """End a launched run's process group together: a barrier, then `destroy_process_group`, so no rank exits while
    another still talks to it (gloo aborts the survivor)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
