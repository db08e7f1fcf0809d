"""python benchmarks/bench_step.py [--quick] [--device cuda] [--size base] [--batch-size 8] [--batches 12]

One training step (forward + backward + AdamW; vision encoder frozen, connector and LLM trained) of:

- `medm`: MedMForConditionalGeneration (image tokens expanded at data time, one `masked_scatter`);
- `hf_llava`: transformers' LlavaForConditionalGeneration of identical size and weights (medm.interop.to_llava),
  on the very same batches;
- `splice`: the LLaVA-style baseline written here: one `<image>` id per image in the ids, and a per-sample Python
  loop that cuts the embeddings at each placeholder and splices the image features in (LLaVA's
  `prepare_inputs_labels_for_multimodal`), then pads.

Figures: median step seconds on the same random batches, timed interleaved (the order rotating per batch), and
the ratios medm / hf_llava (goal <= 1.05) and medm / splice; then real (non-pad) training tokens per second over
one epoch's batches (`--batches` spread evenly through it) for HF LLaVA fed random batches vs medm fed
length-grouped batches and packed rows (goal: >= 1.5x). Records: VQA-RAD train (short answers) and a mixed set
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
    length_dataset,
    model_config,
    report_records,
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


def spread(batches: list, n: int) -> list:
    """`n` batches evenly spread through the epoch's list (the grouped order puts its longest batch first)."""
    if len(batches) <= n:
        return batches
    return [batches[int(i)] for i in np.linspace(0, len(batches) - 1, n)]


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class StepBench(Bench):
    name = "step"

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--size", choices=["tiny", "small", "base"], help="model size (small on the CPU, "
                                                                               "base on a GPU)")
        parser.add_argument("--batch-size", type=int, default=8)
        parser.add_argument("--batches", type=int, default=12, help="batches timed per strategy")
        parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bf16 on a GPU, fp32 on the CPU")
        parser.add_argument("--attn", default="sdpa", help="sdpa, eager, flash_attention_2 (GPU)")
        parser.add_argument("--max-length", type=int, default=1024)

    def run(self, args: argparse.Namespace) -> dict[str, Any]:
        from medm.data.collator import DataCollator
        from medm.data.packing import PackedDataset, PackingCollator
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
        B = args.batch_size

        def step(name, m, batch):
            def run():
                out = m(**batch) if name != "splice" else splice_forward(
                    model, batch["raw_ids"], batch["raw_labels"], batch.get("pixel_values"), image_id,
                    tok.pad_token_id)
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

        out: dict[str, Any] = {"size": size, "dtype": str(dtype).removeprefix("torch."), "attn": args.attn,
                               "batch_size": B, "image_tokens": n_img,
                               "params": sum(p.numel() for p in model.parameters()),
                               "records": "VQA-RAD train" if shared is not None else "synthetic"}
        sets = [("mixed", short + long)] if args.quick else [("vqa_rad", short), ("mixed", short + long)]
        for set_name, records in sets:
            ds = length_dataset(records, tok, n_img, args.max_length)
            lengths = ds.lengths
            order = np.random.default_rng(0).permutation(len(ds)).tolist()
            random_batches = spread([order[i:i + B] for i in range(0, len(order) - B + 1, B)], n_batches)
            grouped = grouped_order(lengths, B, modalities=ds.modalities, seed=0)
            grouped_batches = spread([grouped[i:i + B] for i in range(0, len(grouped) - B + 1, B)], n_batches)
            packed = PackedDataset(ds, args.max_length)
            p_order = grouped_order(packed.lengths, B, seed=0)
            pack_batches = spread([p_order[i:i + B] for i in range(0, len(p_order) - B + 1, B)], n_batches)
            if not pack_batches:  # fewer packs than one batch (quick runs)
                pack_batches = [p_order]

            def one_batch(name, m, idx, kind="plain", warmup=0):
                """Seconds of one step on batch `idx`, and its real (non-pad) tokens."""
                if kind == "packed":
                    its = [packed.packs[j] for j in idx]
                    flat = [k for p in its for k in p]
                    by = {k: it for k, it in zip(flat, items(ds, flat, image_shape, gen))}
                    from medm.data.packing import pack_items

                    batch = prep(pack_collate([pack_items([by[k] for k in p]) for p in its]))
                    real = sum(lengths[k] for k in flat)
                else:
                    its = items(ds, idx, image_shape, gen)
                    real = sum(it["length"] for it in its)
                    batch = splice_batch(its) if name == "splice" else prep(collate(
                        [{k: it[k] for k in ("input_ids", "labels", "pixel_values")} for it in its]))
                return timed(step(name, m, batch), args.device, repeat=1, warmup=warmup), real

            def timings(name, m, batches, kind="plain"):
                secs, real = [], 0
                for i, idx in enumerate(batches):
                    sec, n = one_batch(name, m, idx, kind, warmup=int(i == 0))
                    secs.append(sec)
                    real += n
                return secs, real

            res: dict[str, Any] = {"samples": len(ds)}
            # Interleaved, order rotating per batch: a model timed first, or while the machine warms up or other
            # work comes and goes, must not lose or win by its place in the run.
            contenders = [("medm", model), ("hf_llava", llava), ("splice", model)]
            same: dict[str, list[float]] = {name: [] for name, _ in contenders}
            llava_real = 0
            for i, idx in enumerate(random_batches):
                for name, m in contenders[i % 3:] + contenders[:i % 3]:
                    sec, n = one_batch(name, m, idx, warmup=int(i == 0))
                    same[name].append(sec)
                    llava_real += n if name == "hf_llava" else 0
            for name, secs in same.items():
                res[f"{name}_step_s"] = round(float(np.median(secs)), 4)
            res["hf_llava_random_tokens_per_s"] = round(llava_real / sum(same["hf_llava"]), 1)
            res["medm_over_hf_llava"] = round(float(np.median(np.array(same["medm"]) / np.array(same["hf_llava"]))),
                                              3)
            res["medm_over_splice"] = round(float(np.median(np.array(same["medm"]) / np.array(same["splice"]))), 3)
            for label, batches, kind in (("grouped", grouped_batches, "plain"), ("packed", pack_batches, "packed")):
                secs, real = timings("medm", model, batches, kind)
                res[f"medm_{label}_tokens_per_s"] = round(real / sum(secs), 1)
                res[f"medm_{label}_over_hf_llava_random"] = round(
                    res[f"medm_{label}_tokens_per_s"] / res["hf_llava_random_tokens_per_s"], 3)
            out[set_name] = res
        out["goal_step_ratio_met"] = all(out[k]["medm_over_hf_llava"] <= 1.05 for k, _ in sets)
        out["goal_tokens_met"] = max(out["mixed"]["medm_grouped_over_hf_llava_random"],
                                     out["mixed"]["medm_packed_over_hf_llava_random"]) >= 1.5
        return out


if __name__ == "__main__":
    import sys

    sys.exit(StepBench().main())
