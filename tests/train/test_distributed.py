"""Scale-out on the CPU: DeepSpeed ZeRO-2 / ZeRO-3 (shipped configs) in one process, and DDP over gloo with two
torchrun processes whose weights must end identical."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, free_port, run_env

from medm.models import load_model

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("train_worker.py")


def _run(cmd: list[str], spec: dict, timeout: int = 300) -> None:
    proc = subprocess.run(cmd + [json.dumps(spec)], env=run_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_trains_in_one_cpu_process(zero, tmp_path, toy_data):
    config = REPO / "configs" / "deepspeed" / f"zero{zero}.json"
    spec = {"out": str(tmp_path / "run"), "data": str(toy_data), "stage": {},
            "train": {"max_steps": 3, "deepspeed": str(config)}}
    _run([sys.executable, str(WORKER)], spec)
    rank0 = torch.load(tmp_path / "run" / "rank0.pt")
    assert rank0["zero_stage"] == zero and rank0["world_size"] == 1
    assert len(rank0["losses"]) == 3 and all(torch.isfinite(torch.tensor(rank0["losses"])))
    # ZeRO-3 partitions the live weights; the saved checkpoint holds them gathered and must show training.
    saved = load_model(str(tmp_path / "run"))[0].state_dict()
    start = rank0["start"]
    moved = {k for k in saved if k in start and not torch.equal(saved[k], start[k])}
    assert any(k.startswith("connector.") for k in moved) and any(k.startswith("llm.") for k in moved)
    assert not any(k.startswith("vision.") for k in moved)


def test_torchrun_two_cpu_processes_stay_in_sync(tmp_path, toy_data):
    spec = {"out": str(tmp_path / "run"), "data": str(toy_data), "stage": {"llm": "lora", "lora": {"r": 4}},
            "train": {"max_steps": 3, "per_device_train_batch_size": 2}}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER)]
    _run(cmd, spec)
    ranks = [torch.load(tmp_path / "run" / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    end0, end1 = ranks[0]["end"], ranks[1]["end"]
    assert end0.keys() == end1.keys()
    for k in end0:
        assert torch.equal(end0[k], end1[k]), f"{k} differs between the ranks"
    # The ranks saw different batches (so equality comes from gradient sync), and training moved the weights.
    assert not torch.equal(ranks[0]["first_batch_pixels"], ranks[1]["first_batch_pixels"])
    lora_b = [v for k, v in end0.items() if ".lora_B." in k]  # LoRA B starts at zero
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
