"""`medm demo --kind qwen-vl`, scripts/train/finetune_qwenvl.sh and DeepSpeed, end to end on the CPU.

The full demo and the DeepSpeed runs take minutes on a shared 2-core machine: MEDM_QWENVL_SLOW=1 runs them.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from qwenvl_helpers import REPO

from medm.cli import main as medm_main
from medm.qwenvl.model import QwenVLMixin
from medm.train.checkpoint import load_trained, read_meta

SLOW = pytest.mark.skipif(os.environ.get("MEDM_QWENVL_SLOW") != "1",
                          reason="minutes on the CPU; MEDM_QWENVL_SLOW=1 runs it")
RESULT_KEYS = {"accuracy", "majority_baseline", "blanked_accuracy", "per_kind", "n_test", "train_seconds",
               "checkpoint", "threads", "threads_choice"}


def test_demo_smoke(tmp_path, monkeypatch):
    """A few steps of the qwen-vl demo write results.json with the 2D demo's keys and a reopenable checkpoint."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this module's one thread
    out = tmp_path / "demo"
    assert medm_main(["demo", "--kind", "qwen-vl", "--out", str(out), "--finetune-steps", "3", "--n-train", "12",
                      "--n-test", "4"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == RESULT_KEYS
    assert results["n_test"] == sum(k["n"] for k in results["per_kind"].values())
    assert 0 <= results["accuracy"] <= 1 and 0 <= results["blanked_accuracy"] <= 1
    model, _ = load_trained(results["checkpoint"])
    assert isinstance(model, QwenVLMixin) and read_meta(results["checkpoint"])["format"] == "full"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == results["n_test"] and {"prediction", "prediction_blank_image"} <= set(rows[0])


@pytest.mark.slow
@SLOW
def test_demo_learns_to_see(tmp_path, monkeypatch):
    """The full demo: the tiny Qwen2.5-VL answers held-out phantoms at least 20 points better than on blank images."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    from medm.demo import run_demo

    results = run_demo(str(tmp_path / "demo"), kind="qwen-vl")
    assert results["accuracy"] >= results["blanked_accuracy"] + 0.20, results
    assert results["accuracy"] > results["majority_baseline"] + 0.20, results


def _env(**extra) -> dict:
    """A subprocess environment: offline, the repo importable, one thread, a free rendezvous port."""
    import socket

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), PYTHON=sys.executable, OMP_NUM_THREADS="1",
               MASTER_PORT=str(port), **extra)
    return env


@pytest.mark.slow
def test_finetune_qwenvl_script_runs_tiny(tmp_path):
    """TINY=1 bash scripts/train/finetune_qwenvl.sh: tiny Qwen2.5-VL, synthetic phantoms, torchrun on the CPU."""
    out = tmp_path / "run"
    proc = subprocess.run(["bash", str(REPO / "scripts/train/finetune_qwenvl.sh")], capture_output=True, text=True,
                          env=_env(TINY="1", OUTPUT_DIR=str(out)), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert read_meta(str(out))["format"] == "lora" and (out / "checkpoint-3").is_dir()
    model, processor = load_trained(str(out))
    assert isinstance(model, QwenVLMixin) and model.config.model_type == "qwen2_5_vl"
    assert model.medm_settings["box_format"] == "json_resized"


_DEEPSPEED_RUN = """
import sys
import deepspeed.comm.torch as ds_torch
ds_torch.build_shm_op = lambda: None  # a JIT kernel only DeepSpeed inference uses (~90 s to build on 2 cores)
from medm.data.builders.phantoms import build_phantoms
from medm.train.args import load_train_config
from medm.train.trainer import run_training
repo, zero, out = sys.argv[1:4]
p = build_phantoms(out + "/data", n_train=8, n_test=0, size=32)
run_training(load_train_config(repo + "/configs/train/finetune_qwenvl.yaml", [
    "model=" + repo + "/configs/model/tiny-qwen2.5-vl.yaml", "data.path=" + p["train"],
    "data.image_dir=" + out + "/data",
    "train.output_dir=" + out + "/run", "train.max_steps=3", "train.per_device_train_batch_size=4", "train.bf16=false",
    "train.deepspeed=" + repo + "/configs/deepspeed/zero" + zero + ".json", "train.device=cpu", "train.report_to=[]",
    "train.dataloader_num_workers=0", 'train.save_strategy="no"', "train.disable_tqdm=true"]))
"""


@pytest.mark.slow
@SLOW
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_lora_in_one_cpu_process(zero, tmp_path):
    """The shipped ZeRO configs train a qwen-vl LoRA stage; the adapter saved from ZeRO-3 holds full tensors."""
    proc = subprocess.run([sys.executable, "-c", _DEEPSPEED_RUN, str(REPO), str(zero), str(tmp_path)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert adapter and all(v.numel() > 0 for v in adapter.values())
    model, _ = load_trained(str(tmp_path / "run"))
    assert isinstance(model, QwenVLMixin)
