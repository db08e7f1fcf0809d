"""QLoRA the standard way: the LLM's weights are quantized to NF4 as they load (`BitsAndBytesConfig` passed to
`from_pretrained`), then `peft.prepare_model_for_kbit_training` readies the model (norms and the other
full-precision weights in float32, everything frozen) before LoRA adapters go on.

What stays in full precision: the vision encoders and connectors (built outside the LLM: medm kind; named in the
config's skip list: Qwen-VL kind, `qwenvl.model.quantization_skip_modules`) and the output head (transformers'
default for the LLM alone).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from medm.config import ConfigError

__all__ = ["check_qlora", "is_quantized", "prepare_qlora", "qlora_load_config"]


def check_qlora() -> None:
    """Raise ConfigError unless a CUDA GPU and the bitsandbytes package are present."""
    if not torch.cuda.is_available():
        raise ConfigError("stage.llm: qlora loads the LLM in 4 bits with bitsandbytes, which needs a CUDA GPU; use "
                          "lora on the CPU")
    if not _bitsandbytes_installed():
        raise ConfigError("stage.llm: qlora needs the bitsandbytes package (pip install -e '.[gpu]')")


def _bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def qlora_load_config(compute_dtype: torch.dtype):
    """The `BitsAndBytesConfig` a qlora stage loads its LLM with: NF4, double quantization, `compute_dtype` matmuls.

    Raises ConfigError without CUDA or bitsandbytes (`check_qlora`).
    """
    check_qlora()
    from transformers import BitsAndBytesConfig  # defers transformers

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def is_quantized(model: nn.Module) -> bool:
    """True when the model (or its `llm`) was loaded in 4 or 8 bits."""
    parts = [model, getattr(model, "llm", None)]
    return any(getattr(m, "is_loaded_in_4bit", False) or getattr(m, "is_loaded_in_8bit", False)
               for m in parts if m is not None)


def prepare_qlora(model: nn.Module) -> nn.Module:
    """`peft.prepare_model_for_kbit_training`: freeze everything and keep the non-quantized weights in float32.

    Gradient checkpointing is left to the Trainer (`train.gradient_checkpointing`). Raises ConfigError when the
    model was not loaded quantized (run_training passes `qlora_load_config` to the loader).
    """
    if not is_quantized(model):
        raise ConfigError("stage.llm: qlora needs the LLM loaded in 4 bits (BitsAndBytesConfig at from_pretrained, as "
                          "`medm train` does from model.llm.path / model.qwenvl.path); this model was loaded in full "
                          "precision")
    from peft import prepare_model_for_kbit_training  # defers peft

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
