"""python benchmarks/bench_memory.py [--quick] [--device cpu|cuda]

Peak memory of one training step (forward + backward + AdamW), with and without gradient checkpointing, next to
`medm estimate`'s figure for the same model, stage and batch.

Each setting runs in a fresh process. On the CPU the step's peak is the process's resident high-water mark
(`VmHWM`, reset through /proc/self/clear_refs) minus its resident size before the step, with glibc told to return
every large block on free (`MALLOC_MMAP_THRESHOLD_`), so freed activations do not hide in the heap; on a GPU it is
`torch.cuda.max_memory_allocated` minus the allocated memory before the step. The optimizer states already exist
(a first step ran) and the gradients were freed, so the measured part is what the estimate calls gradients +
activations; `ratio` = estimate / measured (the estimate's goal: within 25%, i.e. 0.75 to 1.25).

Settings: a medm model (tiny CLIP + MLP connector + a small Qwen2) fully fine-tuned, the same with gradient
checkpointing, with the LLM frozen (connector pretraining), with LoRA on the LLM, and the LLM alone with a 16k
vocabulary (where logits dominate, as they do in real models), in fp32 and with bf16 weights.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
from typing import Any

from _common import Bench

LLM = {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
       "tie_word_embeddings": False}
QUICK_LLM = {**LLM, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2}
SETTINGS = [
    {"name": "medm full", "stage": {}, "checkpointing": False},
    {"name": "medm full + gradient checkpointing", "stage": {}, "checkpointing": True},
    {"name": "medm frozen LLM (connector only)", "stage": {"llm": "frozen"}, "checkpointing": False},
    {"name": "medm LoRA r16, dropout 0.05", "stage": {"llm": "lora", "lora": {"r": 16, "dropout": 0.05}},
     "checkpointing": False},
    {"name": "LLM only, vocab 16k", "llm_only": True, "vocab": 16384, "checkpointing": False},
    {"name": "LLM only, vocab 16k, checkpointing", "llm_only": True, "vocab": 16384, "checkpointing": True},
    {"name": "LLM only, vocab 16k, bf16 weights", "llm_only": True, "vocab": 16384, "checkpointing": False,
     "dtype": "bfloat16"},
]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _model_config(llm: dict[str, Any], dtype: str) -> dict[str, Any]:
    from medm.models.tiny import tiny_model_config

    cfg = tiny_model_config()
    cfg["llm"].update(config=dict(llm), dtype=dtype)
    return cfg


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One setting in this (fresh) process: measured step peak and the estimate."""
    import torch

    from medm.estimate import Geometry, activation_bytes, estimate
    from medm.train.args import parse_train_config

    torch.manual_seed(0)
    device, B, T = spec["device"], spec["batch"], spec["seq_len"]
    dtype = getattr(torch, spec.get("dtype", "float32"))
    if spec.get("llm_only"):
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(spec["llm"], vocab_size=spec["vocab"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype)
        n_train = sum(p.numel() * p.element_size() for p in model.parameters())
        geo = Geometry(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                       config.num_attention_heads, config.num_key_value_heads * config.hidden_size //
                       config.num_attention_heads, config.vocab_size)
        acts = activation_bytes(geo, B * T, T, compute_bytes=dtype.itemsize, attn="sdpa",
                                checkpointing=spec["checkpointing"], linears_train=True, samples=B)
        est = {"gradients": n_train, "activations": acts}
        batch = {"input_ids": torch.randint(0, config.vocab_size, (B, T))}
        batch["labels"] = batch["input_ids"].clone()
    else:
        from medm.models import build_model
        from medm.train.stages import apply_plan

        tc = parse_train_config({"model": _model_config(spec["llm"], spec.get("dtype", "float32")),
                                 "stage": spec["stage"], "data": {"max_length": T},
                                 "train": {"output_dir": "unused", "per_device_train_batch_size": B,
                                           "gradient_checkpointing": spec["checkpointing"]}})
        e = estimate(tc)
        est = {"gradients": e.gradients, "activations": e.activations}
        base, tok = build_model(tc.model)
        model = apply_plan(base, tc.stage, torch.float32)
        n_img = base.num_image_tokens
        ids = torch.randint(3, 500, (B, T))
        ids[:, 8:8 + n_img] = base.config.image_token_id
        labels = ids.clone()
        labels[:, :8 + n_img] = -100
        size = base.config.vision["config"]["image_size"]
        batch = {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(B, 3, size, size)}
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    batch = {k: v.to(device) for k, v in batch.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)

    def step():
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # optimizer states now exist; gradients are freed
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - before
    else:
        _trim()
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        step()
        measured = _status("VmHWM") - before
    estimated = est["gradients"] + est["activations"]
    return {"name": spec["name"], "batch": B, "seq_len": T, "checkpointing": spec["checkpointing"],
            "measured_bytes": measured, "estimated_bytes": estimated, "estimated_activations": est["activations"],
            "estimated_gradients": est["gradients"], "ratio": round(estimated / max(measured, 1), 3)}


class MemoryBench(Bench):
    name = "memory"

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--batch", type=int, default=4)
        parser.add_argument("--seq-len", type=int, default=512)
        parser.add_argument("--child", help=argparse.SUPPRESS)

    def run(self, args: argparse.Namespace) -> dict[str, Any]:
        llm = QUICK_LLM if args.quick else LLM
        batch, seq = (2, 128) if args.quick else (args.batch, args.seq_len)
        settings = SETTINGS
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(args.threads or 1))}
        rows = []
        if args.quick:
            # One setting in this process: checks the script, not the figure (a fresh process measures cleanly).
            return {"settings": [child({**SETTINGS[0], "llm": llm, "batch": batch, "seq_len": seq,
                                        "device": args.device})]}
        for s in settings:
            spec = {**s, "llm": llm, "batch": batch, "seq_len": seq, "device": args.device}
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"setting {s['name']!r} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        ratios = [r["ratio"] for r in rows]
        return {"settings": rows, "ratio_min": min(ratios), "ratio_max": max(ratios),
                "within_25pct": all(0.75 <= r <= 1.25 for r in ratios)}


if __name__ == "__main__":
    if "--child" in sys.argv:
        spec = json.loads(sys.argv[sys.argv.index("--child") + 1])
        print(json.dumps(child(spec)))
        sys.exit(0)
    sys.exit(MemoryBench().main())
