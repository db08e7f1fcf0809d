"""Crash safety of training: checkpoints are published whole or not at all (kill -9 or a full disk mid-save), a
SIGKILL'd run resumes to the weights of an uninterrupted one, SIGTERM saves and exits cleanly, and a non-finite
loss stops the run keeping the last good checkpoint.

(`medm infer --resume` after a kill: tests/infer/test_predictions.py::test_killed_infer_resumes_with_every_id_once.)
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import REPO, make_cfg, run_env
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from medm.config import ConfigError
from medm.models.tiny import tiny_model_config
from medm.train.checkpoint import base_dir, load_trained
from medm.train.safety import (
    CheckpointWriteError,
    NonFiniteLossError,
    RunGuard,
    publish_checkpoint,
    remove_incomplete_checkpoints,
)
from medm.train.trainer import MedMTrainer, run_training

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
COMMON = dict(max_steps=6, save_strategy="steps", save_steps=2, lr_scheduler_type="cosine", warmup_steps=2)


def _env() -> dict:
    env = run_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests" / "train")])
    return env


def _wait_for(condition, proc, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) first:\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _checkpoints(run: Path) -> list[str]:
    """checkpoint-N and tmp-checkpoint-N directories in `run`."""
    return sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint-", "tmp-")))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_sigkill_mid_save_leaves_no_half_checkpoint_and_the_resumed_run_matches(tmp_path, toy_data):
    run, marker, log = tmp_path / "run", tmp_path / "hanging", tmp_path / "worker.log"
    spec = {"out": str(run), "data": str(toy_data), "train": COMMON, "hang_in_save_at": 4, "marker": str(marker)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(HERE / "crash_worker.py"), json.dumps(spec)], env=_env(),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(marker.exists, proc, 180, log)  # checkpoint-4 is half written: weights yes, trainer state no
    finally:
        proc.kill()  # SIGKILL: no handler runs
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    assert not (run / "checkpoint-4").exists()
    half = run / "tmp-checkpoint-4" / "checkpoint-4"
    assert (half / "model.safetensors").is_file() and not (half / "trainer_state.json").exists()
    assert json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-2")

    resumed = run_training(make_cfg(run, toy_data, resume_from_checkpoint=True, **COMMON))
    assert resumed.state.global_step == 6
    assert _checkpoints(run) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6"]  # the half-written one is gone, step 4 saved again
    straight = run_training(make_cfg(tmp_path / "straight", toy_data, **COMMON))
    _assert_same_weights(straight.model.state_dict(), resumed.model.state_dict())
    _assert_same_weights(load_file(str(tmp_path / "straight" / "model.safetensors")),
                         load_file(str(run / "model.safetensors")))


def test_full_disk_mid_save_publishes_nothing_and_the_run_resumes(tmp_path, toy_data, monkeypatch):
    """A components checkpoint (connector only; its frozen weights named by a relative path) whose optimizer state
    hits ENOSPC at step 4."""
    run = tmp_path / "run"
    stage = {"llm": "frozen"}
    save_optimizer = MedMTrainer._save_optimizer_and_scheduler

    def full_disk(self, output_dir):
        if self.state.global_step == 4:
            Path(output_dir, "optimizer.pt").write_bytes(b"\0" * 100)  # what fitted before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        save_optimizer(self, output_dir)

    monkeypatch.setattr(MedMTrainer, "_save_optimizer_and_scheduler", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"could not write .*checkpoint-4: .*No space left on device.*"
                                                   r"last complete checkpoint is .*checkpoint-2"):
        run_training(make_cfg(run, toy_data, stage, **COMMON))
    assert _checkpoints(run) == ["checkpoint-2"]  # no staging left
    # The published checkpoint-2 finds its frozen weights through the path it holds, relative to where it is now.
    assert base_dir(str(run / "checkpoint-2")) == str(run / "base")
    model, _ = load_trained(str(run / "checkpoint-2"))
    assert all(torch.isfinite(p).all() for p in model.parameters())

    monkeypatch.undo()
    resumed = run_training(make_cfg(run, toy_data, stage, resume_from_checkpoint=True, save_total_limit=2, **COMMON))
    assert resumed.state.global_step == 6
    # Rotation happens after each new checkpoint is in place, on the published ones.
    assert _checkpoints(run) == ["checkpoint-4", "checkpoint-6"]
    assert base_dir(str(run / "checkpoint-6")) == str(run / "base")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, toy_data):
    """`medm train` in its own process group gets SIGTERM (as a scheduler sends it to the whole job, DataLoader
    worker included): it finishes the step, saves checkpoint-N, skips the final save and exits 143."""
    run, log = tmp_path / "run", tmp_path / "train.log"
    cfg = {"model": tiny_model_config(),
           "data": {"path": str(toy_data), "image_dir": str(toy_data.parent), "max_length": 256},
           "train": {"output_dir": str(run), "max_steps": 500, "save_steps": 1000, "per_device_train_batch_size": 4,
                     "learning_rate": 1e-3, "warmup_steps": 0, "lr_scheduler_type": "constant", "logging_steps": 1,
                     "report_to": [], "disable_tqdm": True, "device": "cpu", "dataloader_num_workers": 1}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    metrics = run / "metrics.jsonl"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "medm.cli", "train", str(path)], env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 3, proc, 180, log)
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert "received SIGTERM: saving a checkpoint at the end of this step" in text
    assert "Traceback" not in text
    ckpts = [p for p in run.iterdir() if p.name.startswith(("checkpoint-", "tmp-"))]
    assert len(ckpts) == 1, ckpts
    step = int(ckpts[0].name.split("-")[1])
    assert 3 <= step < 500 and f"stopped by SIGTERM at step {step}" in text
    assert json.loads((ckpts[0] / "trainer_state.json").read_text())["global_step"] == step
    assert not (run / "model.safetensors").exists()  # no final model that would look like a finished run

    resumed = run_training(make_cfg(run, toy_data, resume_from_checkpoint=True, max_steps=step + 2))
    assert resumed.state.global_step == step + 2 and (run / "model.safetensors").is_file()


class PoisonAfter(TrainerCallback):
    """Turns the connector's weights to NaN after step `step` (as a diverging update would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.connector.mlp[0].weight.fill_(float("nan"))


def test_nonfinite_loss_stops_the_run_keeping_the_last_good_checkpoint(tmp_path, toy_data):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 4.*last good checkpoint is .*checkpoint-2"):
        run_training(make_cfg(run, toy_data, **{**COMMON, "max_steps": 8}), callbacks=[PoisonAfter(3)])
    assert _checkpoints(run) == ["checkpoint-2"]  # 4 was not saved
    assert not (run / "model.safetensors").exists()
    good = load_file(str(run / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    # Turned off, the run trains on to the end regardless.
    other = run_training(make_cfg(tmp_path / "on", toy_data, **COMMON, stop_on_nonfinite_loss=False),
                         callbacks=[PoisonAfter(3)])
    assert other.state.global_step == 6


def test_publish_replaces_an_old_checkpoint_and_leftovers_are_removed(tmp_path):
    final = tmp_path / "checkpoint-2"
    final.mkdir()
    (final / "stale.bin").write_text("old run")
    staged = tmp_path / "tmp-checkpoint-2" / "checkpoint-2"
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_text("new")
    publish_checkpoint(str(staged), str(final))
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors"]

    (tmp_path / "tmp-checkpoint-9" / "checkpoint-9").mkdir(parents=True)
    (tmp_path / "tmp-notes").mkdir()  # not a staging directory of medm's: kept
    assert remove_incomplete_checkpoints(str(tmp_path)) == ["tmp-checkpoint-2", "tmp-checkpoint-9"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "tmp-notes"]


def test_stop_signal_settings_are_checked():
    assert [s.name for s in RunGuard(["TERM", "SIGUSR1", 12]).signals] == ["SIGTERM", "SIGUSR1", "SIGUSR2"]
    with pytest.raises(ConfigError, match="train.stop_signals: 'SIGNOPE' is not a signal name"):
        RunGuard(["SIGNOPE"])
    with pytest.raises(ConfigError, match="SIGKILL cannot be caught"):
        RunGuard(["SIGKILL"])
