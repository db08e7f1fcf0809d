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
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from medm._estimate_math import (  # noqa: F401  (tests and benchmarks import these from here)
    EstimateError,
    Geometry,
    GiB,
    _base,
    _quantised_llm_weights,
    activation_bytes,
    count_parameters,
    human,
    lora_load,
    optimizer_states,
    parse_size,
    vision_loads,
    zero_settings,
)
from medm.config import ConfigError, to_dict
from medm.registry import KIND, VISION

logger = logging.getLogger(__name__)


# ---- the model, on the meta device ------------------------------------------------------------------------------
def _offline_model_args(model_args):
    """Model args whose pretrained parts are described by their configs (paths dropped, so nothing loads).

    Returns (args, llm_vocab): llm_vocab is the pretrained LLM's vocabulary size, which the built model keeps
    (medm.models.builder resizes only when the tokenizer is larger), or None for a config-only LLM.
    """
    from medm.models.builder import load_tokenizer  # defers torch, transformers
    from medm.models.llm import resolve_text_config  # defers torch, transformers
    from medm.models.tiny import TINY_TEMPLATE_FOR_FAMILY  # defers torch, transformers

    args = copy.deepcopy(model_args)
    offline = KIND.get(args.kind).estimate_offline_args
    if offline is not None:
        return offline(args, _needs_files), None
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
    import torch  # defers torch

    from medm.models.builder import build_model  # defers torch, transformers

    args, vocab = _offline_model_args(model_args)
    with torch.device("meta"):
        model, tokenizer = build_model(args)
        if vocab is not None:
            target = max(vocab, len(tokenizer.tokenizer if hasattr(tokenizer, "tokenizer") else tokenizer))
            if model.get_input_embeddings().num_embeddings != target:
                model.llm.resize_token_embeddings(target, mean_resizing=False)
    return model, tokenizer


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
    import torch  # defers torch

    from medm.models.llm import resolve_dtype  # defers torch, transformers
    from medm.train.stages import LORA, StagePlan, apply_plan, resolve_plan  # defers torch, transformers

    train = cfg.train
    micro_batch = micro_batch or train.per_device_train_batch_size
    data = cfg.data or {}
    seq_len = seq_len or int(data.get("pack_length") or data.get("max_length") or 2048)
    zero = zero_settings(train.deepspeed, config_file)
    model, _ = meta_model(cfg.model)
    plan = copy.deepcopy(cfg.stage) if cfg.stage is not None else StagePlan()
    modes = resolve_plan(model, plan)
    qlora = modes.get("llm") is not None and modes["llm"].name == "qlora"
    if qlora:
        # 4-bit quantisation needs CUDA: count the same adapters on the unquantised model, weights at 4 bits below.
        plan.llm = LORA
        modes = resolve_plan(model, plan)
    half = train.bf16 or train.fp16
    llm_dtype, attn = KIND.get(cfg.model.kind).llm_settings(cfg.model)
    param_dtype = resolve_dtype(llm_dtype)
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
                images, "modes": {k: v.name + (f":{v.blocks}" if v.blocks else "") for k, v in modes.items()},
                "qlora": qlora}
    return Estimate(int(weight_bytes), int(grad_bytes), int(opt_bytes), acts, per_sample, params, settings)


# ---- command line -----------------------------------------------------------------------------------------------
def load_config(path: str, overrides: list[str] | None = None, tiny: bool = False):
    """A train config, optionally with its model swapped for the tiny offline twin (medm.models.tiny)."""
    from medm.models import parse_model_args  # defers torch, transformers
    from medm.models.tiny import tiny_overrides  # defers torch, transformers
    from medm.train.args import load_train_config  # defers torch, transformers

    cfg = load_train_config(path, overrides)
    if tiny:
        model = {k: v for k, v in to_dict(cfg.model).items() if v is not None}
        cfg.model = parse_model_args(tiny_overrides(model), f"{path}: model (tiny)")
    return cfg


def _cmd_estimate(args: argparse.Namespace) -> int:
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

