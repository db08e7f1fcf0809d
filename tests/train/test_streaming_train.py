"""Training on a stream (`data.streaming: true`): `run_training` runs train.max_steps steps past the end of the data
(the shard starts another pass) and writes its checkpoint, with and without DataLoader workers; two gloo ranks on
image + text-only records each read their own shard (one rank all images, the other none in every step) and finish
with identical weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, free_port, make_cfg, run_env, write_mixed

from medm.data.streaming import StreamingDataset
from medm.train.metrics import read_metrics
from medm.train.trainer import run_training

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("dist_worker.py")


def _jsonl(path: Path) -> Path:
    """The JSON list file `path` as JSONL (read line by line when streamed)."""
    out = path.with_suffix(".jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in json.loads(path.read_text())))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_run_training_streams_max_steps_and_saves(tmp_path, toy_data, workers):
    data = _jsonl(toy_data)  # 16 records: 4 batches of 4 per pass
    cfg = make_cfg(tmp_path / "run", data, max_steps=6, save_strategy="steps", save_steps=6,
                   dataloader_num_workers=workers, eval_steps=6,
                   data_args={"streaming": True, "streaming_shuffle_buffer": 4, "val_path": str(toy_data)})
    trainer = run_training(cfg)
    assert isinstance(trainer.train_dataset, StreamingDataset)
    assert trainer.state.global_step == 6
    metrics = read_metrics(tmp_path / "run")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 6 and all(v == v for v in losses)
    # Validation records are not streamed: evaluated whole, once at step 6.
    assert len(trainer.eval_dataset) == 16 and [m["step"] for m in metrics if "eval_loss" in m] == [6]
    assert (tmp_path / "run" / "checkpoint-6" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_two_gloo_ranks_stream_their_own_shards_and_agree(tmp_path):
    data = _jsonl(write_mixed(tmp_path / "mixed", n=12))  # image, text, image, ...: rank 0 images, rank 1 text
    spec = {"runs": [{"out": str(tmp_path / "run"), "data": str(data), "model": "medm", "stage": {},
                      "train": {"max_steps": 5, "per_device_train_batch_size": 2,
                                "train_sampling_strategy": "auto"},
                      "data_args": {"streaming": True}}]}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), json.dumps(spec)]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(tmp_path / "run" / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # 6 records per rank = 3 batches a pass: 5 steps run into a second pass. Each rank read its own records only.
    assert ranks[0]["media"] == [{"images": 2, "volumes": 0}] * 5
    assert ranks[1]["media"] == [{"images": 0, "volumes": 0}] * 5
    assert len(ranks[0]["losses"]) == len(ranks[1]["losses"]) == 5
    for k in ranks[0]["end"]:
        assert torch.equal(ranks[0]["end"][k], ranks[1]["end"][k]), f"{k} differs between the ranks"


def test_a_resumed_stream_replays_to_its_position(tmp_path, toy_data):
    # 16 records, batch 4 and a shuffle buffer: steps 5-6 run in the stream's second pass (a new shuffle order).
    data = _jsonl(toy_data)
    common = dict(max_steps=6, save_strategy="steps", save_steps=3,
                  data_args={"streaming": True, "streaming_shuffle_buffer": 6, "streaming_seed": 3})
    straight = run_training(make_cfg(tmp_path / "a", data, **common))
    resumed = run_training(make_cfg(tmp_path / "b", data, resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"),
                                    **common))
    assert resumed.state.global_step == 6
    losses = [[h["loss"] for h in run.state.log_history if "loss" in h] for run in (straight, resumed)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
