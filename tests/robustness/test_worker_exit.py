"""DataLoader workers and stop signals (issue 26 item 1): a worker rides out a stop signal only while the main
process is saving and stopping; any other exit (a crash, torch shutting its workers down, the end of the run) ends
the workers at once, so a crashed `medm train` returns instead of waiting for them.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import REPO, run_env

from medm.models.tiny import tiny_model_config
from medm.train.safety import RunGuard


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return torch.tensor([i])


def _worker_of(guard: RunGuard):
    """A started DataLoader worker process, set up the way RunGuard sets up training's workers."""
    loader = torch.utils.data.DataLoader(_Numbers(), batch_size=1, num_workers=1,
                                         multiprocessing_context="fork")
    guard.on_train_begin(None, None, None, train_dataloader=loader)
    it = iter(loader)
    next(it)  # the worker is running and has its handlers
    # The test kills workers on purpose: torch's SIGCHLD check in this process is not to report them.
    torch.utils.data._utils.signal_handling._remove_worker_pids(id(it))
    it._worker_pids_set = False
    return it, it._workers[0]


def _stop(it) -> None:
    for w in it._workers:
        if w.is_alive():
            w.kill()
        w.join(5)
    it._shutdown_workers()


def test_workers_end_at_once_when_the_run_is_over():
    """After a crash, `run_training` restores the handlers (its `finally`); then torch's or multiprocessing's SIGTERM
    to a worker ends it at once (it used to be ignored for 10 minutes, stalling the process at exit)."""
    guard = RunGuard(["SIGTERM"])
    guard.install()
    try:
        it, worker = _worker_of(guard)
    finally:
        guard.restore()  # what run_training's finally does when train() raises
    try:
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(3)
        assert not worker.is_alive(), "the worker ignored the SIGTERM that ends it after the run"
    finally:
        _stop(it)


def test_a_worker_signalled_while_no_stop_is_in_progress_ends():
    """A SIGTERM to a worker that the main process does not follow with a stop-and-save (torch terminating its
    workers, a kill of the worker alone) ends it after a short wait for a stop (WORKER_SIGNAL_WAIT_S), not 10
    minutes."""
    guard = RunGuard(["SIGTERM"])
    guard.install()
    try:
        it, worker = _worker_of(guard)
        try:
            os.kill(worker.pid, signal.SIGTERM)
            worker.join(10)
            assert not worker.is_alive()
        finally:
            _stop(it)
    finally:
        guard.restore()


def test_a_worker_rides_out_the_stop_signal_while_the_run_saves():
    """The scheduler's SIGTERM reaches the main process and its workers: the worker keeps loading while the main
    process finishes the step and saves; a second signal ends it."""
    guard = RunGuard(["SIGTERM"])
    guard.install()
    try:
        it, worker = _worker_of(guard)
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the main process: stop-and-save in progress
            assert guard.signal_name == "SIGTERM"
            os.kill(worker.pid, signal.SIGTERM)
            worker.join(1.5)
            assert worker.is_alive(), "the worker died before the main process could save"
            assert int(next(it)[0]) >= 1  # and still loads
            os.kill(worker.pid, signal.SIGTERM)
            worker.join(5)
            assert not worker.is_alive()
        finally:
            _stop(it)
    finally:
        guard.restore()


@pytest.mark.slow
def test_a_crashed_run_with_workers_exits_promptly(tmp_path, toy_data):
    """`medm train` with DataLoader workers whose every sample fails to load prints the error and exits 1 at once
    (it used to wait 600 s for the workers it had told to stop)."""
    run = tmp_path / "run"
    cfg = {"model": tiny_model_config(),
           "data": {"path": str(toy_data), "image_dir": str(tmp_path / "no-such-dir"), "max_length": 256},
           "train": {"output_dir": str(run), "max_steps": 4, "per_device_train_batch_size": 4, "report_to": [],
                     "disable_tqdm": True, "device": "cpu", "dataloader_num_workers": 2}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = run_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(Path(REPO) / "tests" / "train")])
    log = tmp_path / "train.log"
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "medm.cli", "train", str(path)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        # Start-up and the failing step take seconds; the old stall was 600 s. The bound only tells the two apart.
        code = proc.wait(timeout=200)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left: the process, its DataLoader workers
        except ProcessLookupError:
            pass
        proc.wait()
    text = log.read_text()
    assert code == 1, f"exit code {code} after {time.monotonic() - start:.0f} s:\n{text[-3000:]}"
    assert "samples failed to load" in text
