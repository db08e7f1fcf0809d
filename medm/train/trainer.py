"""`MedMTrainer` (the HF Trainer with a connector learning rate and stage-aware saving) and `run_training`.

`run_training(cfg)` is what `medm train CONFIG` does: seed, build the model, load `stage.init_from`, apply the
stage plan, build the data, train (or resume), save, and plot the loss.
"""

from __future__ import annotations

import json
import logging
import os
import socket

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from medm.config import ConfigError, from_dict
from medm.interop.model_card import ModelCardCallback
from medm.models import build_model, save_model
from medm.train.args import TrainArgs, TrainConfig
from medm.train.checkpoint import BASE_DIR, load_components, load_init_weights, read_meta, save_components, write_meta
from medm.train.metrics import MetricsJsonl, plot_loss
from medm.train.stages import (
    COMPONENTS_ONLY,
    CONNECTORS,
    ENCODERS,
    FULL,
    LORA,
    apply_plan,
    checkpoint_format,
    component_paths,
    describe,
    resolve_plan,
)

logger = logging.getLogger(__name__)


def _unwrap_peft(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class MedMTrainer(Trainer):
    """The HF Trainer plus: a separate connector learning rate, and checkpoints in the stage's format.

    Args:
        connector_lr: peak learning rate of the connector parameters (None: `args.learning_rate`).
        checkpoint_format: `full`, `components` or `lora` (see medm.train.checkpoint).
        components: the module paths a `components` checkpoint saves (medm.train.stages.component_paths).
        base_dir: full checkpoint with the frozen weights of a `components` / `lora` run.
    """

    def __init__(self, *args, connector_lr: float | None = None, checkpoint_format: str = FULL,
                 components: list[str] | None = None, base_dir: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.connector_lr = connector_lr
        self.checkpoint_format = checkpoint_format
        self.components = components or []
        self.base_dir = base_dir

    # ---- optimizer: connector parameters in their own groups -----------------------------------------------
    def create_optimizer(self, model=None):
        if self.connector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        base = _unwrap_peft(opt_model)
        paths = component_paths(base)
        conn = {id(p) for name in CONNECTORS for path in paths.get(name, [])
                for p in base.get_submodule(path).parameters()}
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = []
        for is_conn in (False, True):
            for has_decay in (True, False):
                params = [p for n, p in opt_model.named_parameters()
                          if p.requires_grad and (id(p) in conn) == is_conn and (n in decay) == has_decay]
                if not params:
                    continue
                group = {"params": params, "weight_decay": self.args.weight_decay if has_decay else 0.0}
                if is_conn:
                    group["lr"] = self.connector_lr
                groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        # Length grouping reads the dataset's precomputed `lengths`; the Trainer's fallback would load every item
        # (and its images) once just to measure it.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=list(dataset.lengths))
        return super()._get_train_sampler(train_dataset)

    # ---- saving and resuming in the stage's checkpoint format ---------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.checkpoint_format == COMPONENTS_ONLY:
            if self.args.should_save:
                save_components(_unwrap_peft(self.accelerator.unwrap_model(self.model)), self.processing_class,
                                output_dir, self.components, self.base_dir, state_dict)
                torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            return
        super()._save(output_dir, state_dict)
        if self.checkpoint_format == LORA and self.args.should_save:
            # The adapter alone does not rebuild the model: add the medm config and where the base weights are.
            _unwrap_peft(self.accelerator.unwrap_model(self.model)).config.save_pretrained(output_dir)
            write_meta(output_dir, LORA, self.base_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if read_meta(resume_from_checkpoint)["format"] == COMPONENTS_ONLY:
            load_components(_unwrap_peft(model if model is not None else self.model), resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


class NoGradCheck(TrainerCallback):
    """Warn once, at the first optimizer step, about trainable parameters that got no gradient.

    E.g. `vision: full` with CLIP's `select_layer: -2` trains a last block whose output is never used. (Under
    DeepSpeed the gradients live in its own buffers, so the check is skipped.)
    """

    def __init__(self):
        self.done = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.done or model is None or args.deepspeed:
            return
        self.done = True
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if missing and state.is_world_process_zero:
            logger.warning("%d trainable parameters got no gradient in the first step (their outputs do not reach "
                           "the loss), e.g. %s", len(missing), ", ".join(missing[:3]))


# ---- the `medm train` run ------------------------------------------------------------------------------------
def resolve_device(train: TrainArgs) -> str:
    """`cuda` or `cpu`, checked against the precision settings (clear errors instead of Trainer tracebacks)."""
    device = train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"train.device: {train.device!r}; valid: auto, cuda, cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda, but no CUDA device is visible")
    if train.bf16 and train.fp16:
        raise ConfigError("train: bf16 and fp16 are both on; choose one")
    if train.fp16 and device == "cpu":
        raise ConfigError("train.fp16: float16 mixed precision needs a CUDA GPU; on the CPU use bf16 or neither")
    if train.bf16 and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.bf16: {torch.cuda.get_device_name()} does not support bfloat16; "
                          "use train.fp16=true instead")
    return device


def _single_process_env() -> None:
    """DeepSpeed outside a launcher looks for MPI unless the torch.distributed variables are set."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def training_arguments(train: TrainArgs, device: str, find_unused_parameters: bool | None = None) -> TrainingArguments:
    """TrainingArguments from medm's TrainArgs (TensorBoard is added as a callback, into output_dir/tensorboard).

    Args:
        find_unused_parameters: DDP setting; True when a trained encoder may hold blocks past its selected layer.
    """
    return TrainingArguments(
        output_dir=train.output_dir, num_train_epochs=train.num_train_epochs, max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps, learning_rate=train.learning_rate,
        weight_decay=train.weight_decay, warmup_steps=train.warmup_steps, lr_scheduler_type=train.lr_scheduler_type,
        optim=train.optim, adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2,
        max_grad_norm=train.max_grad_norm, bf16=train.bf16, fp16=train.fp16,
        # transformers 5 checkpoints non-reentrantly, so gradients reach a connector through frozen LLM layers.
        activation_checkpointing=train.gradient_checkpointing,
        logging_steps=train.logging_steps, logging_first_step=True, save_strategy=train.save_strategy,
        save_steps=train.save_steps, save_total_limit=train.save_total_limit, seed=train.seed,
        dataloader_num_workers=train.dataloader_num_workers, train_sampling_strategy=train.train_sampling_strategy,
        deepspeed=train.deepspeed, use_cpu=device == "cpu",
        # A launched CPU run (torchrun, deepspeed, or our single-process DeepSpeed env) talks over gloo.
        ddp_backend="gloo" if device == "cpu" and "LOCAL_RANK" in os.environ else None,
        report_to=[r for r in train.report_to if r != "tensorboard"] or "none", disable_tqdm=train.disable_tqdm,
        # The collator builds exactly the model's inputs; the Trainer must neither drop nor guess columns.
        remove_unused_columns=False, label_names=["labels"], ddp_find_unused_parameters=find_unused_parameters,
    )


def _check_deepspeed(train: TrainArgs) -> None:
    if not os.path.isfile(train.deepspeed):
        raise ConfigError(f"train.deepspeed: {train.deepspeed!r} not found")
    with open(train.deepspeed) as f:
        ds = json.load(f)
    if train.connector_lr is not None and "optimizer" in ds:
        raise ConfigError(f"train.connector_lr needs the optimizer medm builds, but {train.deepspeed} defines its "
                          "own `optimizer`; remove that section or unset connector_lr")


def build_training_data(cfg: TrainConfig, model, tokenizer):
    """(dataset, collator) from the `data:` section."""
    from medm.data.collator import DataCollator
    from medm.data.dataset import DataArgs, build_dataset

    if cfg.data is None:
        raise ConfigError("train config: the `data` section is required")
    dataset = build_dataset(from_dict(DataArgs, cfg.data, "data"), model, tokenizer)
    # A dataset with inputs of its own (medm.qwenvl: image grids, M-RoPE token types) brings its collator.
    return dataset, dataset.collator() if hasattr(dataset, "collator") else DataCollator(tokenizer)


def run_training(cfg: TrainConfig, dataset=None, collator=None,
                 callbacks: list[TrainerCallback] | None = None) -> MedMTrainer:
    """Train one stage; returns the finished trainer (its model holds the trained weights).

    Args:
        dataset, collator: use these instead of building them from `cfg.data` (tests, notebooks).
    """
    train = cfg.train
    device = resolve_device(train)
    resume = train.resume_from_checkpoint
    if isinstance(resume, str) and not os.path.isdir(resume):
        raise ConfigError(f"train.resume_from_checkpoint: {resume!r} not found (a checkpoint-N directory, or true "
                          "for the latest in output_dir)")
    if train.deepspeed:
        _check_deepspeed(train)
        _single_process_env()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    out = train.output_dir
    # Seed before building: a randomly initialised part (tiny LLM, new embedding rows) is the same on every rank
    # and in a resumed run.
    set_seed(train.seed)
    if cfg.model.llm.attn_implementation == "flash_attention_2" and cfg.model.llm.dtype == "float32" and not (
            train.bf16 or train.fp16):
        raise ConfigError("model.llm.attn_implementation: flash_attention_2 runs in half precision only; set "
                          "train.bf16=true (or fp16), or use sdpa")
    model, tokenizer = build_model(cfg.model)
    init_meta = load_init_weights(model, cfg.stage.init_from) if cfg.stage.init_from else None
    modes = resolve_plan(model, cfg.stage)
    fmt = checkpoint_format(modes)
    base = None
    if fmt != FULL:
        # Components / LoRA checkpoints hold only what trains; the frozen rest must be reopenable.
        if init_meta is not None and init_meta["format"] == FULL:
            base = os.path.abspath(cfg.stage.init_from)
        else:
            base = os.path.abspath(os.path.join(out, BASE_DIR))
            if rank0 and not (resume and os.path.isdir(base)):
                save_model(model, tokenizer, base)
    compute_dtype = torch.bfloat16 if train.bf16 else torch.float16 if train.fp16 else torch.float32
    train_model = apply_plan(model, cfg.stage, compute_dtype)
    logger.info("stage %s: %s", {k: v.kind + (f":{v.blocks}" if v.blocks else "") for k, v in modes.items()},
                describe(train_model))
    if dataset is None:
        dataset, collator = build_training_data(cfg, model, tokenizer)
    encoder_trains = any(modes[e].kind in ("full", "partial") for e in ENCODERS if e in modes)
    args = training_arguments(train, device, find_unused_parameters=True if encoder_trains else None)
    # ModelCardCallback writes README.md into every checkpoint-N and into output_dir (medm.interop.model_card).
    cbs = [MetricsJsonl(out, fresh=not resume), NoGradCheck(), ModelCardCallback(cfg), *(callbacks or [])]
    if "tensorboard" in train.report_to:
        from transformers.integrations import TensorBoardCallback

        tb = TensorBoardCallback()
        tb.logging_dir = os.path.join(out, "tensorboard")
        cbs.append(tb)
    paths = component_paths(model)
    trainer = MedMTrainer(model=train_model, args=args, train_dataset=dataset, data_collator=collator,
                          processing_class=tokenizer, callbacks=cbs, connector_lr=train.connector_lr,
                          checkpoint_format=fmt, base_dir=base,
                          components=[p for k, m in modes.items() if m.trains for p in paths[k]])
    try:
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(out)
        if trainer.is_world_process_zero():
            trainer.save_state()
            if train.plot_loss:
                plot_loss(out)
    finally:
        # A ZeRO-3 config stays registered globally and would partition the next model built in this process.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return trainer
