"""python benchmarks/bench_step.py [--quick] [--device cuda] [--size base] [--batch-size 8] [--batches 12]

One training step (forward + backward + AdamW; vision encoder frozen, connector and LLM trained) of:

- `medm`: MedMForConditionalGeneration (image tokens expanded at data time, one `masked_scatter`);
- `hf_llava`: transformers' LlavaForConditionalGeneration of identical size and weights (medm.interop.to_llava),
  on the very same batches;
- `splice`: the LLaVA-style baseline written here: one `<image>` id per image in the ids, and a per-sample Python
  loop that cuts the embeddings at each placeholder and splices the image features in (LLaVA's
  `prepare_inputs_labels_for_multimodal`), then pads.

Figures, each the median with min and max over `--repeats` rounds (default 5), the arms timed interleaved step by
step (medm, HF LLaVA, splice, medm grouped, medm packed, medm, ...; the order rotating per round): step seconds and
the ratios medm / hf_llava (goal <= 1.05) and medm / splice on the same random batches; then real (non-pad)
training tokens per second of HF LLaVA fed those random batches vs medm fed the same samples in length-grouped
batches and in packed rows (goal: >= 1.5x); with `--attn sdpa` the packed rows run twice, with sdpa's
block-diagonal mask (`medm_packed`) and with `sdpa_varlen` (`medm_packed_varlen`: sdpa per sample, no mask, the
CPU's counterpart of flash attention's varlen kernels). Every arm trains on the same `--batches x --batch-size`
samples drawn at random from the set, so the tokens/s ratio is a ratio of seconds.
Records: VQA-RAD train (short answers) and a mixed set
(the same plus long reports), lengths from the tiny chat tokenizer; images are random tensors of the encoder's size
(loading is bench_data.py's figure). Sizes:
`small` (CPU default), `base` (GPU default: CLIP ViT-B/16 224 px + a 0.5B-class Qwen2), `tiny` (--quick).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    Bench,
    data_dir,
    interleaved,
    length_dataset,
    model_config,
    ratio_stats,
    report_records,
    spread_stats,
    synthetic_qa_records,
    timed,
    vqa_rad_records,
)

from medm.data.templates import IGNORE_INDEX, expand_media


# ---- the LLaVA-style per-sample splicing baseline ------------------------------------------------------------------
def splice_forward(model, ids_list: list[torch.Tensor], labels_list: list[torch.Tensor],
                   pixel_values: torch.Tensor | None, image_token_id: int, pad_id: int):
    """LLaVA's original recipe: encode the images, then per sample cut the text embeddings at each `<image>` id,
    splice that image's features in, and right-pad the batch. ids: one placeholder id per image."""
    embed = model.get_input_embeddings()
    feats = model.get_image_features(pixel_values) if pixel_values is not None else None
    rows, row_labels, k = [], [], 0
    for ids, labels in zip(ids_list, labels_list):
        cuts = torch.where(ids == image_token_id)[0].tolist()
        parts, part_labels, start = [], [], 0
        for c in cuts:
            parts.append(embed(ids[start:c]))
            part_labels.append(labels[start:c])
            parts.append(feats[k])
            part_labels.append(torch.full((feats.shape[1],), IGNORE_INDEX, dtype=labels.dtype, device=ids.device))
            k += 1
            start = c + 1
        parts.append(embed(ids[start:]))
        part_labels.append(labels[start:])
        rows.append(torch.cat(parts))
        row_labels.append(torch.cat(part_labels))
    T = max(len(r) for r in rows)
    B, D = len(rows), rows[0].shape[-1]
    inputs = rows[0].new_zeros((B, T, D))
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, device=inputs.device)
    mask = torch.zeros((B, T), dtype=torch.long, device=inputs.device)
    for b, (r, lab) in enumerate(zip(rows, row_labels)):
        inputs[b, :len(r)] = r
        labels[b, :len(r)] = lab
        mask[b, :len(r)] = 1
    return model.llm(inputs_embeds=inputs, attention_mask=mask, labels=labels, use_cache=False)


def hf_llava_twin(model, attn: str):
    """transformers' LlavaForConditionalGeneration with the medm model's geometry and a copy of its weights."""
    from transformers import LlavaForConditionalGeneration

    from medm.interop.llava_hf import llava_config, to_llava_state_dict

    cfg = llava_config(model.config, model.num_image_tokens)
    cfg.text_config._attn_implementation = cfg.vision_config._attn_implementation = attn
    llava = LlavaForConditionalGeneration(cfg)
    state = {k: v.detach().clone() for k, v in to_llava_state_dict(model).items()}
    missing, unexpected = llava.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"LLaVA twin: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        llava.tie_weights()
    return llava


# ---- batches ---------------------------------------------------------------------------------------------------
def items(ds, indices, image_shape, generator):
    """Dataset items without loading images: the exact ids and labels, random pixels of the encoder's shape."""
    out = []
    for i in indices:
        s = ds.samples[i]
        ids, labels, _ = expand_media(s.ids, s.labels, ds.sizes, ds.max_length)
        px = torch.randn((s.n_images, *image_shape), generator=generator) if s.n_images else None
        out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": px,
                    "raw_ids": torch.tensor(list(s.ids)), "raw_labels": torch.tensor(list(s.labels)),
                    "length": len(ids)})
    return out


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class StepBench(Bench):
    name = "step"

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--size", choices=["tiny", "small", "base"], help="model size (small on the CPU, "
                                                                               "base on a GPU)")
        parser.add_argument("--batch-size", type=int, default=8)
        parser.add_argument("--batches", type=int, default=12,
                            help="random batches per arm (the samples: batches x batch size)")
        parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bf16 on a GPU, fp32 on the CPU")
        parser.add_argument("--attn", default="sdpa", help="sdpa, eager, flash_attention_2 (GPU)")
        parser.add_argument("--max-length", type=int, default=1024)

    def run(self, args: argparse.Namespace) -> dict[str, Any]:
        from medm.data.collator import DataCollator
        from medm.data.packing import PackedDataset, PackingCollator, pack_items
        from medm.data.sampler import grouped_order
        from medm.models import build_model

        size = "tiny" if args.quick else args.size or ("base" if args.device == "cuda" else "small")
        dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
        n_batches = 2 if args.quick else args.batches
        torch.manual_seed(0)
        cfg = model_config(size)
        cfg["llm"]["attn_implementation"] = args.attn
        model, tok = build_model(cfg)
        model.to(device=args.device, dtype=dtype)
        n_img, image_id = model.num_image_tokens, model.config.image_token_id
        vcfg = model.config.vision["config"]
        image_shape = (vcfg.get("num_channels", 3), vcfg["image_size"], vcfg["image_size"])
        llava = hf_llava_twin(model, args.attn).to(device=args.device, dtype=dtype)
        for m, frozen in ((model, model.vision), (llava, llava.model.vision_tower)):
            m.train()
            frozen.requires_grad_(False)
        opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                for name, m in (("medm", model), ("hf_llava", llava))}

        shared = None if args.quick else data_dir(args.data_dir)  # quick: synthetic records, one set
        with tempfile.TemporaryDirectory() as tmp:
            short = (vqa_rad_records(shared, Path(tmp) / "v")[0] if shared is not None
                     else synthetic_qa_records(32 if args.quick else 3064))
        long = report_records(sorted({r.image[0] for r in short}), len(short))
        gen = torch.Generator().manual_seed(0)
        collate, pack_collate = DataCollator(tok), PackingCollator(tok, flash_kwargs=args.attn.startswith("flash"))
        varlen = args.attn == "sdpa"  # packed rows also with sdpa_varlen, boundaries from the collator's cu_seq_lens
        varlen_collate = PackingCollator(tok, flash_kwargs=True)
        B = args.batch_size

        def step(name, m, batch):
            def run():
                if name == "medm_varlen":  # the same model and weights, its attention run sample by sample
                    m.llm.config._attn_implementation = "sdpa_varlen"
                try:
                    out = m(**batch) if name != "splice" else splice_forward(
                        model, batch["raw_ids"], batch["raw_labels"], batch.get("pixel_values"), image_id,
                        tok.pad_token_id)
                finally:
                    if name == "medm_varlen":
                        m.llm.config._attn_implementation = args.attn
                out.loss.backward()
                opt = opts["hf_llava" if name == "hf_llava" else "medm"]
                opt.step()
                opt.zero_grad(set_to_none=True)
            return run

        def splice_batch(its):
            px = [it["pixel_values"] for it in its if it["pixel_values"] is not None]
            return {"raw_ids": [it["raw_ids"].to(args.device) for it in its],
                    "raw_labels": [it["raw_labels"].to(args.device) for it in its],
                    "pixel_values": torch.cat(px).to(args.device, dtype) if px else None}

        def prep(batch):
            batch = to_device(batch, args.device)
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
            return batch

        def cut(order):
            return [order[i:i + B] for i in range(0, len(order), B)]

        out: dict[str, Any] = {"size": size, "dtype": str(dtype).removeprefix("torch."), "attn": args.attn,
                               "batch_size": B, "image_tokens": n_img,
                               "params": sum(p.numel() for p in model.parameters()),
                               "records": "VQA-RAD train" if shared is not None else "synthetic"}
        sets = [("mixed", short + long)] if args.quick else [("vqa_rad", short), ("mixed", short + long)]
        for set_name, records in sets:
            # The same samples in every arm: `batches x batch` records drawn at random from the set; HF LLaVA gets
            # them in random batches, medm grouped by length and packed into rows (both planned over these samples
            # only, which leaves grouping fewer neighbours than a whole epoch has: a conservative figure).
            pick = np.random.default_rng(0).permutation(len(records))[:n_batches * B]
            ds = length_dataset([records[i] for i in pick], tok, n_img, args.max_length)
            its = items(ds, range(len(ds)), image_shape, gen)  # one set of ids and pixels, shared by every arm
            random_idx = cut(np.random.default_rng(1).permutation(len(ds)).tolist())
            grouped_idx = cut(grouped_order(ds.lengths, B, modalities=ds.modalities, seed=0))
            packed = PackedDataset(ds, args.max_length)
            pack_idx = cut(grouped_order(packed.lengths, B, seed=0))
            plain = lambda idx: prep(collate([{k: its[i][k] for k in ("input_ids", "labels", "pixel_values")}  # noqa: E731
                                              for i in idx]))
            batches = {
                "medm_random": [plain(idx) for idx in random_idx],
                "hf_llava_random": [plain(idx) for idx in random_idx],
                "splice_random": [splice_batch([its[i] for i in idx]) for idx in random_idx],
                "medm_grouped": [plain(idx) for idx in grouped_idx],
                "medm_packed": [prep(pack_collate([pack_items([its[i] for i in packed.packs[j]]) for j in idx]))
                                for idx in pack_idx],
            }
            if varlen:
                batches["medm_packed_varlen"] = [
                    prep(varlen_collate([pack_items([its[i] for i in packed.packs[j]]) for j in idx]))
                    for idx in pack_idx]
            real = sum(it["length"] for it in its)
            assert sum(len(packed.packs[j]) for idx in pack_idx for j in idx) == len(ds)  # every sample, once
            runner = {"medm_random": ("medm", model), "hf_llava_random": ("hf_llava", llava),
                      "splice_random": ("splice", model), "medm_grouped": ("medm", model),
                      "medm_packed": ("medm", model)}
            if varlen:
                runner["medm_packed_varlen"] = ("medm_varlen", model)

            def arm(key):
                """One unit per batch: the arms alternate step by step (medm, HF LLaVA, splice, medm grouped, ...)."""
                name, m = runner[key]
                return [lambda b=b: timed(step(name, m, b), args.device, repeat=1, warmup=0) for b in batches[key]]

            secs = interleaved({key: arm(key) for key in runner}, args.repeats)  # warm-up: one step of each arm
            res: dict[str, Any] = {"samples": len(ds), "real_tokens": real, "random_batches": len(random_idx),
                                   "grouped_batches": len(grouped_idx), "packed_batches": len(pack_idx),
                                   "packed_rows": len(packed.packs)}
            for key, name in (("medm_random", "medm"), ("hf_llava_random", "hf_llava"), ("splice_random", "splice")):
                res[f"{name}_step_s"] = spread_stats([t / len(random_idx) for t in secs[key]], 4)
            res["medm_over_hf_llava"] = ratio_stats(secs["medm_random"], secs["hf_llava_random"])
            res["medm_over_splice"] = ratio_stats(secs["medm_random"], secs["splice_random"])
            res["hf_llava_random_tokens_per_s"] = spread_stats([real / t for t in secs["hf_llava_random"]], 1)
            for label in ("grouped", "packed") + (("packed_varlen",) if varlen else ()):
                res[f"medm_{label}_tokens_per_s"] = spread_stats([real / t for t in secs[f"medm_{label}"]], 1)
                # Same tokens in both arms: the tokens/s ratio is HF LLaVA's seconds over medm's, round by round.
                res[f"medm_{label}_over_hf_llava_random"] = ratio_stats(secs["hf_llava_random"], secs[f"medm_{label}"])
            out[set_name] = res
        out["goal_step_ratio_met"] = all(out[k]["medm_over_hf_llava"]["median"] <= 1.05 for k, _ in sets)
        out["goal_tokens_met"] = max(v["median"] for k, v in out["mixed"].items()
                                     if k.startswith("medm_") and k.endswith("_over_hf_llava_random")) >= 1.5
        return out


if __name__ == "__main__":
    import sys

    sys.exit(StepBench().main())
