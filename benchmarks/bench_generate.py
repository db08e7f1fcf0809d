"""python benchmarks/bench_generate.py [--quick] [--device cuda] [--size small] [--new-tokens 64]

Generation speed of a medm model (random weights, so every answer runs to `--new-tokens`): new tokens per
second at batch 1 and batch 8, with the KV cache (what `medm infer` and the playground use) and without it
(every step re-reads the whole prompt, images included). Prompts are a VQA question behind one image, rendered
by the model's chat template, left-padded as `medm.infer` batches them. With and without the cache run
interleaved (`--repeats` rounds, default 5); each figure is the median with min and max, the speedup taken round
by round.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _common import Bench, interleaved, model_config, ratio_stats, spread_stats, timed


class GenerateBench(Bench):
    name = "generate"

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--size", choices=["tiny", "small", "base"], help="small on the CPU, base on a GPU")
        parser.add_argument("--new-tokens", type=int, default=64)
        parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])

    def run(self, args: argparse.Namespace) -> dict[str, Any]:
        from medm.data.annotations import parse_record
        from medm.data.collator import DataCollator
        from medm.data.templates import ChatFormat, expand_media
        from medm.models import build_model

        size = "tiny" if args.quick else args.size or ("base" if args.device == "cuda" else "small")
        new = 8 if args.quick else args.new_tokens
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        torch.manual_seed(0)
        model, tok = build_model(model_config(size))
        model.to(args.device, dtype).eval()
        fmt = ChatFormat(tok, model.config.template, model.config.system_prompt)
        rec = parse_record({"id": "q", "image": ["x.png"], "conversations": [
            {"from": "human", "value": "<image>\nIs there a lesion? Describe the image."}]}, "q")
        ids, _, _ = expand_media(fmt.encode_prompt(rec), None, fmt.media_sizes(model.num_image_tokens))
        vcfg = model.config.vision["config"]
        shape = (vcfg.get("num_channels", 3), vcfg["image_size"], vcfg["image_size"])
        collate = DataCollator(tok, padding_side="left")
        out: dict[str, Any] = {"size": size, "prompt_tokens": len(ids), "new_tokens": new}
        for bs in args.batch_sizes:
            batch = collate([{"input_ids": torch.tensor(ids), "pixel_values": torch.randn(1, *shape)}
                             for _ in range(bs)])
            batch = {k: v.to(args.device) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(dtype)

            def gen(cache):
                def run():
                    with torch.no_grad():
                        res = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                             use_cache=cache, pad_token_id=tok.pad_token_id)
                    assert res.shape[1] - batch["input_ids"].shape[1] == new
                return lambda: timed(run, args.device, repeat=1, warmup=0)

            secs = interleaved({"cache": gen(True), "no_cache": gen(False)}, args.repeats)
            for arm, times in secs.items():
                out[f"batch{bs}_{arm}_tokens_per_s"] = spread_stats([bs * new / t for t in times], 1)
            out[f"batch{bs}_cache_speedup"] = ratio_stats(secs["no_cache"], secs["cache"], 2)
        return out


if __name__ == "__main__":
    import sys

    sys.exit(GenerateBench().main())
