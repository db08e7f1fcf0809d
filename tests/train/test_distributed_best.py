"""`train.load_best_model_at_end` under ZeRO-3 on two CPU ranks (gloo, torchrun): a components checkpoint (LLM
frozen, connector trained) and a LoRA one. The weights the run ends with, on both ranks, and those it saves into
output_dir are the best checkpoint's saved weights, not the last step's.

One launch runs both trainings (tests/train/dist_worker.py): about a minute on 2 shared cores.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import REPO, free_port, run_env

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("dist_worker.py")
# name -> (stage, the file its checkpoints hold the trained weights in)
STAGES = {"components": ({"llm": "frozen"}, "components.safetensors"),
          "lora": ({"llm": "lora", "lora": {"r": 4}}, "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def runs(toy_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zero3-best")
    # Evaluate and save every step; greater_is_better on a falling validation loss makes step 1 the best, so
    # restoring it is visible against the last step's weights.
    train = {"max_steps": 3, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
             "save_strategy": "steps", "save_steps": 1, "eval_steps": 1, "load_best_model_at_end": True,
             "greater_is_better": True, "deepspeed": str(REPO / "configs" / "deepspeed" / "zero3.json")}
    specs = [{"out": str(root / name), "data": str(toy_data), "model": "medm", "stage": stage,
              "data_args": {"val_size": 4}, "train": train} for name, (stage, _) in STAGES.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), json.dumps({"runs": specs})]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root


def _saved_name(param: str) -> str:
    """The key a parameter of the live model is saved under: PEFT drops its adapter name (`default`) and saves a
    trained copy of a whole module (`modules_to_save`, the connector) under the module's own name."""
    return param.replace("modules_to_save.default.", "").replace(".default.", ".")


@pytest.mark.parametrize("name", list(STAGES))
def test_zero3_ends_with_the_best_checkpoints_weights(runs, name):
    out, filename = runs / name, STAGES[name][1]
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["zero_stage"] for r in ranks] == [3, 3]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3]
    best = max(evals, key=lambda r: r["eval_loss"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert best["step"] == 1 and state["best_model_checkpoint"] == str(out / "checkpoint-1")

    saved = load_file(out / "checkpoint-1" / filename)
    last = load_file(out / "checkpoint-3" / filename)
    assert any(not torch.equal(saved[k], last[k]) for k in saved)  # training moved them after the best step
    for rank in ranks:
        # The parameters each rank holds at the end (gathered from the ZeRO-3 partitions), by their saved names.
        end = {_saved_name(k): v for k, v in rank["end"].items()}
        for key, value in saved.items():
            assert torch.equal(end[key], value), f"{key} is not the best checkpoint's"
    # What the run saves into output_dir is the best checkpoint too.
    final = load_file(out / filename)
    assert final.keys() == saved.keys() and all(torch.equal(final[k], v) for k, v in saved.items())
