"""`run_training(cfg)`: what `medm train CONFIG` does: seed, build the model, load `stage.init_from`, apply the
stage plan, build the data, train (or resume), save, and plot the loss. The Trainer it runs, `MedMTrainer`, is in
`medm.train._medm_trainer` (importable from here too).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket

import torch
from transformers import EarlyStoppingCallback, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from medm._accelerator import name_accelerator_for_deepspeed
from medm.config import ConfigError, from_dict
from medm.data.collator import DataCollator
from medm.data.dataset import DataArgs, build_dataset
from medm.data.mixture import MixtureArgs, build_mixture, parse_mixture
from medm.data.packing import PackedDataset, PackingCollator
from medm.data.validation import split_validation
from medm.models import build_model, save_model
from medm.models.checkpoint import (
    BASE_DIR,
    load_init_weights,
)
from medm.train._distributed import prepare_zero3_loading, whole_weights
from medm.train._generation_eval import GenerationEval, validation_records
from medm.train._medm_trainer import (  # noqa: F401  (importable from here too)
    SAMPLING_STRATEGIES,
    MedMTrainer,
    NoGradCheck,
)
from medm.train._qlora import qlora_load_config
from medm.train._training_arguments import passthrough
from medm.train.args import TrainArgs, TrainConfig, eval_strategy, has_validation
from medm.train.metrics import MetricsJsonl, ModelCardCallback, plot_loss, write_results
from medm.train.safety import (
    RunGuard,
    last_checkpoint,
    remove_incomplete_checkpoints,
)
from medm.train.stages import (
    ENCODERS,
    FULL,
    apply_plan,
    checkpoint_format,
    component_paths,
    describe,
    resolve_plan,
)

logger = logging.getLogger(__name__)

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


def training_arguments(train: TrainArgs, device: str, find_unused_parameters: bool | None = None,
                       evaluation: str = "no") -> TrainingArguments:
    """TrainingArguments from medm's TrainArgs (TensorBoard is added as a callback, into output_dir/tensorboard).

    Args:
        find_unused_parameters: DDP setting; True when a trained encoder may hold blocks past its selected layer.
        evaluation: the resolved eval strategy (medm.train.args.eval_strategy): steps, epoch or no.
    """
    num_workers = default_num_workers(device) if train.dataloader_num_workers is None else train.dataloader_num_workers
    # Every TrainingArguments field medm does not set from its own settings, as the config gives it (or its default).
    given = passthrough(train)
    # A launched CPU run (torchrun, deepspeed, or our single-process DeepSpeed env) talks over gloo.
    if given["ddp_backend"] is None and device == "cpu" and "LOCAL_RANK" in os.environ:
        given["ddp_backend"] = "gloo"
    if given["ddp_find_unused_parameters"] is None:
        given["ddp_find_unused_parameters"] = find_unused_parameters
    return TrainingArguments(
        **given,
        output_dir=train.output_dir, num_train_epochs=train.num_train_epochs, max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps, learning_rate=train.learning_rate,
        weight_decay=train.weight_decay, warmup_steps=train.warmup_steps, lr_scheduler_type=train.lr_scheduler_type,
        lr_scheduler_kwargs=train.lr_scheduler_kwargs or {},
        optim=train.optim, adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2,
        max_grad_norm=train.max_grad_norm, bf16=train.bf16, fp16=train.fp16,
        # transformers 5 checkpoints non-reentrantly, so gradients reach a connector through frozen LLM layers.
        activation_checkpointing=train.gradient_checkpointing,
        logging_steps=train.logging_steps, logging_first_step=train.logging_first_step,
        save_strategy=train.save_strategy, save_steps=train.save_steps, save_total_limit=train.save_total_limit,
        seed=train.seed,
        dataloader_num_workers=num_workers, dataloader_prefetch_factor=train.dataloader_prefetch_factor if
        num_workers else None, dataloader_persistent_workers=train.dataloader_persistent_workers and num_workers > 0,
        dataloader_pin_memory=train.dataloader_pin_memory and device == "cuda",
        # medm's strategies are MedMTrainer._get_train_sampler's; the Trainer itself only sees sequential / random.
        train_sampling_strategy="sequential" if train.train_sampling_strategy == "sequential" else "random",
        deepspeed=train.deepspeed, use_cpu=device == "cpu",
        report_to=[r for r in train.report_to if r != "tensorboard"] or "none", disable_tqdm=train.disable_tqdm,
        # The collator builds exactly the model's inputs; the Trainer must neither drop nor guess columns.
        remove_unused_columns=False, label_names=["labels"],
        # Validation: the loss only (no logits gathered over the whole validation set).
        eval_strategy=evaluation, eval_steps=train.eval_steps or None, prediction_loss_only=True,
        per_device_eval_batch_size=train.per_device_eval_batch_size or train.per_device_train_batch_size,
        load_best_model_at_end=train.load_best_model_at_end and evaluation != "no",
        metric_for_best_model=train.metric_for_best_model if evaluation != "no" else None,
        greater_is_better=train.greater_is_better,
    )


def default_num_workers(device: str) -> int:
    """Data loading workers when `train.dataloader_num_workers` is null: none on the CPU (they would take cores
    from the model), else up to 8, leaving one core per process for the training loop.

    On a GPU a step of the default configs consumes far fewer samples per second than one worker decodes
    (benchmarks/bench_data.py); several workers cover slow disks and large images.
    """
    if device != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_process - 1))


def _check_deepspeed(train: TrainArgs) -> None:
    if not os.path.isfile(train.deepspeed):
        raise ConfigError(f"train.deepspeed: {train.deepspeed!r} not found")
    with open(train.deepspeed) as f:
        ds = json.load(f)
    if train.connector_lr is not None and "optimizer" in ds:
        raise ConfigError(f"train.connector_lr needs the optimizer medm builds, but {train.deepspeed} defines its "
                          "own `optimizer`; remove that section or unset connector_lr")


def build_training_data(cfg: TrainConfig, model, tokenizer):
    """(dataset, collator) from the `data:` section (see `build_training_inputs` for the sampler too)."""
    dataset, collator, _ = build_training_inputs(cfg, model, tokenizer)
    return dataset, collator


def _uses_mixture(data: DataArgs) -> bool:
    return data.mixture is not None or (isinstance(data.path, list) and any(isinstance(p, dict) for p in data.path))


def build_training_inputs(cfg: TrainConfig, model, tokenizer):
    """(dataset, collator, sampler) from the `data:` section.

    The sampler is a data mixture's `MixtureSampler` (when `data.mixture` is set or a `data.path` entry is a
    mapping: medm.data.mixture), else None (the trainer's sampling strategy). With `data.packing`, the dataset is a
    `PackedDataset` and the collator a `PackingCollator` (medm.data.packing).
    """
    if cfg.data is None:
        raise ConfigError("train config: the `data` section is required")
    data = from_dict(DataArgs, cfg.data, "data")
    sampler = None
    if _uses_mixture(data):
        if data.val_size:
            raise ConfigError("data.val_size: a data mixture is not split; give the validation records as "
                              "data.val_path")
        if data.packing:
            raise ConfigError("data.packing: a data mixture plans its samples one by one (ratios, curriculum "
                              "order), which packs would break; turn packing off or use one dataset")
        entries = parse_mixture(data.path, image_dir=data.image_dir)
        mixture = from_dict(MixtureArgs, data.mixture, "data.mixture")
        dataset, sampler = build_mixture(
            entries, lambda e: build_dataset(dataclasses.replace(data, path=e.path, image_dir=e.image_dir), model,
                                             tokenizer), mixture)
        first = dataset.datasets[0]
    else:
        dataset = first = build_dataset(data, model, tokenizer)
        if data.val_size:
            dataset = first = split_validation(dataset, data.val_size, data.val_seed)[0]
    # A dataset with inputs of its own (medm.qwenvl: image grids, M-RoPE token types) brings its collator.
    collator = first.collator() if hasattr(first, "collator") else DataCollator(tokenizer)
    if data.packing:
        if hasattr(dataset, "collator"):
            raise ConfigError("data.packing: only the medm model kind packs samples (this dataset brings its own "
                              "inputs and collator)")

        attn = (getattr(model.config, "llm", None) or {}).get("attn_implementation", "sdpa")
        dataset = PackedDataset(dataset, data.pack_length or data.max_length)
        # Varlen attention (flash, sdpa_varlen) reads the sample boundaries from the collator's cu_seq_lens.
        collator = PackingCollator(tokenizer, flash_kwargs=attn.startswith("flash_attention") or attn == "sdpa_varlen")
        logger.info("packing: %d samples in %d rows of up to %d tokens", dataset.num_samples, len(dataset),
                    dataset.capacity)
        if attn in ("sdpa", "eager"):
            logger.warning("packing with attn_implementation %s: every row attends over a dense block-diagonal "
                           "mask (cost: the row's length squared); sdpa_varlen or flash_attention_2 attend within "
                           "each sample only (docs/performance.md, Packing)", attn)
    return dataset, collator, sampler


def build_validation_data(cfg: TrainConfig, model, tokenizer):
    """The validation dataset of the `data:` section (`data.val_path`, or the `data.val_size` side of the split
    that `build_training_inputs` leaves out), packed like the training data; None without one."""
    data = from_dict(DataArgs, cfg.data or {}, "data")
    if not has_validation(data):
        return None
    if data.val_path:
        # Validation records are few and evaluated whole: never streamed, even with data.streaming.
        val = build_dataset(dataclasses.replace(data, path=data.val_path, streaming=False), model, tokenizer)
    else:
        val = split_validation(build_dataset(data, model, tokenizer), data.val_size, data.val_seed)[1]
    if data.packing:
        val = PackedDataset(val, data.pack_length or data.max_length)
    logger.info("validation: %d samples", len(val))
    return val


def _checkpoint_step(ckpt: str) -> str:
    """The global step a checkpoint-N was saved at (its trainer_state.json), or "?"."""
    try:
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            return str(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError):
        return "?"


def run_training(cfg: TrainConfig, dataset=None, collator=None,
                 callbacks: list[TrainerCallback] | None = None, sampler=None, eval_dataset=None) -> MedMTrainer:
    """Train one stage; returns the finished trainer (its model holds the trained weights).

    A stop signal (`train.stop_signals`) ends training early with a checkpoint of the last step and no final save
    into output_dir; the returned trainer's `stop_signal` then names the signal (else None).

    Args:
        dataset, collator: use these instead of building them from `cfg.data` (tests, notebooks).
        sampler: with `dataset`, a sampler that plans each epoch (e.g. a `MixtureSampler`).
        eval_dataset: with `dataset`, the validation dataset (evaluated at `train.eval_strategy`).

    Raises:
        NonFiniteLossError: the loss became NaN / Inf (with `train.stop_on_nonfinite_loss`); nothing of that step
            was saved and the message names the last good checkpoint.
    """
    train = cfg.train
    device = resolve_device(train)
    name_accelerator_for_deepspeed()  # before transformers imports DeepSpeed: no "Setting accelerator to CPU" guess
    resume = train.resume_from_checkpoint
    if resume is True and last_checkpoint(train.output_dir) is None:
        # A requeued job resumes with `true` whether or not its first run got as far as a checkpoint.
        logger.info("train.resume_from_checkpoint=true: no checkpoint-N in %s yet, starting from step 0",
                    train.output_dir)
        resume = None
    if isinstance(resume, str) and not os.path.isdir(resume):
        raise ConfigError(f"train.resume_from_checkpoint: {resume!r} not found (a checkpoint-N directory, or true "
                          "for the latest in output_dir)")
    if resume:
        ckpt = last_checkpoint(train.output_dir) if resume is True else resume
        logger.info("resuming from %s at step %s (optimizer, scheduler, RNG and data position restored)", ckpt,
                    _checkpoint_step(ckpt))
    if train.deepspeed:
        _check_deepspeed(train)
        _single_process_env()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    out = train.output_dir
    if cfg.model.llm.attn_implementation == "flash_attention_2" and cfg.model.llm.dtype == "float32" and not (
            train.bf16 or train.fp16):
        raise ConfigError("model.llm.attn_implementation: flash_attention_2 runs in half precision only; set "
                          "train.bf16=true (or fp16), or use sdpa")
    compute_dtype = torch.bfloat16 if train.bf16 else torch.float16 if train.fp16 else torch.float32
    # QLoRA: the LLM is quantized as it loads (BitsAndBytesConfig at from_pretrained; CUDA + bitsandbytes).
    quantization = qlora_load_config(compute_dtype) if str(cfg.stage.llm).strip() == "qlora" else None
    # The arguments before the model: with a ZeRO-3 config they register transformers' HfDeepSpeedConfig, and the
    # LLM is then built and loaded partitioned across the ranks (medm.train._distributed).
    data_args = from_dict(DataArgs, cfg.data, "data") if cfg.data is not None else None
    if dataset is None:
        evaluation = eval_strategy(train, data_args)
    else:
        evaluation = train.eval_strategy or ("steps" if eval_dataset is not None else "no")
    try:
        args = training_arguments(train, device, evaluation=evaluation)
    except ValueError as e:  # transformers' own checks of the pass-through settings (and of how they combine)
        raise ConfigError(f"train: {' '.join(str(e).split())}") from None
    prepare_zero3_loading(args)
    # Seed before building: a randomly initialised part (tiny LLM, new embedding rows) is the same on every rank
    # and in a resumed run.
    set_seed(train.seed)
    model, tokenizer = build_model(cfg.model, quantization_config=quantization)
    with whole_weights(model):
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
            with whole_weights(model):
                if rank0 and not (resume and os.path.isdir(base)):
                    save_model(model, tokenizer, base)
    train_model = apply_plan(model, cfg.stage, compute_dtype)
    logger.info("stage %s: %s", {k: v.name + (f":{v.blocks}" if v.blocks else "") for k, v in modes.items()},
                describe(train_model))
    if dataset is None:
        dataset, collator, sampler = build_training_inputs(cfg, model, tokenizer)
        if eval_dataset is None and args.eval_strategy != "no":
            eval_dataset = build_validation_data(cfg, model, tokenizer)
    generation = None
    if train.eval_task and eval_dataset is not None and args.eval_strategy != "no":
        records, image_dir = validation_records(eval_dataset, train.eval_max_samples)
        generation = GenerationEval(train.eval_task, records, image_dir=image_dir,
                                    max_new_tokens=train.eval_max_new_tokens,
                                    batch_size=args.per_device_eval_batch_size, output_dir=out)
        logger.info("validation: %d records answered and scored by eval task %s at each evaluation", len(records),
                    train.eval_task)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        # Each rank reads its own batches (medm.data.streaming.own_shards): dispatching them from rank 0 would read
        # everything on one rank and cannot split a batch whose ranks hold different media (None pixel values).
        args.accelerator_config.dispatch_batches = False
    encoder_trains = any(modes[e].name in ("full", "partial") for e in ENCODERS if e in modes)
    # A trained encoder may hold blocks past its selected layer (no gradient): DDP must look for them (unless the
    # config says otherwise).
    if train.ddp_find_unused_parameters is None:
        args.ddp_find_unused_parameters = True if encoder_trains else None
    # ModelCardCallback writes README.md into every checkpoint-N and into output_dir (medm.train.metrics).
    cbs = [MetricsJsonl(out, fresh=not resume), NoGradCheck(), ModelCardCallback(cfg), *(callbacks or [])]
    if "tensorboard" in train.report_to:
        tb = TensorBoardCallback()
        tb.logging_dir = os.path.join(out, "tensorboard")
        cbs.append(tb)
    if train.early_stopping_patience is not None:
        cbs.append(EarlyStoppingCallback(train.early_stopping_patience, train.early_stopping_threshold))
    # Last, so that its say on saving and stopping comes after every other callback's (medm.train.safety).
    guard = RunGuard(train.stop_signals, train.stop_on_nonfinite_loss)
    cbs.append(guard)
    paths = component_paths(model)
    trainer = MedMTrainer(model=train_model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                          data_collator=collator,
                          processing_class=tokenizer, callbacks=cbs, connector_lr=train.connector_lr,
                          checkpoint_format=fmt, base_dir=base, sampling=train.train_sampling_strategy,
                          group_window=train.group_window, train_sampler=sampler, guard=guard,
                          generation_eval=generation,
                          components=[p for k, m in modes.items() if m.trains for p in paths[k]])
    if rank0:
        remove_incomplete_checkpoints(out)
    guard.install()
    try:
        trainer.train(resume_from_checkpoint=resume)
        if guard.nonfinite is not None:
            raise guard.nonfinite_error(out)
        # A signal during the last step changes nothing: the run is complete.
        stopped = guard.signal_name if trainer.state.global_step < trainer.state.max_steps else None
        trainer.stop_signal = stopped
        if stopped is None:
            trainer.save_model(out)
        else:
            # The checkpoint of the last step holds everything; a final model in output_dir would look finished.
            logger.warning("stopped by %s at step %d of %d: saved %s; continue with train.resume_from_checkpoint="
                           "true", stopped, trainer.state.global_step, trainer.state.max_steps, last_checkpoint(out))
        if trainer.is_world_process_zero():
            if stopped is None:
                trainer.save_state()
            if train.plot_loss:
                plot_loss(out, [f"eval_{c.key}" for c in generation.task.columns if c.percent] if generation else None)
            if evaluation != "no":
                write_results(out, trainer.state, args)
    finally:
        guard.restore()
        # A ZeRO-3 config stays registered globally and would partition the next model built in this process.
        unset_hf_deepspeed_config()
    return trainer
