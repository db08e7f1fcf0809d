"""Tell DeepSpeed which accelerator this process has, before anything imports it."""

from __future__ import annotations

import os


def name_accelerator_for_deepspeed() -> None:
    """Set `DS_ACCELERATOR=cpu` when no CUDA device is visible (and the variable is unset).

    transformers imports DeepSpeed, when it is installed, to unwrap a model it saves; without the variable DeepSpeed
    guesses and warns "Setting accelerator to CPU. If you have GPU ..." on every CPU-only run.
    """
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch  # defers torch (medm --help)

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
