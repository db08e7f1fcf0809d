"""python benchmarks/bench_zero3_loading.py [--quick] [--hidden 1024] [--layers 12] [--ranks 2]

Peak host memory per rank while `medm train` builds a model whose LLM loads from a pretrained checkpoint, under a
ZeRO-3 DeepSpeed config on the CPU (gloo, torchrun):

- `partitioned`: what `run_training` does: TrainingArguments first (transformers' HfDeepSpeedConfig registered),
  so `from_config` / `from_pretrained` build and load the LLM inside `deepspeed.zero.Init`, each rank keeping its
  slice (medm.train._distributed);
- `whole`: the model built before the DeepSpeed config exists (what medm did before): every rank materialises the
  whole LLM, which ZeRO-3 only partitions later, at `deepspeed.initialize`.

The LLM is a random Qwen2 of about 200M parameters (default: hidden 1024, 12 layers, MLP 4096) written once as
safetensors; the encoder is the tiny CLIP. Figures per rank: `peak_rss_mb` (ru_maxrss after building: every resident
page, the memory-mapped checkpoint included, which the ranks of a machine share in the page cache),
`peak_anon_mb` (the rank's own memory, RssAnon sampled every 5 ms while building), their values before building
(`base_*`), and the parameters the rank holds (`local_params_m`). Each rank reads every weight it holds once after
building (as its first training step would), so memory-mapped weights count as resident.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import REPO, Bench

WORKER = r"""
import json, os, resource, sys, threading, time
import deepspeed.comm.torch as ds_torch
ds_torch.build_shm_op = lambda: None  # a JIT kernel only DeepSpeed inference uses
import torch
from medm.models import build_model
from medm.models.tiny import tiny_model_config
from medm.train.args import TrainArgs
from medm.train._distributed import prepare_zero3_loading
from medm.train.trainer import training_arguments
mode, llm_dir, ds_config, out = sys.argv[1:5]
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def anon_mb():  # this process's own (anonymous) memory; file pages such as mmapped safetensors are shared
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
peak_anon = [anon_mb()]
done = threading.Event()
def sample():
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], anon_mb())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
base = rss_mb()
base_anon = anon_mb()
cfg = tiny_model_config()
cfg["llm"] = {**cfg["llm"], "path": llm_dir, "config": None}
args = None
if mode == "partitioned":
    args = training_arguments(TrainArgs(output_dir=out, deepspeed=ds_config, report_to=[], device="cpu"), "cpu")
    prepare_zero3_loading(args)
model, _ = build_model(cfg)
# Read every weight the rank holds once, as training will: memory-mapped checkpoint pages become resident here.
held = [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in model.parameters()]
checksum = sum(float(t.float().sum()) for t in held)
done.set()
peak_anon[0] = max(peak_anon[0], anon_mb())
local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
rank = int(os.environ.get("RANK", "0"))
json.dump({"rank": rank, "base_rss_mb": round(base), "peak_rss_mb": round(rss_mb()),
           "base_anon_mb": round(base_anon), "peak_anon_mb": round(peak_anon[0]),
           "local_params_m": round(local / 1e6, 1)}, open(f"{out}/{mode}-{rank}.json", "w"))
"""


def _write_llm(path: Path, hidden: int, layers: int, intermediate: int) -> float:
    """A random Qwen2 saved as safetensors (the tiny tokenizer's vocabulary); returns its parameters in millions."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from medm.models import build_model
    from medm.models.tiny import tiny_model_config

    vocab = len(build_model(tiny_model_config())[1])
    config = AutoConfig.for_model("qwen2", hidden_size=hidden, intermediate_size=intermediate,
                                  num_hidden_layers=layers, num_attention_heads=16 if hidden >= 256 else 4,
                                  num_key_value_heads=16 if hidden >= 256 else 2, vocab_size=vocab,
                                  max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters()) / 1e6


class Zero3Loading(Bench):
    name = "zero3_loading"

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--hidden", type=int, default=1024)
        parser.add_argument("--layers", type=int, default=12)
        parser.add_argument("--intermediate", type=int, default=4096)
        parser.add_argument("--ranks", type=int, default=2)

    def run(self, args: argparse.Namespace) -> dict[str, Any]:
        hidden, layers, inter = (64, 2, 128) if args.quick else (args.hidden, args.layers, args.intermediate)
        ranks = 1 if args.quick else args.ranks
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            params = _write_llm(tmp / "llm", hidden, layers, inter)
            results: dict[str, list] = {}
            # --quick only checks the partitioned path runs (one rank, a tiny LLM).
            for mode in ("partitioned",) if args.quick else ("whole", "partitioned"):
                script = tmp / "worker.py"
                script.write_text(WORKER)
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                       "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), mode,
                       str(tmp / "llm"), str(REPO / "configs" / "deepspeed" / "zero3.json"), str(tmp)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp)
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr[-3000:])
                results[mode] = [json.loads((tmp / f"{mode}-{r}.json").read_text()) for r in range(ranks)]
        return {"llm_params_m": round(params, 1), "ranks": ranks, "per_rank": results,
                "peak_rss_mb": {m: max(r["peak_rss_mb"] for r in rs) for m, rs in results.items()},
                "peak_anon_mb": {m: max(r["peak_anon_mb"] for r in rs) for m, rs in results.items()}}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(Zero3Loading().main())
