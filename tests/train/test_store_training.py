"""The record store in training: ranks started together build it once and share it; a tiny run trains from it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import REPO, free_port, make_cfg, run_env

from medm.data.store import SampleStore
from medm.train.trainer import run_training

WORKER = Path(__file__).with_name("store_worker.py")


@pytest.mark.slow
def test_two_ranks_open_one_store_built_once(tmp_path, toy_data, record_cache):
    out = tmp_path / "ranks"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), str(toy_data), str(out)]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["built"] for r in ranks) == [False, True]  # exactly one rank tokenized
    assert ranks[0]["path"] == ranks[1]["path"] and Path(ranks[0]["path"]).parent == record_cache
    assert ranks[0]["ids"] == ranks[1]["ids"] and len(ranks[0]["ids"]) == 16
    assert [p.name for p in record_cache.iterdir() if not p.name.endswith(".lock")] == [Path(ranks[0]["path"]).name]


def test_training_runs_on_the_store(tmp_path, toy_data, record_cache):
    cfg = make_cfg(tmp_path / "run", toy_data, max_steps=2, per_device_train_batch_size=4,
                   data_args={"val_size": 0.25}, eval_strategy="steps", eval_steps=2)
    trainer = run_training(cfg)
    assert trainer.state.global_step == 2
    assert isinstance(trainer.train_dataset.samples, SampleStore) and len(trainer.train_dataset) == 12
    assert isinstance(trainer.eval_dataset.samples, SampleStore) and len(trainer.eval_dataset) == 4
    # Training and validation read one store: built once, for both sides of the split.
    assert len([p for p in record_cache.iterdir() if p.is_dir()]) == 1
    assert any("eval_loss" in h for h in trainer.state.log_history)
