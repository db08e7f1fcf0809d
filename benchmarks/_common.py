"""What every benchmark shares: its command line (`--quick`, `--data-dir`, `--device`), the shared-data lookup, the
machine description that goes with each figure, and the one JSON line it prints.

Each `bench_*.py` defines a `Bench` subclass with `name`, `add_args(parser)` and `run(args) -> dict` and ends with
`if __name__ == "__main__": sys.exit(MyBench().main())`. `make bench` runs every script; none of them is a unit test
(tests/test_benchmarks_smoke.py only checks that each runs with `--quick`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class Skip(Exception):
    """A figure that cannot be measured here (e.g. ../shared/data is absent); the message says why."""


def data_dir(arg: str | None) -> Path | None:
    """`--data-dir`, else $MEDM_DATA_DIR, else ../shared/data beside the repository; None when absent."""
    path = Path(arg or os.environ.get("MEDM_DATA_DIR", REPO.parent / "shared" / "data"))
    return path if path.is_dir() else None


def machine() -> dict[str, Any]:
    """Where a figure was taken: CPU / GPU, threads, and the load average (figures under load are not final)."""
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    import transformers

    info["transformers"] = transformers.__version__
    return info


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def loadavg() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none): a figure taken while other work runs on
    the same cores is read against it."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def spread_stats(values: list[float], digits: int = 3) -> dict[str, Any]:
    """{"median", "min", "max", "n"} of repeated measurements: what every benchmark figure is printed as."""
    v = sorted(values)
    mid = len(v) // 2
    median = v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
    return {"median": round(median, digits), "min": round(v[0], digits), "max": round(v[-1], digits), "n": len(v)}


def ratio_stats(num: list[float], den: list[float], digits: int = 3) -> dict[str, Any]:
    """spread_stats of num[i] / den[i]: each ratio from one round, whose arms ran next to each other."""
    return spread_stats([a / b for a, b in zip(num, den)], digits)


def interleaved(arms: dict[str, Any], repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """Run the arms side by side, `repeats` rounds, so that no arm gains or loses by its place while the machine
    warms up or other work comes and goes.

    An arm is fn() -> seconds, or a list of them (e.g. one training step per batch): within a round the arms' units
    run spread evenly and alternating (A1 B1 C1 A2 B2 C2 ...; an arm of fewer units has them spaced out), with the
    order of the arms rotating every round. Each fn times only its own work (what it prepares before its timer does
    not count).

    Args:
        warmup: run every arm's first unit once, untimed, first.
    Returns:
        name -> its `repeats` round totals in seconds (index i of every list is the same round).
    """
    names = list(arms)
    units = {name: arm if isinstance(arm, list) else [arm] for name, arm in arms.items()}
    if warmup:
        for name in names:
            units[name][0]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        rank = {name: (i - r) % len(names) for i, name in enumerate(names)}
        plan = sorted(((j + 0.5) / len(units[name]), rank[name], name, j) for name in names
                      for j in range(len(units[name])))
        total = dict.fromkeys(names, 0.0)
        for _, _, name, j in plan:
            total[name] += float(units[name][j]())
        for name in names:
            out[name].append(total[name])
    return out


def timed(fn, device: str, repeat: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


class Bench:
    """Base class: parses the common flags, runs, prints one JSON line `{"bench": name, ..., "machine": ...}`."""

    name = "bench"

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> dict[str, Any]:
        raise NotImplementedError

    def main(self, argv: list[str] | None = None) -> int:
        doc = (sys.modules[type(self).__module__].__doc__ or "").strip()
        parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else self.name,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--quick", action="store_true", help="tiny settings that only check the script runs")
        parser.add_argument("--data-dir", help="shared data (default: $MEDM_DATA_DIR or ../shared/data)")
        parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
        parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
        parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds behind every median / min "
                                                                      "/ max (default 5; 2 with --quick)")
        self.add_args(parser)
        args = parser.parse_args(argv)
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        args.device = pick_device(args.device)
        args.repeats = args.repeats or (2 if args.quick else 5)
        load_start = loadavg()
        start = time.perf_counter()
        try:
            figures = self.run(args)
        except Skip as e:
            figures = {"skipped": str(e)}
            print(f"{self.name}: skipped: {e}", file=sys.stderr)
        out = {"bench": self.name, "quick": args.quick, "device": args.device, **figures,
               "seconds": round(time.perf_counter() - start, 1), "repeats": args.repeats,
               "loadavg_start": load_start, "loadavg_end": loadavg(), "machine": machine()}
        print(json.dumps(out))
        return 0


# ---- data and models the benchmarks share -----------------------------------------------------------------------
REPORT_SENTENCES = [
    "The chest radiograph shows clear lungs with no focal consolidation, pleural effusion or pneumothorax.",
    "The cardiomediastinal silhouette is within normal limits.", "Axial CT of the abdomen with contrast.",
    "MRI of the brain shows a hyperintense lesion in the left frontal lobe on T2-weighted images.",
    "There is a small nodule in the right upper lobe.", "No fracture is seen.",
    "Mild cardiomegaly with bilateral interstitial opacity, consistent with edema.",
    "The liver, spleen and kidney are unremarkable.", "There is a large mass with calcification in the left lung.",
]


def vqa_rad_records(shared: Path, out: Path):
    """(train records, image_dir) of VQA-RAD's common split, converted by medm's own builder into `out`."""
    from medm.data.annotations import load_records
    from medm.registry import BUILDER

    paths = BUILDER.build("vqa-rad", out=str(out), src=str(shared / "vqa_rad"), layout="split")
    return load_records(paths["train"], for_training=True), paths["image_dir"]


def report_records(images: list[str], n: int, seed: int = 0):
    """`n` long-report records (40 to 300 words of report sentences) over `images`: the long half of a mixed set."""
    import numpy as np

    from medm.data.annotations import parse_record

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words, text = int(rng.integers(40, 300)), []
        while sum(len(s.split()) for s in text) < words:
            text.append(REPORT_SENTENCES[int(rng.integers(len(REPORT_SENTENCES)))])
        raw = {"id": f"report{i}", "image": [images[i % len(images)]],
               "conversations": [{"from": "human", "value": "<image>\nDescribe the image in a report."},
                                 {"from": "gpt", "value": " ".join(text)}]}
        out.append(parse_record(raw, f"report{i}", for_training=True))
    return out


def synthetic_qa_records(n: int, seed: int = 0):
    """`n` short-answer image questions with made-up image names (lengths only; nothing is loaded)."""
    import numpy as np

    from medm.data.annotations import parse_record

    rng = np.random.default_rng(seed)
    questions = ["Is there a lesion?", "Which organ is shown?", "Is this an MRI or a CT?",
                 "Is the heart enlarged? Look at the cardiac silhouette.", "Where is the lesion?"]
    answers = ["Yes.", "No.", "liver", "CT", "The lesion is in the upper left.", "left frontal lobe"]
    return [parse_record({"id": f"qa{i}", "image": [f"img{i % 7}.png"], "conversations": [
        {"from": "human", "value": "<image>\n" + questions[int(rng.integers(len(questions)))]},
        {"from": "gpt", "value": answers[int(rng.integers(len(answers)))]}]}, f"qa{i}", for_training=True)
        for i in range(n)]


def length_dataset(records, tokenizer, num_image_tokens: int, max_length: int = 2048):
    """A ConversationDataset used for its exact lengths and modalities (its images are never loaded here)."""
    from medm.data.dataset import ConversationDataset

    return ConversationDataset(records, tokenizer, num_image_tokens=num_image_tokens,
                               image_preprocess=lambda image: image, max_length=max_length)


def model_config(size: str) -> dict[str, Any]:
    """medm model configs of the benchmark sizes: `tiny` (quick runs), `small` (CPU figures), `base` (GPU figures:
    CLIP ViT-B/16 at 224 px (196 tokens) + mlp2x_gelu + a 0.5B-class Qwen2)."""
    from medm.models.tiny import tiny_model_config

    cfg = tiny_model_config()
    if size == "tiny":
        return cfg
    if size == "small":
        cfg["vision"]["config"] = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
                                   "num_attention_heads": 4, "image_size": 64, "patch_size": 8, "num_channels": 3}
        cfg["llm"]["config"] = {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 1024,
                                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "max_position_embeddings": 4096, "tie_word_embeddings": True}
        return cfg
    if size == "base":
        cfg["vision"]["config"] = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                   "num_attention_heads": 12, "image_size": 224, "patch_size": 16,
                                   "num_channels": 3}
        cfg["llm"]["config"] = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                                "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                                "max_position_embeddings": 4096, "tie_word_embeddings": True}
        return cfg
    raise ValueError(f"unknown model size {size!r}; known: tiny, small, base")
