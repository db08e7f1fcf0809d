"""python benchmarks/bench_padding.py [--quick] [--batch-size 8] [--image-tokens 144]

Share of real (non-pad) tokens in the batches of one epoch: random batches vs length-grouped (modality-aware,
medm.data.sampler) vs packed rows (medm.data.packing), on two record sets:

- `vqa_rad`: the VQA-RAD train records (../shared/data/vqa_rad, converted by medm's builder): short questions
  and answers behind one image each;
- `mixed`: the same short-answer records plus as many long-report records (40 to 300 words of report sentences
  on the same images): the case where random batches waste most.

Lengths are exact (`ConversationDataset.lengths`: the tiny chat tokenizer, each image expanded to
`--image-tokens`; no image is loaded). Real share = real tokens / (rows x padded row length), over the epoch.
Each share is the median with min and max over `--repeats` epoch orders (seeds 0, 1, ...; default 5); the goal
is read on the minimum. Goal: >= 0.95 with grouping or packing. Without ../shared/data both sets are synthetic
short-answer questions.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    Bench,
    data_dir,
    length_dataset,
    report_records,
    spread_stats,
    synthetic_qa_records,
    vqa_rad_records,
)


def real_share(lengths: list[int], batches: list[list[int]]) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return real / padded


def shares(dataset, batch_size: int, seeds: range) -> dict[str, Any]:
    """Real-token shares of one epoch's batches, random / grouped / packed, each as median, min and max over the
    epoch orders of `seeds` (counts, not timings: the spread is the order's luck, not the machine's)."""
    from medm.data.packing import PackedDataset
    from medm.data.sampler import grouped_order

    lengths, mods = dataset.lengths, dataset.modalities
    cut = lambda order: [order[i:i + batch_size] for i in range(0, len(order), batch_size)]  # noqa: E731
    packed = PackedDataset(dataset, dataset.max_length)
    pack_lengths = packed.lengths
    runs: dict[str, list[float]] = {"random": [], "grouped": [], "packed": []}
    for seed in seeds:
        runs["random"].append(real_share(lengths, cut(np.random.default_rng(seed).permutation(len(lengths)).tolist())))
        runs["grouped"].append(real_share(lengths, cut(grouped_order(lengths, batch_size, modalities=mods, seed=seed))))
        runs["packed"].append(real_share(pack_lengths, cut(grouped_order(pack_lengths, batch_size, seed=seed))))
    return {"samples": len(lengths), "mean_length": round(float(np.mean(lengths)), 1),
            "max_length": int(max(lengths)), **{k: spread_stats(v, 4) for k, v in runs.items()},
            "packed_rows": len(pack_lengths), "pack_length": packed.capacity}


class PaddingBench(Bench):
    name = "padding"

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--batch-size", type=int, default=8, help="samples (or packed rows) per batch")
        parser.add_argument("--image-tokens", type=int, default=144, help="tokens one image expands to (e.g. 144: "
                                                                          "a 24x24 grid pooled 2x2; LLaVA-1.5: 576)")
        parser.add_argument("--max-length", type=int, default=2048, help="data.max_length, also the pack length")

    def run(self, args: argparse.Namespace) -> dict[str, Any]:
        from medm.models.builder import add_media_tokens
        from medm.models.tiny import tiny_tokenizer

        tok = tiny_tokenizer("chatml")
        add_media_tokens(tok)
        shared = data_dir(args.data_dir)
        with tempfile.TemporaryDirectory() as tmp:
            if shared is not None:
                short, _ = vqa_rad_records(shared, Path(tmp) / "vqa_rad")
                source = "VQA-RAD train (../shared/data)"
            else:
                short = synthetic_qa_records(3064)
                source = "synthetic short-answer questions (../shared/data absent)"
        if args.quick:
            short = short[:200]
        images = sorted({r.image[0] for r in short})
        long = report_records(images, len(short))
        out: dict[str, Any] = {"source": source, "batch_size": args.batch_size, "image_tokens": args.image_tokens,
                               "tokenizer": "medm tiny chatml BPE"}
        for name, records in (("vqa_rad", short), ("mixed", short + long)):
            ds = length_dataset(records, tok, args.image_tokens, args.max_length)
            out[name] = shares(ds, args.batch_size, range(args.repeats))
        best = min(max(out[k]["grouped"]["min"], out[k]["packed"]["min"]) for k in ("vqa_rad", "mixed"))
        out["goal_met"] = best >= 0.95
        return out


if __name__ == "__main__":
    import sys

    sys.exit(PaddingBench().main())
