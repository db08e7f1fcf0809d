"""The arithmetic of `medm estimate`: sizes, the run's DeepSpeed / optimizer settings, and the bytes each part of a
training step keeps (weights, LoRA, vision encoder loads, activations). The method is in `medm.estimate`'s
docstring; this module builds no model and reads no config.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from medm.config import resolve_relative

if TYPE_CHECKING:  # torch loads where an estimate runs, so `medm --help` does not wait for it
    from torch import nn

GiB = 2**30

# Activation coefficients per LLM layer and token (see the module docstring and benchmarks/bench_memory.py):
# compute-dtype tensors (6 hidden-sized, 4 intermediate-sized, 2 key/value-sized) of which the linear inputs
# (3 hidden + 1 intermediate) only when the linears train; 2 hidden-sized fp32 norm internals.
_LAYER_HIDDEN, _LAYER_INTER, _LAYER_KV = 6, 4, 2
_LINEAR_HIDDEN, _LINEAR_INTER = 3, 1
_NORM_FP32_HIDDEN = 2
# Around the layers, per token: embeddings, final norm and head input (hidden-sized, in part fp32).
_BASE_HIDDEN_COMPUTE, _BASE_HIDDEN_FP32 = 2.25, 1.0
# The loss's peak at the start of the backward pass, bytes per token and vocabulary entry: the fp32 log-softmax
# cross-entropy keeps and its gradients (measured: 10.7 in fp32 runs, 11.4 with bf16 weights).
_VOCAB_PEAK_BYTES = 11
# A vision encoder layer per token: hidden-sized and MLP-sized tensors (LayerNorm + GELU MLP blocks).
_VISION_HIDDEN, _VISION_INTER = 10, 2
_OPTIMIZER_STATES = {"adam": 2, "sgd": 0}


class EstimateError(ValueError):
    """A config the estimate cannot read; the message names the field."""


# ---- sizes ------------------------------------------------------------------------------------------------------
def parse_size(text: str | int | float) -> int:
    """`24GB`, `80GiB`, `16g`, `512MB`, or a number of bytes -> bytes. GPU memory is quoted in binary units, so
    GB and GiB both mean 2**30."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise EstimateError(f"cannot read memory size {text!r}; write e.g. 24GB, 80GiB or 512MB")
    return int(float(m.group(1)) * 1024 ** "bkmgt".index(m.group(2) or "b"))


def human(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def count_parameters(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per stage component (vision, connector, llm, ...): `total` and `trainable` parameter counts (LoRA
    adapters count in the component they adapt). Parameters outside every component are under `other`."""
    from medm.train.stages import component_paths  # defers torch, transformers

    base = _base(model)
    owner: dict[int, str] = {}
    for name, paths in component_paths(base).items():
        for path in paths:
            for p in base.get_submodule(path).parameters():
                owner.setdefault(id(p), name)
    out: dict[str, dict[str, int]] = {}
    for p in model.parameters():
        row = out.setdefault(owner.get(id(p), "other"), {"total": 0, "trainable": 0})
        row["total"] += p.numel()
        row["trainable"] += p.numel() if p.requires_grad else 0
    return out


# ---- the run's settings -----------------------------------------------------------------------------------------
@dataclass
class ZeroSettings:
    stage: int = 0  # 0: no DeepSpeed (plain Trainer / DDP)
    offload_optimizer: bool = False
    offload_param: bool = False
    deepspeed: bool = False


def zero_settings(path: str | None, base_file: str | None = None) -> ZeroSettings:
    """ZeRO stage and offloading from a DeepSpeed JSON (`train.deepspeed`); no file: plain Trainer."""
    if not path:
        return ZeroSettings()

    found = resolve_relative(path, base_file) if base_file else path
    if not os.path.isfile(found):
        raise EstimateError(f"train.deepspeed: {path!r} not found")
    with open(found) as f:
        zero = json.load(f).get("zero_optimization", {})
    device = lambda key: (zero.get(key) or {}).get("device", "none") not in ("none", None)  # noqa: E731
    return ZeroSettings(int(zero.get("stage", 0)), device("offload_optimizer"), device("offload_param"), True)


def optimizer_states(optim: str) -> tuple[int, int | None]:
    """(states per trainable parameter, fixed bytes per state or None for the parameter's dtype)."""
    name = optim.lower()
    if "8bit" in name:
        return 2, 1
    if name.startswith("sgd"):
        return _OPTIMIZER_STATES["sgd"], None
    if "adam" in name or "lion" in name:
        return (1 if "lion" in name else _OPTIMIZER_STATES["adam"]), None
    raise EstimateError(f"train.optim: {optim!r}; the estimate knows adamw*, *8bit, lion and sgd optimizers")


@dataclass
class Geometry:
    """The LLM's shape as the activation formula needs it."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int
    vocab: int

    @classmethod
    def of(cls, model: nn.Module) -> Geometry:
        base = _base(model)
        cfg = getattr(base, "llm", None)
        cfg = cfg.config if cfg is not None else getattr(base.config, "text_config", base.config)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        return cls(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, heads, kv * head_dim,
                   base.get_output_embeddings().out_features)


@dataclass
class VisionLoad:
    """One encoder's part of a sample: tokens it runs over and emits, and what trains."""

    tokens_in: int  # encoder tokens per image (patches + prefix)
    tokens_out: int  # connector tokens per image in the LLM input
    hidden: int
    intermediate: int
    trained_layers: int
    connector_trains: bool
    images: int = 1


def vision_loads(model: nn.Module, modes: dict, images: dict[str, int]) -> list[VisionLoad]:
    from medm.train.stages import encoder_blocks  # defers torch, transformers

    base = _base(model)
    out = []
    for enc_name, con_name in (("vision", "connector"), ("vision3d", "connector3d")):
        enc, con = getattr(base, enc_name, None), getattr(base, con_name, None)
        if enc is None or not images.get(enc_name):
            continue
        mode = modes.get(enc_name)
        blocks = encoder_blocks(enc)
        trained = 0 if mode is None or mode.name == "frozen" else mode.blocks if mode.name == "partial" else len(blocks)
        hf_cfg = getattr(getattr(enc, "model", None), "config", None)
        inter = getattr(hf_cfg, "intermediate_size", None) or 4 * enc.hidden_size
        out.append(VisionLoad(enc.num_prefix_tokens + math.prod(enc.grid), con.num_tokens, enc.hidden_size, inter,
                              trained, modes.get(con_name) is not None and modes[con_name].trains,
                              images[enc_name]))
    return out


@dataclass
class LoraLoad:
    """LoRA on one LLM layer: the adapted linears' input features and ranks added up, and the adapter dropout."""

    in_features: int = 0
    rank: int = 0
    dropout: float = 0.0


def lora_load(model: nn.Module) -> LoraLoad:
    """What LoRA adds to the first LLM layer (every layer is alike)."""
    from medm.train.stages import encoder_blocks  # defers torch, transformers

    base = _base(model)
    llm = getattr(base, "llm", None) or base
    layer = encoder_blocks(llm)[0]
    load = LoraLoad()
    for sub in layer.modules():
        if hasattr(sub, "lora_A") and len(sub.lora_A):
            name = next(iter(sub.lora_A))
            load.in_features += sub.lora_A[name].in_features
            load.rank += sub.lora_A[name].out_features
            drop = sub.lora_dropout[name]
            load.dropout = max(load.dropout, getattr(drop, "p", 0.0))
    return load


def activation_bytes(geo: Geometry, tokens: int, seq_len: int, *, compute_bytes: int, attn: str,
                     checkpointing: bool, linears_train: bool, llm_trains_or_feeds: bool = True,
                     vision: list[VisionLoad] | None = None, samples: int = 1, lora: LoraLoad | None = None) -> int:
    """Activation memory of one forward + backward over `tokens` LLM tokens (`samples` rows of `seq_len`).

    Args:
        geo: the LLM's shape.
        compute_bytes: bytes of the compute dtype (2 for bf16 / fp16 runs, 4 in fp32).
        attn: the LLM's attention implementation (`eager` keeps attention probabilities).
        checkpointing: gradient checkpointing of the layers.
        linears_train: the LLM's linear layers train (full or LoRA), so their inputs are kept.
        llm_trains_or_feeds: anything before or in the LLM trains (else nothing is kept at all).
        vision: the encoders' loads per sample.
        lora: LoRA on the LLM layers: each adapter keeps its rank-sized hidden and, with dropout, its own dropped
            copy of the input and the dropout mask.
    """
    if not llm_trains_or_feeds:
        return 0
    b = compute_bytes
    h, inter, kv = geo.hidden, geo.intermediate, geo.kv_dim
    hidden_n = _LAYER_HIDDEN - (0 if linears_train else _LINEAR_HIDDEN)
    inter_n = _LAYER_INTER - (0 if linears_train else _LINEAR_INTER)
    per_layer = b * (hidden_n * h + inter_n * inter + _LAYER_KV * kv) + 4 * _NORM_FP32_HIDDEN * h
    if lora is not None:
        per_layer += b * lora.rank + ((b + 1) * lora.in_features if lora.dropout > 0 else 0)
    if attn == "eager":
        # Softmax in fp32, cast back to the compute dtype for the product with V (one copy in fp32 runs).
        per_layer += geo.heads * seq_len * (b + (4 if b != 4 else 0))
    vocab_peak = _VOCAB_PEAK_BYTES * geo.vocab
    if checkpointing:
        # Each layer keeps its input; the loss's buffers are gone before the first layer is recomputed.
        layers = geo.layers * b * h + max(per_layer, vocab_peak)
    else:
        # The loss's peak comes while every layer still holds its activations.
        layers = geo.layers * per_layer + vocab_peak
    base = b * _BASE_HIDDEN_COMPUTE * h + 4 * _BASE_HIDDEN_FP32 * h
    total = tokens * (layers + base)
    for v in vision or []:
        per_image = 0
        if v.trained_layers:
            layer = b * (_VISION_HIDDEN * v.hidden + _VISION_INTER * v.intermediate)
            per_image += v.tokens_in * (v.trained_layers * (b * v.hidden if checkpointing else layer)
                                        + (layer if checkpointing else 0))
        if v.connector_trains or v.trained_layers:
            # The connector's input features and its two hidden-sized MLP tensors per output token.
            per_image += b * (v.tokens_in * v.hidden + 2 * v.tokens_out * h)
        total += samples * v.images * per_image
    return int(total)


def _quantised_llm_weights(model: nn.Module) -> list[tuple[int, int]]:
    """(numel, element size) of the LLM linear weights QLoRA quantises (all but the output head)."""
    from torch import nn  # defers torch

    base = _base(model)
    head = base.get_output_embeddings()
    out = []
    for name, sub in base.llm.named_modules():
        if isinstance(sub, nn.Linear) and sub is not head and name and "lora_" not in name:
            w = sub.weight
            out.append((w.numel(), w.element_size()))
    return out
