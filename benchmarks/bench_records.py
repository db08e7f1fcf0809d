"""python benchmarks/bench_records.py [--quick] [--n 100000 1000000] [--baseline-n 100000] [--build-repeats R]

The record store (medm.data.store) at scale, against today's in-memory `ConversationDataset` in the same run.

Writes N synthetic caption / VQA records as JSONL (half image captions, image questions, 3D volumes, text-only
questions and two-turn image conversations; answers of 30-90 words in all; the tiny in-process byte-level BPE tokenizer,
a fast tokenizer, and its ChatML template), then prints per N:

- `build`: store build time from the JSONL (cache miss: records to Arrow, encoded, written) and records/s, with one
  process and with `--num-proc` (default: every core), the two builds interleaved; `per_core` divides by the
  processes; `records_per_cpu_s` divides by the CPU seconds of the build and its workers (the per-core rate on a
  machine shared with other work). Median, min and max over `--build-repeats` rounds (default 3 up to 100,000
  records, 1 above); `--build-procs` picks the process counts.
- `encode_only_per_s`: `ConversationEncoder.encode` alone on 10,000 of the records, per wall second and per CPU
  second of this process (median, min, max of `--repeats`): what the store's workers spend outside Arrow.
- `warm_start_s`: a cache hit: encoder, fingerprint, open, `ConversationDataset` and its `lengths` and
  `modalities` ready (median, min, max of `--repeats`).
- `memory`, measured once per N in a fresh process: resident memory growth (RssAnon from /proc/self/status, and
  PSS from /proc/self/smaps_rollup) of the training process (the store's reader `datasets` imported first, its
  cost printed as `imports`) after opening the dataset (+ lengths and
  modalities), after one epoch's `GroupedSampler` order and 2,000 samples read, and after `--batches` batches
  of 8 through a DataLoader with `--workers` workers; and each worker's RssAnon, PSS and private memory (pages it
  does not share with the training process: what forking cost).
- `baseline`: the same memory figures and the build rate for today's in-memory path at `--baseline-n` records.

Goals (docs/performance.md, "Record store"): memory growth for 1,000,000 records <= 300 MB per rank and flat in N
(100,000 vs 1,000,000 within 2x); build >= 4,000 records/s per core; warm start for 1,000,000 records <= 15 s.
Times depend on the machine's load: the JSON line carries the 1-minute load average before each phase.
`--n 25000000` is for a machine with the disk (~60 GB of JSONL and store) and the hours.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import REPORT_SENTENCES, Bench, interleaved, loadavg, spread_stats

NUM_IMAGE_TOKENS, NUM_IMAGE3D_TOKENS, MAX_LENGTH = 64, 32, 2048
WORDS = " ".join(REPORT_SENTENCES).replace(",", "").replace(".", "").split()
QUESTIONS = ["Is there a lesion?", "Which organ is shown in this image?", "Is this an MRI or a CT?",
             "Describe the findings in detail.", "What abnormality is seen in the left lung?"]


def write_records(path: Path, n: int, seed: int = 0) -> None:
    """`n` JSONL records: by index mod 10, 0-4 image captions, 5 an image question, 6 a 3D volume, 7 a text-only
    question, 8-9 two-turn image conversations; answers 30-90 words (a turn of a two-turn record 15-45)."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS, dtype=object)
    with open(path, "w") as f:
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            counts = rng.integers(30, 91, size=m)
            picks = rng.integers(0, len(words), size=int(counts.sum()))
            cuts = np.concatenate([[0], np.cumsum(counts)])
            qs = rng.integers(0, len(QUESTIONS), size=m)
            lines = []
            for j in range(m):
                i = start + j
                answer = words[picks[cuts[j]:cuts[j + 1]]]
                kind = i % 10
                rec: dict[str, Any] = {"id": f"syn{i}"}
                if kind < 5:
                    rec["image"] = [f"img{i % 50}.png"]
                    turns = [("<image>\nDescribe the image.", answer)]
                elif kind == 5:
                    rec["image"] = [f"img{i % 50}.png"]
                    turns = [("<image>\n" + QUESTIONS[qs[j]], answer)]
                elif kind == 6:
                    rec["image3d"] = [f"vol{i % 20}.nii.gz"]
                    turns = [("<image3d>\nDescribe the CT volume.", answer)]
                elif kind == 7:
                    turns = [(QUESTIONS[qs[j]], answer)]
                else:
                    rec["image"] = [f"img{i % 50}.png"]
                    half = len(answer) // 2
                    turns = [("<image>\n" + QUESTIONS[qs[j]], answer[:half]), ("And the other side?", answer[half:])]
                rec["conversations"] = [t for q, a in turns for t in (
                    {"from": "human", "value": q}, {"from": "gpt", "value": " ".join(a)})]
                lines.append(json.dumps(rec))
            f.write("\n".join(lines) + "\n")


def tokenizer():
    from medm.models.builder import add_media_tokens
    from medm.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer("chatml")
    add_media_tokens(tok)
    return tok


def encoder(tok):
    from medm.data.dataset import ConversationEncoder

    return ConversationEncoder(tok, num_image_tokens=NUM_IMAGE_TOKENS, num_image3d_tokens=NUM_IMAGE3D_TOKENS,
                               max_length=MAX_LENGTH)


def dataset(records, tok, image_dir: str):
    """A ConversationDataset over records or a store; images are one tiny PNG, volumes a stand-in tensor."""
    import torch

    from medm.data.dataset import ConversationDataset

    return ConversationDataset(records, tok, num_image_tokens=NUM_IMAGE_TOKENS, num_image3d_tokens=NUM_IMAGE3D_TOKENS,
                               image_preprocess=lambda image: torch.zeros(3, 16, 16),
                               volume_preprocess=_volume, image_dir=image_dir, max_length=MAX_LENGTH)


def _volume(path, modality=None):
    import torch

    return torch.zeros(1, 8, 8, 8)


# ---- memory, in a fresh process -------------------------------------------------------------------------------
def _proc_memory(pid: int | str = "self") -> dict[str, float]:
    """RssAnon, RssFile (status) and Pss, private pages (smaps_rollup) of a process, in MB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            rollup = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in f if line.endswith("kB\n")}
        out["Pss"] = rollup["Pss"]
        out["Private"] = rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)
    except (OSError, KeyError):
        pass
    return out


def _growth(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {f"{k}_mb": round(after[k] - before[k], 1) for k in ("RssAnon", "Pss") if k in after and k in before}


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """The training process's and its DataLoader workers' memory over one store or in-memory dataset."""
    import gc

    import torch

    from medm.data.annotations import load_records
    from medm.data.collator import DataCollator
    from medm.data.sampler import GroupedSampler
    from medm.data.store import open_store

    torch.set_num_threads(1)
    tok = tokenizer()
    collate = DataCollator(tok)
    gc.collect()
    bare = _proc_memory()
    if spec["mode"] == "store":
        import datasets  # noqa: F401  (the store's reader: a fixed cost, printed apart from the growth)
    gc.collect()
    before = _proc_memory()
    t = time.perf_counter()
    if spec["mode"] == "store":
        records = open_store([spec["file"]], encoder(tok), cache_dir=spec["cache_dir"], num_proc=spec["num_proc"])
    else:
        records = load_records(spec["file"], for_training=True)
    ds = dataset(records, tok, spec["image_dir"])
    lengths, modalities = ds.lengths, ds.modalities
    ready_s = time.perf_counter() - t
    gc.collect()
    opened = _proc_memory()
    sampler = GroupedSampler(lengths, 8, modalities=modalities)
    order = np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))  # as the Trainer draws it, kept compact
    for i in order[:2000].tolist():
        s = ds.samples[i]
        _ = s.ids, s.labels, s.record
    gc.collect()
    sampled = _proc_memory()
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=order[:spec["batches"] * 8].tolist(),
                                         num_workers=spec["workers"], collate_fn=collate)
    it = iter(loader)
    workers = []
    for b, batch in enumerate(it):
        assert batch["input_ids"].shape[0] == 8
        if b == spec["batches"] - 2 and spec["workers"]:
            workers = [_proc_memory(w.pid) for w in it._workers]  # the workers, alive, after their batches
    del it, loader
    gc.collect()
    iterated = _proc_memory()
    return {"n": len(ds), "ready_s": round(ready_s, 2), "imports": _growth(before, bare),
            "open": _growth(opened, before), "sampled": _growth(sampled, before), "iterated": _growth(iterated, before),
            "workers": [{k + "_mb": round(v, 1) for k, v in w.items() if k != "RssFile"} for w in workers]}


def run_memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec)], capture_output=True,
                         text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"memory child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- build, encode and warm start in this process -------------------------------------------------------------
def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (the build's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build_once(file: Path, tok, num_proc: int, cache_dir: Path, cpu: list[float]) -> float:
    """Wall seconds of one build from scratch; its CPU seconds are appended to `cpu`."""
    from medm.data.store import open_store

    shutil.rmtree(cache_dir, ignore_errors=True)
    t, c = time.perf_counter(), _cpu_seconds()
    store = open_store([str(file)], encoder(tok), cache_dir=str(cache_dir), num_proc=num_proc)
    seconds = time.perf_counter() - t
    cpu.append(_cpu_seconds() - c)
    assert store.built and len(store) > 0
    return seconds


def encode_only(file: Path, tok, n: int = 10_000, repeats: int = 5) -> dict[str, Any]:
    from medm.data.annotations import parse_record

    with open(file) as f:
        records = [parse_record(json.loads(line), f"{file.name}:{i}", for_training=True)
                   for i, line in zip(range(n), f)]
    enc = encoder(tok)
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for rec in records:
            enc.encode(rec)
        wall.append(len(records) / (time.perf_counter() - t))
        cpu.append(len(records) / (time.process_time() - c))
    return {"records": len(records), "per_wall_s": spread_stats(wall, 0), "per_cpu_s": spread_stats(cpu, 0)}


def warm_start(file: Path, tok, cache_dir: Path, image_dir: str, repeats: int = 5) -> dict[str, Any]:
    from medm.data.store import open_store

    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        store = open_store([str(file)], encoder(tok), cache_dir=str(cache_dir))
        ds = dataset(store, tok, image_dir)
        _ = ds.lengths, ds.modalities
        times.append(time.perf_counter() - t)
        assert not store.built
    return spread_stats(times, 3)


def disk_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


class RecordsBench(Bench):
    name = "records"

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000],
                            help="record counts (25000000 on a machine with ~60 GB of disk)")
        parser.add_argument("--baseline-n", type=int, default=100_000, help="records of the in-memory baseline "
                                                                             "(0: none)")
        parser.add_argument("--num-proc", type=int, help="processes of the many-process build (default: every core)")
        parser.add_argument("--build-repeats", type=int, help="builds per setting (default 3 up to 100,000, else 1)")
        parser.add_argument("--build-procs", type=int, nargs="+", help="process counts of the builds (default: 1 and "
                                                                       "--num-proc)")
        parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the memory figures")
        parser.add_argument("--batches", type=int, default=200, help="batches of 8 the DataLoader delivers")
        parser.add_argument("--cache-dir", help="where the JSONL and stores go (default: a temporary directory)")
        parser.add_argument("--memory-child", help=argparse.SUPPRESS)

    def main(self, argv: list[str] | None = None) -> int:
        argv = sys.argv[1:] if argv is None else argv
        if argv[:1] == ["--memory-child"]:
            print(json.dumps(memory_child(json.loads(argv[1]))))
            return 0
        return super().main(argv)

    def run(self, args: argparse.Namespace) -> dict[str, Any]:
        import logging

        from datasets.utils.logging import disable_progress_bar
        from PIL import Image

        from medm.data._store_build import cpu_count

        disable_progress_bar()
        logging.getLogger("medm").setLevel(logging.ERROR)
        sizes = [300] if args.quick else args.n
        baseline_n = 300 if args.quick else args.baseline_n
        num_proc = args.num_proc or (2 if args.quick else cpu_count())
        work = Path(args.cache_dir or tempfile.mkdtemp(prefix="medm-bench-records-"))
        work.mkdir(parents=True, exist_ok=True)
        image_dir = work / "images"
        image_dir.mkdir(exist_ok=True)
        for i in range(50):  # one tiny PNG under every name the records use
            Image.new("RGB", (16, 16)).save(image_dir / f"img{i}.png")
        tok = tokenizer()
        batches = 3 if args.quick else args.batches
        out: dict[str, Any] = {"num_proc": num_proc, "workers": args.workers, "batches_of_8": batches, "per_n": []}
        try:
            for n in sizes:
                file = work / f"records{n}.jsonl"
                write_records(file, n)
                repeats = args.build_repeats or (1 if args.quick or n > 100_000 else 3)
                row: dict[str, Any] = {"n": n, "jsonl_mb": round(file.stat().st_size / 2**20, 1), "load": {}}
                row["load"]["encode"] = loadavg()
                row["encode_only_per_s"] = encode_only(file, tok, n=min(n, 10_000), repeats=args.repeats)
                row["load"]["build"] = loadavg()
                procs = list(dict.fromkeys(args.build_procs or [1, num_proc]))
                cpu: dict[int, list[float]] = {p: [] for p in procs}
                secs = interleaved({p: functools.partial(build_once, file, tok, p, work / "store", cpu[p])
                                    for p in procs}, repeats, warmup=False)
                row["build"] = {}
                for p in procs:
                    rates = [n / s for s in secs[p]]
                    row["build"][f"{p}_proc"] = {"seconds": spread_stats(secs[p], 2),
                                                 "records_per_s": spread_stats(rates, 0),
                                                 "per_core": round(statistics.median(rates) / p),
                                                 "records_per_cpu_s": spread_stats([n / c for c in cpu[p]], 0)}
                row["store_mb"] = disk_mb(work / "store")  # the last build's (its shards: one per process)
                row["load"]["warm"] = loadavg()
                row["warm_start_s"] = warm_start(file, tok, work / "store", str(image_dir), args.repeats)
                row["load"]["memory"] = loadavg()
                row["memory"] = run_memory_child({"mode": "store", "file": str(file), "cache_dir": str(work / "store"),
                                                  "num_proc": 1, "image_dir": str(image_dir),
                                                  "workers": args.workers, "batches": batches})
                out["per_n"].append(row)
                print(f"bench_records: {json.dumps(row)}", file=sys.stderr, flush=True)
                file.unlink()
            if not baseline_n:
                return out
            file = work / f"baseline{baseline_n}.jsonl"
            write_records(file, baseline_n)
            base = {"n": baseline_n, "load": loadavg()}
            base["memory"] = run_memory_child({"mode": "memory", "file": str(file), "cache_dir": "", "num_proc": 1,
                                               "image_dir": str(image_dir), "workers": args.workers,
                                               "batches": batches})
            base["build_records_per_s"] = round(baseline_n / base["memory"]["ready_s"])
            out["baseline_in_memory"] = base
        finally:
            if not args.cache_dir:
                shutil.rmtree(work, ignore_errors=True)
        return out


if __name__ == "__main__":
    sys.exit(RecordsBench().main())
