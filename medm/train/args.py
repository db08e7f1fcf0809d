"""Train config: one YAML with `model:`, `data:`, `stage:` and `train:` sections, parsed into dataclasses.

`medm train configs/train/finetune.yaml train.learning_rate=1e-4 stage.init_from=runs/pretrain` reads the file,
applies the dotted overrides, and checks every key and value before any model is built: an unknown key names the
closest known one, a value of the wrong type or not allowed names what was expected (medm.config). `train:` takes
medm's own settings and every other field of transformers' TrainingArguments (medm.train._training_arguments).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from transformers import SchedulerType
from transformers.training_args import OptimizerNames

from medm.config import (
    ConfigError,
    apply_overrides,
    arg,
    from_dict,
    load_yaml,
    model_file,
    model_section,
    unknown_key,
)
from medm.data.dataset import DataArgs
from medm.data.streaming import check_streaming
from medm.models import ModelArgs, parse_model_args
from medm.registry import TASK
from medm.train._modes import COMPONENTS, parse_mode
from medm.train._training_arguments import TrainingArgumentsFields, recorded_settings


@dataclass
class LoraArgs:
    r: int = arg(16, "LoRA rank", ge=1)
    alpha: int = arg(32, "LoRA alpha; the update is scaled by alpha / r")
    dropout: float = arg(0.05, "dropout on the LoRA input", ge=0)
    target_modules: list | None = arg(None, "LLM linear layers to adapt, as name suffixes (e.g. [q_proj, v_proj]) "
                                            "or [all-linear]; null: the LLM family's default "
                                            "(model.llm.lora_target_modules; Phi-3 uses its fused qkv_proj; "
                                            "model.qwenvl.lora_target_modules for the qwen-vl kind)")
    encoder_target_modules: list | None = arg(None, "encoder linear layers to adapt when an encoder is `lora`; "
                                                    "null: every linear layer of that encoder")


@dataclass
class StagePlan:
    """What one stage trains. Modes: `frozen`, `full`, `lora`, `qlora` (LLM only; CUDA + bitsandbytes),
    `partial:N` (encoders only: the last N blocks). A component the model lacks must stay unset."""

    vision: str | None = arg(None, "2D encoder: frozen | full | lora | partial:N; null: frozen")
    connector: str | None = arg(None, "2D connector: frozen | full | lora (every linear layer); null: full")
    llm: str | None = arg(None, "language model: frozen | full | lora | qlora; null: full")
    vision3d: str | None = arg(None, "3D encoder: frozen | full | lora | partial:N; null: frozen")
    connector3d: str | None = arg(None, "3D connector: frozen | full | lora (every linear layer); null: full")
    lora: LoraArgs = arg(None, "LoRA settings for the components set to lora / qlora")
    init_from: str | None = arg(None, "checkpoint directory of an earlier stage whose weights start this one "
                                      "(full, connector-only or LoRA); a new run, not a resume")

    def __post_init__(self):
        if self.lora is None:
            self.lora = LoraArgs()


SAMPLING_STRATEGIES = ("auto", "random", "sequential", "group_by_length", "group_by_modality_length")


@dataclass
class TrainArgs(TrainingArgumentsFields):
    """medm's training settings; every other field of transformers' TrainingArguments passes through to the Trainer
    with its own type and default (medm.train._training_arguments), except those medm sets itself."""

    output_dir: str | None = arg(None, "where checkpoints, metrics.jsonl, TensorBoard logs and loss.png go")
    num_train_epochs: float = arg(1.0, "passes over the data (ignored when max_steps > 0)")
    max_steps: int = arg(-1, "optimizer steps to run; -1: use num_train_epochs", ge=-1)
    per_device_train_batch_size: int = arg(8, "samples per device per forward pass", ge=1)
    gradient_accumulation_steps: int = arg(1, "forward passes per optimizer step", ge=1)
    learning_rate: float = arg(2e-5, "peak learning rate", ge=0)
    connector_lr: float | None = arg(None, "peak learning rate of the connector(s); null: learning_rate", ge=0)
    weight_decay: float = arg(0.0, "AdamW weight decay (not applied to biases and norms)", ge=0)
    warmup_steps: float = arg(0.03, "linear warmup: steps (>= 1) or a fraction of all steps (< 1)", ge=0)
    lr_scheduler_type: str = arg("cosine", "transformers scheduler name: cosine, linear, constant, ...",
                                 choices=[s.value for s in SchedulerType])
    lr_scheduler_kwargs: dict | None = arg(None, "the scheduler's own settings, e.g. {num_decay_steps: 300} for "
                                                 "warmup_stable_decay or {min_lr_rate: 0.1} for cosine_with_min_lr")
    optim: str = arg("adamw_torch", "transformers optimizer name", choices=[o.value for o in OptimizerNames])
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.999, "AdamW beta2")
    max_grad_norm: float = arg(1.0, "gradient clipping norm", ge=0)
    bf16: bool = arg(False, "bfloat16 mixed precision (Ampere+ GPU, or the CPU)")
    fp16: bool = arg(False, "float16 mixed precision (CUDA only)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass to save memory")
    logging_steps: float = arg(10, "log every N steps (or a fraction of all steps when < 1)")
    logging_first_step: bool = arg(True, "also log the first step (the loss curves start at step 1)")
    save_strategy: str = arg("steps", "when to write checkpoint-N directories: steps, epoch, no",
                             choices=("steps", "epoch", "no"))
    save_steps: float = arg(500, "checkpoint every N steps (save_strategy: steps)")
    save_total_limit: int | None = arg(None, "keep at most this many checkpoint-N directories; null: all")
    seed: int = arg(42, "seed for weight init, data order and dropout (equal seeds make runs repeatable)", ge=0)
    dataloader_num_workers: int | None = arg(None, "data loading worker processes; null: 0 on the CPU (workers "
                                                   "would take cores from the model), on a GPU min(8, CPU cores per "
                                                   "process - 1), see docs/performance.md", ge=0)
    dataloader_prefetch_factor: int | None = arg(None, "batches each worker loads ahead; null: 2 (torch's default)",
                                                 ge=1)
    dataloader_persistent_workers: bool = arg(True, "keep workers (and their caches) alive between epochs")
    dataloader_pin_memory: bool = arg(True, "page-locked batches for faster, asynchronous copies to the GPU")
    train_sampling_strategy: str = arg("auto", "auto (a data mixture's own plan; else group_by_modality_length when "
                                               "the dataset knows its lengths; else random), random, sequential, "
                                               "group_by_length (batches of similar length), or "
                                               "group_by_modality_length (also one modality per batch: image, "
                                               "image3d or text); see medm.data.sampler",
                                  choices=SAMPLING_STRATEGIES)
    group_window: int = arg(64, "length grouping: sort within windows of this many steps (batch x GPUs); larger "
                                "means less padding, 1 sorts within one step only (LLaVA)", ge=1)
    deepspeed: str | None = arg(None, "DeepSpeed JSON config (configs/deepspeed/zero2.json, zero3.json, ...)")
    device: str = arg("auto", "auto (CUDA when available), cuda, or cpu (gloo backend for multi-process runs)",
                      choices=("auto", "cuda", "cpu"))
    resume_from_checkpoint: str | bool | None = arg(None, "resume this run: a checkpoint-N directory, or true for "
                                                          "the latest one in output_dir (optimizer, scheduler, RNG "
                                                          "and data position); not init_from")
    stop_signals: list = arg(["SIGTERM"], "signals that save a checkpoint at the end of the current step and stop "
                                          "the run cleanly (exit code 128 + signal number), e.g. [SIGTERM, SIGUSR1] "
                                          "for Slurm's --signal=USR1@120; [] keeps the default handlers. See "
                                          "docs/reliability.md")
    stop_on_nonfinite_loss: bool = arg(True, "stop at the first NaN / Inf training loss without saving that step, "
                                             "keeping the last good checkpoint (an error naming it)")
    report_to: list | str = arg(["tensorboard"], "logging integrations (tensorboard, wandb, mlflow, ...): a list "
                                                 "or one name; [] or none for none (metrics.jsonl is always "
                                                 "written)")
    disable_tqdm: bool = arg(False, "turn off the console progress bar")
    plot_loss: bool = arg(True, "write loss.png (training and validation loss curves) into output_dir at the end")
    eval_strategy: str | None = arg(None, "when to compute the validation loss (data.val_path / data.val_size): "
                                          "steps, epoch, no; null: steps when there is validation data, else no",
                                    choices=("steps", "epoch", "no"))
    eval_steps: float | None = arg(None, "evaluate every N steps (or a fraction of all steps when < 1); null: "
                                         "logging_steps", ge=0)
    per_device_eval_batch_size: int | None = arg(None, "validation samples per device per forward pass; null: "
                                                       "per_device_train_batch_size", ge=1)
    load_best_model_at_end: bool = arg(False, "end with the weights of the checkpoint best by metric_for_best_model "
                                              "(needs save_strategy equal to eval_strategy, save_steps a multiple "
                                              "of eval_steps)")
    metric_for_best_model: str = arg("eval_loss", "logged validation figure that ranks checkpoints and drives early "
                                                  "stopping (e.g. eval_loss)")
    greater_is_better: bool | None = arg(None, "a higher metric_for_best_model is better; null: false for a *loss "
                                               "metric, else true")
    early_stopping_patience: int | None = arg(None, "stop after this many evaluations without improvement of "
                                                    "metric_for_best_model (needs load_best_model_at_end); null: "
                                                    "never", ge=1)
    early_stopping_threshold: float = arg(0.0, "smallest change of the metric that counts as an improvement", ge=0)
    eval_task: str | None = arg(None, "medm eval task (vqa, vqa-rad, slake, report, ...; `medm list`) that scores "
                                      "answers generated for the first eval_max_samples validation records at each "
                                      "evaluation, logged as eval_<figure> (eval_closed_accuracy, eval_rougeL, ...) "
                                      "and usable as metric_for_best_model; null: the validation loss only")
    eval_max_samples: int = arg(200, "validation records answered at each evaluation with eval_task (the first N, "
                                     "the same every time)", ge=1)
    eval_max_new_tokens: int = arg(32, "longest answer generated for eval_task (greedy decoding)", ge=1)

    def __post_init__(self):
        if isinstance(self.report_to, str):  # `report_to: wandb`, as transformers takes it
            self.report_to = [] if self.report_to == "none" else [self.report_to]

    def recorded_settings(self) -> dict[str, Any]:
        """What a model card records (medm.train._training_arguments.recorded_settings); a method so the card's
        writer (medm.interop) reads it without importing medm.train."""
        return recorded_settings(self)


@dataclass
class TrainConfig:
    model: ModelArgs = arg(None, "model config: a path to a configs/model/*.yaml file or an inline mapping")
    data: dict | None = arg(None, "data section (medm.data.DataArgs: path, image_dir, max_length, ...)")
    stage: StagePlan = arg(None, "what this stage trains, and the checkpoint it starts from")
    train: TrainArgs = arg(None, "optimisation, precision, logging and saving")

    def __post_init__(self):
        self.stage = self.stage or StagePlan()
        self.train = self.train or TrainArgs()


def parse_train_config(cfg: dict[str, Any], where: str = "train config") -> TrainConfig:
    """Validate a train config mapping; `model` may be a YAML path (relative to cwd or to `where`)."""
    cfg = dict(cfg)
    unknown = [k for k in cfg if k not in ("model", "data", "stage", "train")]
    if unknown:
        raise unknown_key(where, unknown[0], ("model", "data", "stage", "train"), "section", sep=": ")
    model, model_where = model_section(cfg, where)
    stage = from_dict(StagePlan, cfg.get("stage"), f"{where}: stage")
    _check_modes(stage, where)
    train = from_dict(TrainArgs, cfg.get("train"), f"{where}: train")
    if not train.output_dir:
        raise ConfigError(f"{where}: train.output_dir is required")
    _check_output_dir(train.output_dir, where)
    if cfg.get("data") is not None and not isinstance(cfg["data"], dict):
        raise ConfigError(f"{where}: `data` must be a mapping")
    if cfg.get("data") is not None:
        data = from_dict(DataArgs, cfg["data"], f"{where}: data")  # a misspelt key fails here, before any model
        _check_validation(data, train, where)
        check_streaming(data, train, where)
    return TrainConfig(model=parse_model_args(model, model_where), data=cfg.get("data"), stage=stage, train=train)


def _check_modes(stage: StagePlan, where: str) -> None:
    """Each mode set in the stage plan is one its component takes (whether the model has that component is known
    only once it is built: medm.train.stages.resolve_plan)."""
    for component in COMPONENTS:
        if getattr(stage, component) is not None:
            try:
                parse_mode(component, getattr(stage, component))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None


def has_validation(data: DataArgs) -> bool:
    return bool(data.val_path) or bool(data.val_size)


def eval_strategy(train: TrainArgs, data: DataArgs | None) -> str:
    """`train.eval_strategy`, its null resolved: steps when the data section has validation records, else no."""
    if train.eval_strategy is not None:
        return train.eval_strategy
    return "steps" if data is not None and has_validation(data) else "no"


def _check_validation(data: DataArgs, train: TrainArgs, where: str) -> None:
    """Validation settings that cannot work together fail when the config is read, naming the keys."""
    if data.val_path and data.val_size:
        raise ConfigError(f"{where}: data.val_path and data.val_size are both set; give one")
    if data.val_size and data.val_size >= 1 and data.val_size != int(data.val_size):
        raise ConfigError(f"{where}: data.val_size: {data.val_size} is neither a fraction (< 1) nor a whole count "
                          "of records")
    strategy = eval_strategy(train, data)
    if strategy != "no" and not has_validation(data):
        raise ConfigError(f"{where}: train.eval_strategy={strategy} needs validation data: set data.val_path or "
                          "data.val_size")
    metric = train.metric_for_best_model.removeprefix("eval_")
    if strategy != "no" and train.eval_task is None and not metric.endswith("loss"):
        raise ConfigError(f"{where}: train.metric_for_best_model: {train.metric_for_best_model!r} is not logged; "
                          "without train.eval_task the validation figure is eval_loss (set train.eval_task, e.g. vqa, "
                          "for generation scores such as eval_closed_accuracy)")
    if train.eval_task is not None:
        if train.eval_task not in TASK:
            raise ConfigError(f"{where}: train.eval_task: {train.eval_task!r} is not a medm eval task; known: "
                              f"{', '.join(TASK.names())}")
        if strategy == "no":
            raise ConfigError(f"{where}: train.eval_task scores generation at each evaluation, but there is none: "
                              "set data.val_path or data.val_size (and leave train.eval_strategy unset or steps / "
                              "epoch)")
    if train.early_stopping_patience is not None and not train.load_best_model_at_end:
        raise ConfigError(f"{where}: train.early_stopping_patience needs train.load_best_model_at_end=true")
    if train.load_best_model_at_end:
        if strategy == "no":
            raise ConfigError(f"{where}: train.load_best_model_at_end needs validation (data.val_path or "
                              "data.val_size)")
        if train.save_strategy != strategy:
            raise ConfigError(f"{where}: train.load_best_model_at_end needs train.save_strategy "
                              f"({train.save_strategy}) equal to the evaluation strategy ({strategy})")
        every = train.eval_steps or train.logging_steps
        if strategy == "steps" and train.save_steps % every:
            raise ConfigError(f"{where}: train.load_best_model_at_end needs train.save_steps ({train.save_steps}) "
                              f"to be a multiple of train.eval_steps ({every})")


def _check_output_dir(path: str, where: str) -> None:
    """output_dir, or the first of its parents that exists, must be a directory (a file there fails much later)."""
    node = os.path.abspath(path)
    while not os.path.exists(node) and os.path.dirname(node) != node:
        node = os.path.dirname(node)
    if not os.path.isdir(node):
        what = "is a file" if node == os.path.abspath(path) else f"cannot be created: {node} is a file"
        raise ConfigError(f"{where}: train.output_dir {path!r} {what}, not a directory")


def check_data_files(cfg: TrainConfig, where: str = "train config") -> None:
    """Every annotation file `data.path` names exists (plain paths or mixture entries' `path`); run before a model
    is built, as the configs' own paths (data/vqa_rad/train.json) need not exist when a config is only read."""
    paths = (cfg.data or {}).get("path")
    for entry in paths if isinstance(paths, list) else [paths]:
        path = entry.get("path") if isinstance(entry, dict) else entry
        if isinstance(path, str) and not os.path.isfile(path):
            what = "is a directory, not an annotation file" if os.path.isdir(path) else "not found"
            raise ConfigError(f"{where}: data.path {path!r} {what}")


def load_train_config(path: str, overrides: list[str] | None = None) -> TrainConfig:
    """Read a train YAML and apply `a.b=c` overrides in order.

    `model=configs/model/tiny.yaml` swaps the model file; a later `model.llm.dtype=bfloat16` edits inside it.
    """
    cfg = load_yaml(path)
    for item in overrides or []:
        if item.startswith("model.") and isinstance(cfg.get("model"), str):
            cfg["model"] = load_yaml(model_file(cfg["model"], path))
        apply_overrides(cfg, [item])
    return parse_train_config(cfg, where=path)
