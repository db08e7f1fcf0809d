"""LLM families: per-family defaults, and loading any HF causal LM from a config, a directory or a hub id."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from medm.models import _packed_attention
from medm.registry import LLM

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "sdpa_varlen", "flash_attention_2")
_packed_attention.register()  # `sdpa_varlen`: sdpa sample by sample over packed rows (medm.models._packed_attention)


@dataclass
class LLMFamily:
    """Defaults that differ between LLM families; every one can be overridden in the config.

    Args:
        lora_target_modules: linear layers LoRA adapts by default (Phi-3 fuses q/k/v into `qkv_proj`).
        template: registered chat template for tokenizers without their own (`None`: the tokenizer's).
    """

    lora_target_modules: list[str] = field(default_factory=list)
    template: str | None = None


_ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLM.register("qwen2")(LLMFamily(lora_target_modules=_ATTN_MLP))
LLM.register("llama")(LLMFamily(lora_target_modules=_ATTN_MLP))
LLM.register("phi3")(LLMFamily(lora_target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
LLM.register("phi")(LLMFamily(lora_target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
                              template="phi2"))
LLM.register("auto")(LLMFamily(lora_target_modules=["all-linear"]))


def warn_remote_code(source: str, what: str = "model") -> None:
    """Name in the log the checkpoint whose own Python code is about to run (`trust_remote_code: true`)."""
    logger.warning("trust_remote_code is ON: running the %s code shipped with %s (only for sources you trust)",
                   what, source)


def remote_code(trust: bool, source: str, what: str = "model") -> bool:
    """The `trust_remote_code` value to pass to a transformers `from_pretrained` / `from_config`, always explicit:
    left unset, transformers asks on stdin whether to run a checkpoint's own Python (`auto_map`), so a piped
    `y` would run it. Logged when on."""
    if trust:
        warn_remote_code(source, what)
    return bool(trust)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def check_attn_implementation(name: str) -> str:
    """Validate `attn_implementation`; flash attention needs its package (and a GPU) present."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attn_implementation {name!r}; known: {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ImportError("attn_implementation 'flash_attention_2' needs the flash-attn package "
                              "(pip install -e '.[gpu]' on a CUDA machine); use 'sdpa' on the CPU")
        if not torch.cuda.is_available():
            raise RuntimeError("attn_implementation 'flash_attention_2' needs a CUDA GPU; use 'sdpa' on the CPU")
    return name


def resolve_text_config(llm: dict[str, Any]) -> PretrainedConfig:
    """The LLM's HF config from `llm.config` (a dict with `model_type`) or from `llm.path`."""
    trust = bool(llm.get("trust_remote_code", False))
    if llm.get("config"):
        cfg = dict(llm["config"])
        if "model_type" not in cfg:
            raise ValueError("llm.config needs a `model_type` (e.g. qwen2, llama, phi3)")
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if not llm.get("path"):
        raise ValueError("the llm section needs `path` (local dir or hub id) or `config`")
    if trust:
        warn_remote_code(llm["path"], "config")
    return AutoConfig.from_pretrained(llm["path"], trust_remote_code=trust)


def build_llm(text_config: PretrainedConfig, attn_implementation: str = "sdpa",
              trust_remote_code: bool = False) -> PreTrainedModel:
    """A randomly initialised causal LM from its config (weights come later, from a checkpoint)."""
    return AutoModelForCausalLM.from_config(text_config, attn_implementation=check_attn_implementation(
        attn_implementation), trust_remote_code=trust_remote_code)


def load_llm(path: str, text_config: PretrainedConfig, attn_implementation: str = "sdpa",
             trust_remote_code: bool = False, quantization_config=None) -> PreTrainedModel:
    """Pretrained causal LM weights from a local dir or hub id; `quantization_config` (e.g. a QLoRA stage's
    `BitsAndBytesConfig`) quantizes them as they load."""
    if trust_remote_code:
        warn_remote_code(path)
    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    return AutoModelForCausalLM.from_pretrained(path, config=text_config, trust_remote_code=trust_remote_code,
                                                attn_implementation=check_attn_implementation(attn_implementation),
                                                **extra)
