"""python benchmarks/bench_medmnist.py [--quick] [--minutes 15] [--threads N]

Train a small medm model from scratch on PneumoniaMNIST (../shared/data/medmnist/pneumoniamnist.npz, converted by
medm's `medmnist` builder into VQA records: "What does this chest X-ray show? Options: normal; pneumonia. ...")
within a fixed time budget (`--minutes`, default 15, on the CPU), through `medm.train.run_training` like any run;
then score the 624 test images next to the MedMNIST v2 paper's ResNet-18 (28 px): ACC 0.854, AUC 0.944.

The model (random init): a timm ResNet-18 on 28 px grey images (its third stage: 4 image tokens of 256
channels; `--encoder vit` for a 28 px CLIP-style ViT), an MLP connector and a 2-layer Qwen2 with the tiny
tokenizer; everything trains. The recipe: class-balanced epochs through a data mixture (one file per class at
ratio 0.5, since the train split is 74% pneumonia; `--no-balance`), random shifts (2 px) and rotations (10 degrees)
of the training images (`--no-augment`), AdamW 2e-3 with cosine decay. The step count is set from a short timed
calibration so the schedule ends with the budget; a callback stops training if the budget runs out first.

The answer is read from the model's next-token logits at the answer position: p(pneumonia) = softmax over the first
token of "pneumonia" vs "normal"; ACC thresholds it at 0.5, AUC ranks it. The test split's shift (62.5%
pneumonia, and normals that look unlike the train split's) mostly costs specificity; sensitivity, specificity and
the accuracy at the best threshold are reported next to ACC.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import Bench, Skip, data_dir
from transformers import TrainerCallback

RESNET18 = {"acc": 0.854, "auc": 0.944}


def model_config(quick: bool, encoder: str = "resnet18") -> dict[str, Any]:
    from medm.models.tiny import tiny_model_config

    cfg = tiny_model_config()
    if encoder == "vit":
        cfg["vision"].update(config={"hidden_size": 64 if quick else 128, "intermediate_size": 128 if quick else 256,
                                     "num_hidden_layers": 1 if quick else 4, "num_attention_heads": 2 if quick else 4,
                                     "image_size": 28, "patch_size": 4, "num_channels": 1},
                             image_mean=[0.5], image_std=[0.5], select_layer=-1)
    else:
        # The baseline's architecture as the encoder: a timm ResNet on 28 px grey images. Its third stage (2x2 at
        # 28 px, 256 channels) gives 4 image tokens; the last stage would be 1x1.
        cfg["vision"] = {"name": "timm", "model_name": encoder, "model_args": {"in_chans": 1}, "image_size": 28,
                         "select_layer": -2, "image_mean": [0.5], "image_std": [0.5]}
    cfg["llm"]["config"] = {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 256,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                            "max_position_embeddings": 512, "tie_word_embeddings": True}
    cfg["system_prompt"] = "Answer briefly."
    return cfg


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(values):  # average ranks over ties
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@torch.no_grad()
def score(model, tokenizer, dataset, collator, batch_size: int = 128) -> dict[str, float]:
    """p(pneumonia) per test sample from the logits at the answer position; ACC at 0.5 and AUC."""
    pos_id = tokenizer("pneumonia", add_special_tokens=False)["input_ids"][0]
    neg_id = tokenizer("normal", add_special_tokens=False)["input_ids"][0]
    if pos_id == neg_id:
        raise RuntimeError("'pneumonia' and 'normal' start with the same token; the two-option score needs them apart")
    model.eval()
    probs, labels = [], []
    for start in range(0, len(dataset), batch_size):
        idx = range(start, min(start + batch_size, len(dataset)))
        batch = collator([dataset[i] for i in idx])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits
        at = (batch["labels"] != -100).float().argmax(1) - 1  # the position that predicts the answer
        pair = logits[torch.arange(len(at)), at][:, [neg_id, pos_id]].float()
        probs += torch.softmax(pair, -1)[:, 1].tolist()
        labels += [int(dataset.record(i).extra["label"]) for i in idx]  # 1: pneumonia (the builder's label)
    p, y = np.array(probs), np.array(labels)
    pred = p > 0.5
    return {"acc": round(float((pred == y).mean()), 4), "auc": round(auc(p, y), 4), "n": len(y),
            "positive_share": round(float(y.mean()), 4), "predicted_positive_share": round(float(pred.mean()), 4),
            "sensitivity": round(float(pred[y == 1].mean()), 4) if (y == 1).any() else None,
            "specificity": round(float(1 - pred[y == 0].mean()), 4) if (y == 0).any() else None,
            "best_threshold_acc": round(max(float(((p > t) == y).mean()) for t in np.unique(p)), 4)}


class Augmented(torch.utils.data.Dataset):
    """Training augmentation the 2D pipeline does not have yet: each image shifted by up to `shift` pixels (zero
    padding, a random crop back to size) and rotated by up to `degrees`. Other item keys pass through."""

    def __init__(self, dataset, shift: int = 2, degrees: float = 10.0):
        # Draws come from torch's global generator: the Trainer seeds it (and each DataLoader worker's).
        self.dataset, self.shift, self.degrees = dataset, shift, degrees

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        px = item.get("pixel_values")
        if px is not None:
            item["pixel_values"] = torch.stack([self._augment(x) for x in px])
        return item

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape
        angle = (torch.rand(()).item() * 2 - 1) * self.degrees * np.pi / 180
        dx, dy = (torch.randint(-self.shift, self.shift + 1, (2,)) * 2 / w).tolist()
        theta = torch.tensor([[np.cos(angle), -np.sin(angle), dx], [np.sin(angle), np.cos(angle), dy]],
                             dtype=x.dtype)
        grid = torch.nn.functional.affine_grid(theta[None], (1, c, h, w), align_corners=False)
        # Pad with the image's own background (its minimum), not with zero after normalisation.
        return torch.nn.functional.grid_sample(x[None] - x.min(), grid, align_corners=False)[0] + x.min()


class TimeBudget(TrainerCallback):
    """Stops training when the budget (seconds since training began) is spent."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.stopped_early = seconds, None, False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True
            self.stopped_early = True


class MedMnistBench(Bench):
    name = "medmnist"

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--minutes", type=float, default=15.0, help="training time budget")
        parser.add_argument("--batch-size", type=int, default=64)
        parser.add_argument("--lr", type=float, default=2e-3)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--no-balance", action="store_true", help="train on the split as is (74%% pneumonia) "
                                                                      "instead of class-balanced epochs")
        parser.add_argument("--no-augment", action="store_true", help="no random shifts / rotations")
        parser.add_argument("--encoder", default="resnet18", help="vit (a 28 px CLIP-style ViT, patch 4) or a timm "
                                                                  "CNN name (resnet18)")

    def run(self, args: argparse.Namespace) -> dict[str, Any]:
        from medm.data.collator import DataCollator
        from medm.data.dataset import DataArgs, build_dataset
        from medm.models import build_model
        from medm.registry import BUILDER
        from medm.train.args import parse_train_config
        from medm.train.trainer import build_training_inputs, run_training

        shared = data_dir(args.data_dir)
        npz = shared / "medmnist" / "pneumoniamnist.npz" if shared is not None else None
        if npz is None or not npz.is_file():
            raise Skip("../shared/data/medmnist/pneumoniamnist.npz not found (set MEDM_DATA_DIR or --data-dir)")
        budget = 2.0 if args.quick else args.minutes * 60
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name)
        paths = BUILDER.build("medmnist", out=str(root / "data"), src=str(npz), flag="pneumoniamnist",
                              splits="train,test", limit=32 if args.quick else None)
        model_cfg = model_config(args.quick, args.encoder)
        train = {"output_dir": str(root / "run"), "per_device_train_batch_size": args.batch_size,
                 "learning_rate": args.lr, "weight_decay": 0.05, "adam_beta2": 0.98, "lr_scheduler_type": "cosine",
                 "warmup_steps": 0.05, "logging_steps": 50, "save_strategy": "no", "report_to": [],
                 "disable_tqdm": True, "plot_loss": False, "seed": args.seed, "device": args.device,
                 "bf16": args.device == "cuda"}
        data = {"path": paths["train"], "image_dir": paths["image_dir"], "max_length": 256}
        train_data = data
        records = json.loads(Path(paths["train"]).read_text())
        balance = not args.no_balance and len({r["label"] for r in records}) == 2  # quick subsets may hold one class
        if balance:
            # Class-balanced epochs through a data mixture: one file per class, half the samples each (the train
            # split is 74% pneumonia; the smaller class is repeated, the larger subsampled afresh each epoch).
            files = []
            for label in (0, 1):
                path = root / "data" / f"train_class{label}.json"
                path.write_text(json.dumps([r for r in records if r["label"] == label]))
                files.append({"path": str(path), "ratio": 0.5})
            train_data = {**data, "path": files, "mixture": {"seed": args.seed}}
        stage = {"vision": "full", "connector": "full", "llm": "full"}

        # Calibration: time a few steps of the same model and batch to size the schedule to the budget.
        torch.manual_seed(args.seed)
        model, tok = build_model(model_cfg)
        model.to(args.device)
        ds = build_dataset(DataArgs(**data), model, tok)
        collate = DataCollator(tok)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        t = None
        for k in range(3 if args.quick else 6):
            if k == 2:
                t = time.perf_counter()  # two warm-up steps
            idx = np.random.default_rng(k).choice(len(ds), args.batch_size)
            batch = {key: v.to(args.device) for key, v in collate([ds[int(i)] for i in idx]).items()}
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        step_s = (time.perf_counter() - t) / (k - 1)
        max_steps = max(10, int(budget / step_s * 0.95))
        calib_model = model
        del model, opt

        stop = TimeBudget(budget)
        cfg = parse_train_config({"model": model_cfg, "data": train_data, "stage": stage,
                                  "train": {**train, "max_steps": max_steps}})
        # The training data as `medm train` builds it (mixture sampler included), with augmentation on top.
        train_ds, train_collate, sampler = build_training_inputs(cfg, calib_model, tok)
        if not args.no_augment:
            train_ds = Augmented(train_ds)
        del calib_model
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer's log lines; stdout is the one JSON line
            trainer = run_training(cfg, dataset=train_ds, collator=train_collate, sampler=sampler,
                                   callbacks=[stop])
        train_s = time.perf_counter() - t0
        model = trainer.model
        test = build_dataset(DataArgs(**{**data, "path": paths["test"]}), model, trainer.processing_class)
        result = score(model, trainer.processing_class, test, DataCollator(trainer.processing_class))
        tmp.cleanup()
        epochs = trainer.state.global_step * args.batch_size / len(ds)
        return {"budget_s": budget, "train_s": round(train_s, 1), "steps": trainer.state.global_step,
                "planned_steps": max_steps, "epochs": round(epochs, 2), "stopped_by_budget": stop.stopped_early,
                "params": sum(p.numel() for p in model.parameters()), "balanced": balance,
                "augmented": not args.no_augment, "encoder": args.encoder, "test": result, "resnet18_28px": RESNET18,
                "goal_met": result["acc"] >= RESNET18["acc"] and result["auc"] >= RESNET18["auc"]}


if __name__ == "__main__":
    sys.exit(MedMnistBench().main())
