"""`MedMTrainer`: the HF Trainer with a connector learning rate, medm's sampling strategies and checkpoints in the
stage's format (full, components, LoRA); `NoGradCheck` warns about trainable parameters that get no gradient.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from medm.config import ConfigError
from medm.data._bad_samples import bad_sample_count
from medm.data.sampler import GroupedSampler
from medm.data.streaming import own_shards
from medm.models.checkpoint import (
    load_components,
    read_meta,
    relocate_meta,
    save_components,
    write_meta,
)
from medm.train._generation_eval import GenerationEval
from medm.train.args import SAMPLING_STRATEGIES
from medm.train.safety import (
    CheckpointWriteError,
    RunGuard,
    last_checkpoint,
    publish_checkpoint,
    staging_dir,
)
from medm.train.stages import (
    COMPONENTS_ONLY,
    CONNECTORS,
    FULL,
    LORA,
    component_paths,
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
        sampling: medm's `train_sampling_strategy` (auto, random, sequential, group_by_length,
            group_by_modality_length; see `TrainArgs`).
        group_window: steps per length-sorting window of the grouped samplers (medm.data.sampler).
        train_sampler: a sampler that plans the epoch itself (a data mixture's `MixtureSampler`); it replaces
            the sampling strategy.
        guard: the run's `RunGuard` (medm.train.safety), told every training loss (non-finite loss stop).
        generation_eval: answers validation records and scores them at each evaluation (`train.eval_task`,
            medm.train._generation_eval); its figures join eval_loss as `eval_<name>`.

    Checkpoints are written atomically (`_save_checkpoint`), and training logs carry `bad_samples` when the dataset
    counts samples whose media failed to load (medm.data.dataset, `data.max_bad_samples`).
    """

    def __init__(self, *args, connector_lr: float | None = None, checkpoint_format: str = FULL,
                 components: list[str] | None = None, base_dir: str | None = None, sampling: str = "auto",
                 group_window: int = 64, train_sampler: torch.utils.data.Sampler | None = None,
                 guard: RunGuard | None = None, generation_eval: GenerationEval | None = None, **kwargs):
        self._staging: str | None = None
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.generation_eval = generation_eval
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

    def get_train_dataloader(self):
        # A streaming dataset shards by rank itself: Accelerate's re-sharding wrapper passes it through.
        return own_shards(super().get_train_dataloader())

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

            modalities = getattr(dataset, "modalities", None) if strategy == "group_by_modality_length" else None
            return GroupedSampler(dataset.lengths, self.args.train_batch_size, modalities=modalities,
                                  world_size=max(1, self.args.world_size), window=self.group_window,
                                  seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # ---- saving and resuming in the stage's checkpoint format ---------------------------------------------
    # ---- evaluation: the validation loss, plus generation scored by an eval task -------------------------------
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.generation_eval is not None and description == "Evaluation":
            # In the same metrics as eval_loss: one log entry, and metric_for_best_model / early stopping see them.
            with self.autocast_smart_context_manager():
                figures = self.generation_eval(self.accelerator.unwrap_model(self.model), self.processing_class,
                                               self.state.global_step)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in figures.items()})
        return output

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

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        epochs_trained, steps_in_epoch = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial)
        if resume_from_checkpoint is not None and self.state.global_step >= max_steps:
            # The checkpoint already holds every step: the Trainer would start the epoch loop and train one more
            # before its stop check. No epoch is left to run; the run just ends (and saves) with these weights.
            logger.info("%s is at step %d of %d: nothing left to train", resume_from_checkpoint,
                        self.state.global_step, max_steps)
            return num_train_epochs, 0
        return epochs_trained, steps_in_epoch

    def _load_best_model(self) -> None:
        # load_best_model_at_end: a components checkpoint holds only the trained parts, which the Trainer does
        # not recognise as weights.
        if self.checkpoint_format == COMPONENTS_ONLY and not self.is_deepspeed_enabled:
            logger.info("loading the best checkpoint %s (%s %s)", self.state.best_model_checkpoint,
                        self.args.metric_for_best_model, self.state.best_metric)
            load_components(_unwrap_peft(self.model), self.state.best_model_checkpoint)
            return
        super()._load_best_model()

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
        staged = os.path.join(staging, name)
        best = self.state.best_global_step
        best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best}")
        if best and (best == self.state.global_step or os.path.isdir(best_dir)):
            # The Trainer looked for the best checkpoint inside the staging directory: name its published place
            # (what load_best_model_at_end and the checkpoint rotation read), in the saved state too.
            self.state.best_model_checkpoint = best_dir
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
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
