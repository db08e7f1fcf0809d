"""`medm estimate`: GPU memory of one training config, per GPU, before renting the GPU.

    medm estimate configs/train/finetune.yaml --gpu-mem 24GB
    medm estimate configs/train/finetune_lora.yaml train.per_device_train_batch_size=4 --num-gpus 8 --gpu-mem 80GB
    medm estimate configs/train/finetune.yaml --tiny          # the tiny twin of the config, fully offline

Four parts, in bytes per GPU:

- **weights**: every parameter at its dtype (`model.llm.dtype`; a `qlora` LLM's linear layers at 4 bits plus
  their quantisation constants). Counted on a model built on the meta device (no weight is loaded or allocated),
  with the stage plan applied, so the parameter counts are the real model's exactly; a config whose parts load from
  hub ids needs their `config.json` (and tokenizer) locally or in the HF cache. Under DeepSpeed the weights are in
  16 bits (bf16 / fp16 runs); ZeRO-3 divides them by the GPUs, `offload_param` moves them to the CPU.
- **gradients**: the trainable parameters at the parameter dtype (16 bits under DeepSpeed mixed precision);
  ZeRO-2 and -3 divide them by the GPUs.
- **optimizer states**: AdamW keeps two states per trainable parameter, at the parameter dtype with the plain
  Trainer, and in fp32 plus an fp32 master copy (12 bytes) under DeepSpeed mixed precision (8 bytes in fp32 runs);
  8-bit optimizers keep 2 bytes, SGD none. ZeRO-1 and up divide them by the GPUs, `offload_optimizer` moves them
  to the CPU.
- **activations**: what autograd keeps for the backward pass, plus the loss's transient peak, for
  `micro-batch x seq-len` tokens (every sample at `data.max_length` unless `--seq-len`). Per LLM layer and token:
  the attention inputs and output, the MLP's four intermediate tensors, the norms' fp32 internals and (when the
  LLM's linear layers train, fully or through LoRA) the linear layers' inputs; `eager` attention adds its
  probabilities (heads x seq-len per token). With gradient checkpointing, each layer keeps only its input and one
  layer is recomputed at a time. The logits and the cross-entropy's fp32 buffers (vocab per token) often dominate
  small models with large vocabularies. A trained vision encoder adds its layers over the image tokens. The
  coefficients were measured on transformers 5 Qwen2 / Llama layers (benchmarks/bench_memory.py compares the
  whole estimate with measured CPU peaks). For the qwen-vl kind the image tokens count as LLM tokens; its vision
  tower's own activations are not modelled.

Not counted: the CUDA context and kernels' workspace (`--reserve`, default 1 GiB), allocator fragmentation,
DeepSpeed's communication buckets.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads where an estimate runs, so `medm --help` does not wait for it
    from torch import nn

logger = logging.getLogger(__name__)

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


# ---- the model, on the meta device ------------------------------------------------------------------------------
def _offline_model_args(model_args):
    """Model args whose pretrained parts are described by their configs (paths dropped, so nothing loads).

    Returns (args, llm_vocab): llm_vocab is the pretrained LLM's vocabulary size, which the built model keeps
    (medm.models.builder resizes only when the tokenizer is larger), or None for a config-only LLM.
    """
    from medm.models.builder import load_tokenizer
    from medm.models.llm import resolve_text_config
    from medm.models.tiny import TINY_TEMPLATE_FOR_FAMILY
    from medm.registry import VISION

    args = copy.deepcopy(model_args)
    if args.kind != "medm":
        q = args.qwenvl
        if q.path is not None:
            from transformers import AutoConfig

            hf = _needs_files(lambda: AutoConfig.from_pretrained(q.path, trust_remote_code=q.trust_remote_code),
                              "model.qwenvl.path", q.path)
            q.config = {"model_type": hf.model_type, **hf.to_diff_dict()}
            q.processor = q.processor or q.path
            q.path = None
        return args, None
    llm = args.llm
    vocab = None
    if llm.path is not None:
        text = _needs_files(lambda: resolve_text_config(asdict(llm)), "model.llm.path", llm.path)
        vocab = text.vocab_size
        llm.tokenizer = llm.tokenizer or llm.path
        try:
            load_tokenizer(llm)
        except (OSError, ValueError):
            # The vocabulary then comes from config.json alone (medm's two media tokens fit in most models'
            # padded vocabularies; Llama 3's is full and grows by them).
            logger.warning("tokenizer %s not found locally: the vocabulary size comes from config.json",
                           llm.tokenizer)
            llm.tokenizer, llm.tiny_tokenizer = None, TINY_TEMPLATE_FOR_FAMILY.get(llm.family, "chatml")
        llm.config = {"model_type": text.model_type, **text.to_diff_dict()}
        llm.path = None
    for slot in ("vision", "vision3d"):
        section = getattr(args, slot)
        if section and section.get("path"):
            cls = VISION.get(section["name"])
            resolved = (_needs_files(lambda: cls.resolve_config(section), f"model.{slot}.path", section["path"])
                        if hasattr(cls, "resolve_config") else dict(section))
            if "config" in resolved:
                # HF encoders are fully described by their config; other encoders keep `path` only for weights,
                # which the meta build must not read, so it is dropped as well.
                resolved.pop("path", None)
            setattr(args, slot, resolved)
    return args, vocab


def _needs_files(read, field_name: str, path: str):
    try:
        return read()
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EstimateError(f"{field_name}: cannot read the config of {path!r} ({first}); the estimate needs its "
                            "config.json locally or in the HF cache, or use --tiny") from None


def meta_model(model_args):
    """(model, tokenizer) of a model config with every parameter on the meta device: exact shapes, no memory.

    A pretrained LLM keeps its own vocabulary size (or the tokenizer's, when larger), as `build_model` does.
    """
    import torch

    from medm.models.builder import build_model

    args, vocab = _offline_model_args(model_args)
    with torch.device("meta"):
        model, tokenizer = build_model(args)
        if vocab is not None:
            target = max(vocab, len(tokenizer.tokenizer if hasattr(tokenizer, "tokenizer") else tokenizer))
            if model.get_input_embeddings().num_embeddings != target:
                model.llm.resize_token_embeddings(target, mean_resizing=False)
    return model, tokenizer


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def count_parameters(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per stage component (vision, connector, llm, ...): `total` and `trainable` parameter counts (LoRA
    adapters count in the component they adapt). Parameters outside every component are under `other`."""
    from medm.train.stages import component_paths

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
    from medm.config import resolve_relative

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
    from medm.train.stages import encoder_blocks

    base = _base(model)
    out = []
    for enc_name, con_name in (("vision", "connector"), ("vision3d", "connector3d")):
        enc, con = getattr(base, enc_name, None), getattr(base, con_name, None)
        if enc is None or not images.get(enc_name):
            continue
        mode = modes.get(enc_name)
        blocks = encoder_blocks(enc)
        trained = 0 if mode is None or mode.kind == "frozen" else mode.blocks if mode.kind == "partial" else len(blocks)
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
    from medm.train.stages import encoder_blocks

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


# ---- the estimate -----------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """Bytes per GPU of one training config; `params` per component (`total`, `trainable`)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_per_sample: int
    params: dict[str, dict[str, int]]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def fixed(self) -> int:
        """Everything that does not grow with the micro-batch."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.fixed + self.activations

    def max_micro_batch(self, gpu_bytes: int, reserve: int = GiB) -> int:
        """Largest micro-batch whose estimate fits `gpu_bytes` minus `reserve` (0 when even the fixed part does
        not fit)."""
        room = gpu_bytes - reserve - self.fixed
        if room <= 0 or self.activations_per_sample <= 0:
            return 0 if room <= 0 else sys.maxsize
        return int(room // self.activations_per_sample)

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "total": self.total,
                "activations_per_sample": self.activations_per_sample, "params": self.params,
                "settings": self.settings}

    def table(self) -> str:
        s = self.settings
        lines = [f"medm estimate: micro-batch {s['micro_batch']} x {s['seq_len']} tokens, {s['precision']}, "
                 f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
                 f"{'ZeRO-' + str(s['zero_stage']) if s['deepspeed'] else 'no DeepSpeed'} on {s['num_gpus']} GPU(s)",
                 "", f"{'component':<12} {'params':>14} {'trainable':>14}"]
        for name, row in self.params.items():
            lines.append(f"{name:<12} {row['total']:>14,} {row['trainable']:>14,}")
        lines += ["", f"{'weights':<20} {human(self.weights):>12}", f"{'gradients':<20} {human(self.gradients):>12}",
                  f"{'optimizer states':<20} {human(self.optimizer):>12}",
                  f"{'activations':<20} {human(self.activations):>12}   ({human(self.activations_per_sample)} "
                  "per sample)", f"{'total per GPU':<20} {human(self.total):>12}"]
        return "\n".join(lines)


def estimate(cfg, *, num_gpus: int = 1, micro_batch: int | None = None, seq_len: int | None = None,
             images_per_sample: int | None = None, config_file: str | None = None) -> Estimate:
    """Memory per GPU of training `cfg` (a `TrainConfig`).

    Args:
        num_gpus: data-parallel GPUs (ZeRO partitions over them).
        micro_batch: samples per GPU per forward pass; default `train.per_device_train_batch_size`.
        seq_len: tokens per sample; default `data.max_length` (or 2048 without a data section).
        images_per_sample: images (and volumes) per sample for each encoder the model has; default 1.
        config_file: the YAML `cfg` came from (relative `train.deepspeed` paths start there).
    """
    import torch

    from medm.models.llm import resolve_dtype
    from medm.train.stages import LORA, StagePlan, apply_plan, resolve_plan

    train = cfg.train
    micro_batch = micro_batch or train.per_device_train_batch_size
    data = cfg.data or {}
    seq_len = seq_len or int(data.get("pack_length") or data.get("max_length") or 2048)
    zero = zero_settings(train.deepspeed, config_file)
    model, _ = meta_model(cfg.model)
    plan = copy.deepcopy(cfg.stage) if cfg.stage is not None else StagePlan()
    modes = resolve_plan(model, plan)
    qlora = modes.get("llm") is not None and modes["llm"].kind == "qlora"
    if qlora:
        # 4-bit quantisation needs CUDA: count the same adapters on the unquantised model, weights at 4 bits below.
        plan.llm = LORA
        modes = resolve_plan(model, plan)
    half = train.bf16 or train.fp16
    param_dtype = resolve_dtype(cfg.model.llm.dtype) if cfg.model.kind == "medm" else resolve_dtype(
        cfg.model.qwenvl.dtype)
    model = apply_plan(model, plan, torch.bfloat16 if train.bf16 else torch.float16 if train.fp16 else torch.float32)
    params = count_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)

    if zero.deepspeed and half:
        weight_bytes = sum(p.numel() for p in model.parameters()) * 2
        grad_bytes = n_train * 2
        states, state_bytes = optimizer_states(train.optim)
        opt_bytes = n_train * (4 + 4 * states) if state_bytes is None else n_train * (4 + states * state_bytes)
    else:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
        states, state_bytes = optimizer_states(train.optim)
        opt_bytes = sum(p.numel() * states * (state_bytes or p.element_size()) for p in trainable)
    if qlora:
        quantised = _quantised_llm_weights(model)
        weight_bytes -= sum(n * (2 if zero.deepspeed and half else size) for n, size in quantised)
        # NF4: half a byte per weight, plus one fp32 absmax per block of 64 (double quantisation shrinks it).
        weight_bytes += sum(math.ceil(n / 2) + 4 * math.ceil(n / 64) for n, _ in quantised)
    if zero.stage >= 3:
        weight_bytes = 0 if zero.offload_param else weight_bytes // num_gpus
    if zero.stage >= 2:
        grad_bytes //= num_gpus
    if zero.stage >= 1:
        opt_bytes = 0 if zero.offload_optimizer else opt_bytes // num_gpus

    compute_bytes = 2 if (half or param_dtype in (torch.bfloat16, torch.float16)) else 4
    geo = Geometry.of(model)
    encoders = [e for e in ("vision", "vision3d") if getattr(_base(model), e, None) is not None]
    images = {e: (1 if images_per_sample is None else images_per_sample) for e in encoders}
    loads = vision_loads(model, modes, images)
    attn = (cfg.model.llm.attn_implementation if cfg.model.kind == "medm" else cfg.model.qwenvl.attn_implementation)
    llm_mode = modes.get("llm")
    kwargs = dict(compute_bytes=compute_bytes, attn=attn, checkpointing=train.gradient_checkpointing,
                  linears_train=llm_mode is not None and llm_mode.trains, vision=loads,
                  lora=lora_load(model) if llm_mode is not None and llm_mode.adapter else None)
    per_sample = activation_bytes(geo, seq_len, seq_len, samples=1, **kwargs)
    acts = activation_bytes(geo, micro_batch * seq_len, seq_len, samples=micro_batch, **kwargs)
    precision = "bf16" if train.bf16 else "fp16" if train.fp16 else str(param_dtype).removeprefix("torch.")
    settings = {"micro_batch": micro_batch, "seq_len": seq_len, "precision": precision,
                "param_dtype": str(param_dtype).removeprefix("torch."), "gradient_checkpointing":
                train.gradient_checkpointing, "deepspeed": zero.deepspeed, "zero_stage": zero.stage,
                "offload_optimizer": zero.offload_optimizer, "offload_param": zero.offload_param,
                "num_gpus": num_gpus, "optimizer": train.optim, "attn_implementation": attn, "images_per_sample":
                images, "modes": {k: v.kind + (f":{v.blocks}" if v.blocks else "") for k, v in modes.items()},
                "qlora": qlora}
    return Estimate(int(weight_bytes), int(grad_bytes), int(opt_bytes), acts, per_sample, params, settings)


def _quantised_llm_weights(model: nn.Module) -> list[tuple[int, int]]:
    """(numel, element size) of the LLM linear weights QLoRA quantises (all but the output head)."""
    from torch import nn

    base = _base(model)
    head = base.get_output_embeddings()
    out = []
    for name, sub in base.llm.named_modules():
        if isinstance(sub, nn.Linear) and sub is not head and name and "lora_" not in name:
            w = sub.weight
            out.append((w.numel(), w.element_size()))
    return out


# ---- command line -----------------------------------------------------------------------------------------------
def load_config(path: str, overrides: list[str] | None = None, tiny: bool = False):
    """A train config, optionally with its model swapped for the tiny offline twin (medm.models.tiny)."""
    from medm.config import to_dict
    from medm.models import parse_model_args
    from medm.models.tiny import tiny_overrides
    from medm.train.args import load_train_config

    cfg = load_train_config(path, overrides)
    if tiny:
        model = {k: v for k, v in to_dict(cfg.model).items() if v is not None}
        if model.get("kind") != "medm":
            model.pop("llm", None)  # the qwen-vl kind is configured in its own section only
        cfg.model = parse_model_args(tiny_overrides(model), f"{path}: model (tiny)")
    return cfg


def _cmd_estimate(args: argparse.Namespace) -> int:
    from medm.config import ConfigError

    try:
        cfg = load_config(args.config, args.overrides, tiny=args.tiny)
        est = estimate(cfg, num_gpus=args.num_gpus, micro_batch=args.micro_batch, seq_len=args.seq_len,
                       images_per_sample=args.images_per_sample, config_file=args.config)
    except (ConfigError, EstimateError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fit = None
    if args.gpu_mem:
        gpu, reserve = parse_size(args.gpu_mem), parse_size(args.reserve)
        fit = {"gpu_mem": gpu, "reserve": reserve, "max_micro_batch": est.max_micro_batch(gpu, reserve),
               "fits": est.total + reserve <= gpu}
    if args.json:
        print(json.dumps({**est.to_dict(), **({"fit": fit} if fit else {})}))
        return 0
    print(est.table())
    if fit:
        verdict = "fits" if fit["fits"] else "does NOT fit"
        print(f"\n{verdict} in {human(fit['gpu_mem'])} (reserving {human(fit['reserve'])} for the CUDA context); "
              f"largest micro-batch that fits: {fit['max_micro_batch']}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("estimate", help="GPU memory of a training config: weights, gradients, optimizer states, "
                                        "activations; the largest micro-batch that fits",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="train YAML (configs/train/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for `medm train` (train.bf16=true ...)")
    p.add_argument("--gpu-mem", help="GPU memory to fit, e.g. 24GB, 80GiB; prints the largest micro-batch")
    p.add_argument("--reserve", default="1GiB", help="kept free for the CUDA context and workspaces (1GiB)")
    p.add_argument("--num-gpus", type=int, default=1, help="data-parallel GPUs ZeRO partitions over (1)")
    p.add_argument("--micro-batch", type=int, help="samples per GPU per pass (train.per_device_train_batch_size)")
    p.add_argument("--seq-len", type=int, help="tokens per sample (data.max_length, or pack_length)")
    p.add_argument("--images-per-sample", type=int, help="images / volumes per sample for each encoder (1)")
    p.add_argument("--tiny", action="store_true", help="estimate the config's tiny offline twin (no config.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_estimate)

