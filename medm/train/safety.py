"""Crash safety for long training runs: atomic checkpoints, a clean stop on a signal, a stop on a non-finite loss.

- **Atomic checkpoints.** `MedMTrainer` has the Trainer write checkpoint-N inside `tmp-checkpoint-N/`, syncs every
  file to disk, and renames it into place (`publish_checkpoint`). A kill, a crash or a full disk mid-save therefore
  never leaves a `checkpoint-N` that looks complete and is not: `train.resume_from_checkpoint: true` (the Trainer's
  `get_last_checkpoint`, which matches `checkpoint-N` exactly) only ever sees complete ones. A failed save removes
  its staging directory and raises `CheckpointWriteError`; staging directories a killed save left behind are
  removed when the next run in that output_dir starts (`remove_incomplete_checkpoints`).
- **Stop signals.** `RunGuard` turns the signals in `train.stop_signals` (SIGTERM by default: what Slurm,
  Kubernetes and `kill` send before killing a job) into "finish this step, save checkpoint-N, stop". Under torchrun
  or DeepSpeed the ranks agree on the step to stop at (one small all-reduce per optimizer step). DataLoader
  workers ride out a stop signal only while the main process is saving and stopping (a scheduler signals the
  whole process group, and a dead worker would end the run before the save); a second one, or `WORKER_GRACE_S`
  seconds, ends them. Any other signal to a worker (torch and multiprocessing stop workers with SIGTERM after a
  crash and at exit) ends it at once.
- **Non-finite loss.** With `train.stop_on_nonfinite_loss`, the first NaN / Inf training loss stops the run at the
  end of that step, before anything is saved, so the last checkpoint holds the last good weights;
  `run_training` then raises `NonFiniteLossError` naming the step and that checkpoint.

See docs/reliability.md.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from medm.config import ConfigError

__all__ = [
    "STAGING_PREFIX",
    "CheckpointWriteError",
    "NonFiniteLossError",
    "RunGuard",
    "publish_checkpoint",
    "remove_incomplete_checkpoints",
    "resolve_signal",
    "staging_dir",
]

logger = logging.getLogger(__name__)

STAGING_PREFIX = "tmp-"
# How long a DataLoader worker outlives a stop signal during a stop-and-save: enough for the main process to save
# and shut the workers down.
WORKER_GRACE_S = 600
# How long a worker signalled while the run is going on waits for the main process to say it is stopping (a
# scheduler signals the whole process group at once; the main process's Python handler runs a moment later, after
# the operation in progress). No word by then: the signal was meant for the worker alone, which ends.
WORKER_SIGNAL_WAIT_S = 5.0
# What the main process is doing, shared with its DataLoader workers in one byte (RunGuard.run_state).
_RUNNING, _STOPPING, _DONE = 0, 1, 2
_STAGING = re.compile(rf"^{re.escape(STAGING_PREFIX + PREFIX_CHECKPOINT_DIR)}-\d+$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); nothing was published under its name."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without saving the weights of that step."""


# ---- atomic checkpoints -------------------------------------------------------------------------------------------
def staging_dir(run_dir: str, name: str) -> str:
    """Where checkpoint `name` (e.g. `checkpoint-500`) is written before it is renamed into `run_dir`."""
    return os.path.join(run_dir, STAGING_PREFIX + name)


def _fsync_tree(root: str) -> None:
    """Flush every file under `root` to disk, so the rename below never publishes data still in the page cache."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems refuse fsync on a directory; the rename is still atomic there
        pass
    finally:
        os.close(fd)


def publish_checkpoint(staged: str, final: str) -> None:
    """Sync the complete checkpoint directory `staged` to disk and rename it to `final` in one step.

    A `final` that already exists (the same step saved again, e.g. a run restarted without resuming) is replaced:
    it is moved aside first, because a directory cannot be renamed over a non-empty one.
    """
    _fsync_tree(staged)
    old = None
    if os.path.exists(final):
        old = staged + ".replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_incomplete_checkpoints(output_dir: str) -> list[str]:
    """Delete the `tmp-checkpoint-N` staging directories a killed or failed save left in `output_dir`.

    Returns:
        The removed directory names.
    """
    if not os.path.isdir(output_dir):
        return []
    removed = sorted(n for n in os.listdir(output_dir)
                     if _STAGING.match(n) and os.path.isdir(os.path.join(output_dir, n)))
    for name in removed:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if removed:
        logger.warning("removed %d incomplete checkpoint(s) left by an interrupted save in %s: %s", len(removed),
                       output_dir, ", ".join(removed))
    return removed


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint-N in `output_dir` (what `resume_from_checkpoint: true` resumes from)."""
    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


# ---- stop signals and non-finite losses ---------------------------------------------------------------------------
def resolve_signal(name: str | int) -> signal.Signals:
    """`"SIGTERM"`, `"TERM"` or 15 -> `signal.SIGTERM`; ConfigError for anything else."""
    try:
        if isinstance(name, int):
            return signal.Signals(name)
        key = name.upper()
        return signal.Signals[key if key.startswith("SIG") else "SIG" + key]
    except (KeyError, ValueError, AttributeError):
        raise ConfigError(f"train.stop_signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)") from None


_worker_signals = 0
_worker_run_state = None  # the main process's RunGuard.run_state, in a DataLoader worker


def _worker_stop_signal(signum, frame) -> None:
    """A stop signal in a DataLoader worker: ridden out while the main process saves and stops, else the end."""
    global _worker_signals
    _worker_signals += 1
    state = _worker_run_state
    if _worker_signals == 1 and state is not None:
        deadline = time.monotonic() + WORKER_SIGNAL_WAIT_S
        while state.value == _RUNNING and time.monotonic() < deadline:
            time.sleep(0.01)
        if state.value == _STOPPING:
            signal.alarm(WORKER_GRACE_S)  # SIGALRM's default action ends the worker if nothing else has by then
            return
    os._exit(128 + signum)


class _WorkerInit:
    """A DataLoader `worker_init_fn` that lets the worker ride out a stop signal while the main process saves and
    stops (`run_state`), then runs the original."""

    def __init__(self, inner, signals, run_state=None):
        self.inner = inner
        self.signals = [int(s) for s in signals]
        self.run_state = run_state

    def __call__(self, worker_id: int) -> None:
        global _worker_run_state
        _worker_run_state = self.run_state
        for sig in self.signals:
            signal.signal(sig, _worker_stop_signal)
        if self.inner is not None:
            self.inner(worker_id)


class RunGuard(TrainerCallback):
    """Stops training cleanly on a stop signal (after saving a checkpoint) or on a non-finite loss (without saving).

    Args:
        stop_signals: signals that mean "save and stop" (names such as SIGTERM, SIGUSR1); SIGKILL cannot be caught.
        stop_on_nonfinite_loss: stop at the first NaN / Inf training loss.

    After training, `signal_name` is the stop signal received (or None) and `nonfinite` the `(step, loss)` of the
    first non-finite loss (or None). `MedMTrainer.training_step` reports each loss through `observe_loss`.
    """

    def __init__(self, stop_signals=("SIGTERM",), stop_on_nonfinite_loss: bool = True):
        self.signals = [resolve_signal(s) for s in stop_signals or ()]
        bad = [s.name for s in self.signals if s in (signal.SIGKILL, signal.SIGSTOP)]
        if bad:
            raise ConfigError(f"train.stop_signals: {bad[0]} cannot be caught; use SIGTERM or SIGUSR1")
        self.stop_on_nonfinite_loss = stop_on_nonfinite_loss
        self.signal_name: str | None = None
        self.nonfinite: tuple[int, float] | None = None
        self.saved_step: int | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._pid = os.getpid()
        # Shared with the DataLoader workers (inherited when forked, pickled when spawned): running, stopping, done.
        self.run_state = multiprocessing.RawValue("b", _RUNNING)

    # ---- signal handlers, installed around trainer.train() ----------------------------------------------------
    def install(self) -> None:
        """Catch the stop signals (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            if self.signals:
                logger.info("not in the main thread: stop signals keep their default handlers")
            return
        self._pid = os.getpid()
        self.run_state.value = _RUNNING
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back: training is over (finished, stopped or crashed), so a stop signal now
        ends the DataLoader workers at once."""
        self.run_state.value = _DONE
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: it keeps loading until the main process has saved and stops it
        name = signal.Signals(signum).name
        if self.signal_name is None:
            # Only a flag here: the step in progress finishes, then on_step_end asks the Trainer to save and stop.
            logger.warning("received %s: saving a checkpoint at the end of this step, then stopping", name)
        self.signal_name = name
        self.run_state.value = _STOPPING  # the workers now ride out the signal the scheduler sent them too

    # ---- losses -----------------------------------------------------------------------------------------------
    def observe_loss(self, loss: torch.Tensor, step: int) -> None:
        """Record the first non-finite training loss (`step` is the optimizer step it belongs to)."""
        if not self.stop_on_nonfinite_loss or self.nonfinite is not None:
            return
        loss = loss.detach()
        if not bool(torch.isfinite(loss).all()):
            self.nonfinite = (step, float(loss.float().mean()))
            logger.error("non-finite training loss (%s) at step %d: stopping without saving", self.nonfinite[1],
                         step)

    # ---- Trainer callbacks ------------------------------------------------------------------------------------
    def _agree(self, args) -> tuple[bool, bool]:
        """(stop signal, non-finite loss) on any rank: every rank must stop at the same step."""
        stop, nan = self.signal_name is not None, self.nonfinite is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized() and args.world_size > 1:
            flags = torch.tensor([float(stop), float(nan)], device=args.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            stop, nan = bool(flags[0]), bool(flags[1])
            if stop and self.signal_name is None:
                self.signal_name = "a stop signal on another rank"
                self.run_state.value = _STOPPING
            if nan and self.nonfinite is None:
                self.nonfinite = (-1, float("nan"))  # the step is in the log of the rank that saw it
        return stop, nan

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # Workers start when the first epoch is iterated, after this: they get the handler through worker_init_fn,
        # set on the torch DataLoader itself (accelerate's DataLoaderShard iterates the one it wraps).
        loader = train_dataloader
        while getattr(loader, "base_dataloader", None) is not None:
            loader = loader.base_dataloader
        if self.signals and loader is not None and getattr(loader, "num_workers", 0) > 0 and \
                not isinstance(loader.worker_init_fn, _WorkerInit):
            loader.worker_init_fn = _WorkerInit(loader.worker_init_fn, self.signals, self.run_state)

    def on_step_end(self, args, state, control, **kwargs):
        stop, nan = self._agree(args)
        if nan:
            if self.nonfinite[0] < 0:
                self.nonfinite = (state.global_step, self.nonfinite[1])
            control.should_save = False  # this step's weights are not to be trusted: keep the last good checkpoint
            control.should_training_stop = True
        elif stop:
            control.should_save = True  # whatever save_strategy says
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.saved_step = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        # save_strategy: epoch asks for a save here too: not of non-finite weights, and not the step just saved.
        if self.nonfinite is not None or (self.signal_name is not None and self.saved_step == state.global_step):
            control.should_save = False
        return control

    # ---- what run_training reports ----------------------------------------------------------------------------
    def nonfinite_error(self, output_dir: str) -> NonFiniteLossError:
        step, loss = self.nonfinite
        last = last_checkpoint(output_dir)
        keep = (f"the last good checkpoint is {last} (resume from it with train.resume_from_checkpoint={last})"
                if last else "no checkpoint was saved before it")
        return NonFiniteLossError(
            f"training stopped: the loss is {loss} at step {step}; the weights of that step were not saved and "
            f"{keep}. Usual causes: a learning rate too high for this stage (train.learning_rate, "
            "train.connector_lr), no warmup, fp16 overflow (use bf16), or bad input values in that step's batch. "
            "train.stop_on_nonfinite_loss=false trains on regardless.")
