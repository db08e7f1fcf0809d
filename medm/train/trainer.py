"""`MedMTrainer` (the HF Trainer with a connector learning rate and stage-aware saving) and `run_training`.

`run_training(cfg)` is what `medm train CONFIG` does: seed, build the model, load `stage.init_from`, apply the
stage plan, build the data, train (or resume), save, and plot the loss.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from medm._accelerator import name_accelerator_for_deepspeed
from medm.config import ConfigError, from_dict
from medm.data._bad_samples import bad_sample_count
from medm.data.dataset import DataArgs
from medm.models import build_model, save_model
from medm.models.checkpoint import (
    BASE_DIR,
    load_components,
    load_init_weights,
    read_meta,
    relocate_meta,
    save_components,
    write_meta,
)
from medm.train._distributed import prepare_zero3_loading, whole_weights
from medm.train._qlora import qlora_load_config
from medm.train.args import TrainArgs, TrainConfig
from medm.train.metrics import MetricsJsonl, ModelCardCallback, plot_loss
from medm.train.safety import (
    CheckpointWriteError,
    RunGuard,
    last_checkpoint,
    publish_checkpoint,
    remove_incomplete_checkpoints,
    staging_dir,
)
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

SAMPLING_STRATEGIES = ("auto", "random", "sequential", "group_by_length", "group_by_modality_length")


def _unwrap_peft(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class MedMTrainer(Trainer):
    """The HF Trainer plus: a separate connector learning rate, and checkpoints in the stage's format.

    Args:
        connector_lr: peak learning rate of the connector parameters (None: `args.learning_rate`).
        checkpoint_format: `full`, `components` or `lora` (see medm.train.checkpoint).
        components: the module paths a `components` checkpoint saves (medm.train.stages.component_paths).
        base_dir: full checkpoint with the frozen weights of a `components` / `lora` run.
        sampling: medm's `train_sampling_strategy` (auto, random, sequential, group_by_length,
            group_by_modality_length; see `TrainArgs`).
        group_window: steps per length-sorting window of the grouped samplers (medm.data.sampler).
        train_sampler: a sampler that plans the epoch itself (a data mixture's `MixtureSampler`); it replaces
            the sampling strategy.
        guard: the run's `RunGuard` (medm.train.safety), told every training loss (non-finite loss stop).

    Checkpoints are written atomically (`_save_checkpoint`), and training logs carry `bad_samples` when the dataset
    counts samples whose media failed to load (medm.data.dataset, `data.max_bad_samples`).
    """

    def __init__(self, *args, connector_lr: float | None = None, checkpoint_format: str = FULL,
                 components: list[str] | None = None, base_dir: str | None = None, sampling: str = "auto",
                 group_window: int = 64, train_sampler: torch.utils.data.Sampler | None = None,
                 guard: RunGuard | None = None, **kwargs):
        self._staging: str | None = None
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.connector_lr = connector_lr
        self.checkpoint_format = checkpoint_format
        self.components = components or []
        self.base_dir = base_dir
        if sampling not in SAMPLING_STRATEGIES:
            raise ConfigError(f"train.train_sampling_strategy: {sampling!r}; valid: {', '.join(SAMPLING_STRATEGIES)}")
        if train_sampler is not None and sampling not in ("auto", "random"):
            raise ConfigError(f"train.train_sampling_strategy: {sampling!r}, but the data mixture plans each epoch "
                              "itself (ratios, curriculum order); use auto")
        self.sampling = sampling
        self.group_window = group_window
        self.train_sampler = train_sampler

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
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.train_sampler is not None:
            return self.train_sampler
        strategy = self.sampling
        if strategy == "auto":
            strategy = "group_by_modality_length" if hasattr(dataset, "lengths") else "random"
        if strategy in ("group_by_length", "group_by_modality_length"):
            # Grouping reads the dataset's precomputed `lengths`; measuring items would load every image once.
            if not hasattr(dataset, "lengths"):
                raise ConfigError(f"train.train_sampling_strategy: {strategy} needs a dataset with `lengths`; "
                                  f"{type(dataset).__name__} has none")
            from medm.data.sampler import GroupedSampler

            modalities = getattr(dataset, "modalities", None) if strategy == "group_by_modality_length" else None
            return GroupedSampler(dataset.lengths, self.args.train_batch_size, modalities=modalities,
                                  world_size=max(1, self.args.world_size), window=self.group_window,
                                  seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed)
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

    def _issue_warnings_after_load(self, load_result) -> None:
        # A tied output head is not saved (it is the input embedding), so it is always "missing" on a resume: only
        # keys whose tensor no loaded key shares are really missing.
        state = self.model.state_dict(keep_vars=True)
        missing = set(load_result.missing_keys)
        loaded = {t.data_ptr() for k, t in state.items() if k not in missing}
        real = [k for k in load_result.missing_keys if k not in state or state[k].data_ptr() not in loaded]
        super()._issue_warnings_after_load(type(load_result)(real, load_result.unexpected_keys))

    # ---- crash safety (medm.train.safety) -------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is written, the Trainer's run directory is its staging directory (_save_checkpoint).
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint-N, written in `tmp-checkpoint-N/` and renamed into place once complete and
        synced, so a kill or a full disk mid-save never leaves a checkpoint-N that looks valid and is not."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = staging_dir(run_dir, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        except BaseException as e:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # a full disk needs its space back
            if isinstance(e, OSError):
                last = last_checkpoint(run_dir)
                raise CheckpointWriteError(f"could not write {final}: {e}; nothing was saved under that name, the "
                                           f"last complete checkpoint is {last or '(none)'}") from e
            raise
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged = os.path.join(staging, name)
            relocate_meta(staged, final)  # its relative `base` path, for the place it is moved to
            publish_checkpoint(staged, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard is not None:
            self.guard.observe_loss(loss, self.state.global_step + 1)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            bad = bad_sample_count(self.train_dataset)
            if bad is not None:
                logs["bad_samples"] = bad  # samples skipped because their media failed to load (data.max_bad_samples)
        super().log(logs, start_time)


class NoGradCheck(TrainerCallback):
    """Warn once, at the first optimizer step, about trainable parameters that got no gradient.

    E.g. a module whose output never reaches the loss (an encoder's blocks after `select_layer` and its final norm
    are kept frozen by the stage plan instead). (Under DeepSpeed the gradients live in its own buffers, so the check
    is skipped.)
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
    num_workers = default_num_workers(device) if train.dataloader_num_workers is None else train.dataloader_num_workers
    return TrainingArguments(
        output_dir=train.output_dir, num_train_epochs=train.num_train_epochs, max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps, learning_rate=train.learning_rate,
        weight_decay=train.weight_decay, warmup_steps=train.warmup_steps, lr_scheduler_type=train.lr_scheduler_type,
        lr_scheduler_kwargs=train.lr_scheduler_kwargs or {},
        optim=train.optim, adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2,
        max_grad_norm=train.max_grad_norm, bf16=train.bf16, fp16=train.fp16,
        # transformers 5 checkpoints non-reentrantly, so gradients reach a connector through frozen LLM layers.
        activation_checkpointing=train.gradient_checkpointing,
        logging_steps=train.logging_steps, logging_first_step=True, save_strategy=train.save_strategy,
        save_steps=train.save_steps, save_total_limit=train.save_total_limit, seed=train.seed,
        dataloader_num_workers=num_workers, dataloader_prefetch_factor=train.dataloader_prefetch_factor if
        num_workers else None, dataloader_persistent_workers=train.dataloader_persistent_workers and num_workers > 0,
        dataloader_pin_memory=train.dataloader_pin_memory and device == "cuda",
        # medm's strategies are MedMTrainer._get_train_sampler's; the Trainer itself only sees sequential / random.
        train_sampling_strategy="sequential" if train.train_sampling_strategy == "sequential" else "random",
        deepspeed=train.deepspeed, use_cpu=device == "cpu",
        # A launched CPU run (torchrun, deepspeed, or our single-process DeepSpeed env) talks over gloo.
        ddp_backend="gloo" if device == "cpu" and "LOCAL_RANK" in os.environ else None,
        report_to=[r for r in train.report_to if r != "tensorboard"] or "none", disable_tqdm=train.disable_tqdm,
        # The collator builds exactly the model's inputs; the Trainer must neither drop nor guess columns.
        remove_unused_columns=False, label_names=["labels"], ddp_find_unused_parameters=find_unused_parameters,
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
    import dataclasses

    from medm.data.collator import DataCollator
    from medm.data.dataset import build_dataset

    if cfg.data is None:
        raise ConfigError("train config: the `data` section is required")
    data = from_dict(DataArgs, cfg.data, "data")
    sampler = None
    if _uses_mixture(data):
        from medm.data.mixture import MixtureArgs, build_mixture, parse_mixture

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
    # A dataset with inputs of its own (medm.qwenvl: image grids, M-RoPE token types) brings its collator.
    collator = first.collator() if hasattr(first, "collator") else DataCollator(tokenizer)
    if data.packing:
        if hasattr(dataset, "collator"):
            raise ConfigError("data.packing: only the medm model kind packs samples (this dataset brings its own "
                              "inputs and collator)")
        from medm.data.packing import PackedDataset, PackingCollator

        attn = (getattr(model.config, "llm", None) or {}).get("attn_implementation", "sdpa")
        dataset = PackedDataset(dataset, data.pack_length or data.max_length)
        collator = PackingCollator(tokenizer, flash_kwargs=attn.startswith("flash_attention"))
        logger.info("packing: %d samples in %d rows of up to %d tokens", dataset.num_samples, len(dataset),
                    dataset.capacity)
    return dataset, collator, sampler


def _checkpoint_step(ckpt: str) -> str:
    """The global step a checkpoint-N was saved at (its trainer_state.json), or "?"."""
    try:
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            return str(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError):
        return "?"


def run_training(cfg: TrainConfig, dataset=None, collator=None,
                 callbacks: list[TrainerCallback] | None = None, sampler=None) -> MedMTrainer:
    """Train one stage; returns the finished trainer (its model holds the trained weights).

    A stop signal (`train.stop_signals`) ends training early with a checkpoint of the last step and no final save
    into output_dir; the returned trainer's `stop_signal` then names the signal (else None).

    Args:
        dataset, collator: use these instead of building them from `cfg.data` (tests, notebooks).
        sampler: with `dataset`, a sampler that plans each epoch (e.g. a `MixtureSampler`).

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
    args = training_arguments(train, device)
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
    logger.info("stage %s: %s", {k: v.kind + (f":{v.blocks}" if v.blocks else "") for k, v in modes.items()},
                describe(train_model))
    if dataset is None:
        dataset, collator, sampler = build_training_inputs(cfg, model, tokenizer)
    encoder_trains = any(modes[e].kind in ("full", "partial") for e in ENCODERS if e in modes)
    # A trained encoder may hold blocks past its selected layer (no gradient): DDP must look for them.
    args.ddp_find_unused_parameters = True if encoder_trains else None
    # ModelCardCallback writes README.md into every checkpoint-N and into output_dir (medm.train.metrics).
    cbs = [MetricsJsonl(out, fresh=not resume), NoGradCheck(), ModelCardCallback(cfg), *(callbacks or [])]
    if "tensorboard" in train.report_to:
        from transformers.integrations import TensorBoardCallback

        tb = TensorBoardCallback()
        tb.logging_dir = os.path.join(out, "tensorboard")
        cbs.append(tb)
    # Last, so that its say on saving and stopping comes after every other callback's (medm.train.safety).
    guard = RunGuard(train.stop_signals, train.stop_on_nonfinite_loss)
    cbs.append(guard)
    paths = component_paths(model)
    trainer = MedMTrainer(model=train_model, args=args, train_dataset=dataset, data_collator=collator,
                          processing_class=tokenizer, callbacks=cbs, connector_lr=train.connector_lr,
                          checkpoint_format=fmt, base_dir=base, sampling=train.train_sampling_strategy,
                          group_window=train.group_window, train_sampler=sampler, guard=guard,
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
                plot_loss(out)
    finally:
        guard.restore()
        # A ZeRO-3 config stays registered globally and would partition the next model built in this process.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return trainer
