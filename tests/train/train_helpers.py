"""Helpers for training tests: a bright-vs-dark image set (the answer depends only on the image), configs, env."""

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback

from medm.models.tiny import tiny_model_config
from medm.train.args import parse_train_config

REPO = Path(__file__).resolve().parents[2]
QUESTION = "Is the image bright?"


def write_bright_dark(out: Path, n: int = 16, size: int = 32, seed: int = 0) -> Path:
    """`n` noisy grey images, alternately bright (answer yes) and dark (answer no), as LLaVA records."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        bright = i % 2 == 0
        level = 200 if bright else 50
        img = np.clip(level + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
        name = f"images/{i:03d}.png"
        Image.fromarray(img).save(out / name)
        records.append({"id": f"toy{i}", "image": [name],
                        "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                          {"from": "gpt", "value": "yes" if bright else "no"}]})
    path = out / "train.json"
    path.write_text(json.dumps(records))
    return path


def write_mixed(out: Path, n: int = 16, volumes: bool = False, size: int = 32, seed: int = 0) -> Path:
    """Mixed-modality LLaVA records in train.json: the bright/dark images with text-only questions between them,
    and with `volumes` also 16x32x32 `.npy` volumes (`image3d`): records cycle image, text(, volume)."""
    write_bright_dark(out, n=n, size=size, seed=seed)
    images = json.loads((out / "train.json").read_text())
    rng = np.random.default_rng(seed + 1)
    kinds = ("image", "text", "image3d") if volumes else ("image", "text")
    records = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        yes = i % 4 < 2
        if kind == "image":
            records.append(images[i])
        elif kind == "text":
            answer = "yes" if i % 2 == 0 else "no"
            records.append({"id": f"text{i}", "conversations": [
                {"from": "human", "value": f"Is {i} an even number?"}, {"from": "gpt", "value": answer}]})
        else:
            (out / "volumes").mkdir(exist_ok=True)
            vol = np.clip((200 if yes else 50) + rng.normal(0, 20, (16, 32, 32)), 0, 255).astype(np.uint8)
            np.save(out / "volumes" / f"{i:03d}.npy", vol)
            answer = "yes" if yes else "no"
            records.append({"id": f"vol{i}", "image3d": [f"volumes/{i:03d}.npy"], "conversations": [
                {"from": "human", "value": f"<image3d>\n{QUESTION}"}, {"from": "gpt", "value": answer}]})
    path = out / "train.json"
    path.write_text(json.dumps(records))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cfg(out: Path, data: Path, stage: dict | None = None, model: dict | None = None, data_args: dict | None = None,
             **train):
    """A TrainConfig for the tiny model on `data`, quiet and CPU-only; `train` (and `data_args`) keys override the
    defaults."""
    t = {"output_dir": str(out), "max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
         "warmup_steps": 0, "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "no",
         "report_to": [], "disable_tqdm": True, "device": "cpu"}
    t.update(train)
    return parse_train_config({"model": model or tiny_model_config(), "stage": stage or {}, "train": t,
                               "data": {"path": str(data), "image_dir": str(data.parent), "max_length": 256,
                                        **(data_args or {})}})


def run_env(**extra) -> dict:
    """Environment for a subprocess: offline, the repo importable, no inherited launcher variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


@torch.no_grad()
def answer_loss(model, dataset, collator) -> float:
    """Mean loss over the answer tokens of the whole dataset."""
    model.eval()
    batch = collator([dataset[i] for i in range(len(dataset))])
    return float(model(**batch).loss)


class RecordStart(TrainerCallback):
    """Keeps a copy of the weights (of the model the Trainer trains) at the start of training."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
