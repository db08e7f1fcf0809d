"""`medm infer`: answer every question of a data file with a trained model, one JSON line per question.

    medm infer --model runs/finetune --data data/vqa_rad/test.json --image-dir data/vqa_rad/images --out preds.jsonl
    medm infer --model runs/finetune --layout vqa-rad --data vqa_rad/split/testset.json --image-dir vqa_rad/images \
        --out preds_blank.jsonl --blank-images
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from medm.data.annotations import load_records
from medm.registry import TASK


def _records(args: argparse.Namespace):
    if args.layout == "records":
        return load_records(args.data)

    readers = [n for n in TASK.names() if TASK.get(n).source_layout is not None]
    if args.layout not in readers:
        raise ValueError(f"unknown --layout {args.layout!r}; known: records, {', '.join(readers)}")
    return TASK.build(args.layout).load_source(args.data)


def _same_file(a: str, b: str) -> bool:
    """One file under two names: the same resolved path (links, `./`), or the same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def open_predictor(args: argparse.Namespace, image_dir: str | None = None):
    """`--model` (over `--base` when given) as a `Predictor` on `--device` with `--dtype`, `--template`,
    `--system-prompt` and `--trust-remote-code`: how `medm infer`, `medm chat` and `medm serve` open a model."""
    import torch  # defers torch

    from medm.infer.generate import predictor_for  # defers torch, transformers
    from medm.models.checkpoint import load_trained  # defers torch, transformers

    device = args.device
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processing = load_trained(args.model, dtype=args.dtype, device=device, base=args.base,
                                     trust_remote_code=getattr(args, "trust_remote_code", False))
    return predictor_for(model, processing, template=args.template, system_prompt=args.system_prompt,
                         image_dir=image_dir)


def _cmd_infer(args: argparse.Namespace) -> int:
    from medm.infer.generate import GenerationSettings  # defers torch, transformers
    from medm.infer.predictions import run_inference  # defers torch, transformers

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    if _same_file(args.out, args.data):
        # Opening --out for writing (or --resume's repair of its last line) would destroy the questions.
        print(f"error: --out {args.out} is the --data file {args.data}; write the predictions to another file",
              file=sys.stderr)
        return 2
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, num_beams=args.num_beams)
    try:
        records = _records(args)
        if args.limit is not None:
            records = records[:args.limit]
        # With --base the model is opened here; else run_inference opens it once the records need answers.
        model = open_predictor(args, args.image_dir) if args.base else args.model
        result = run_inference(model, records, args.out, data=args.data, image_dir=args.image_dir,
                               batch_size=args.batch_size, settings=settings, resume=args.resume,
                               overwrite=args.overwrite, blank_images=args.blank_images, device=args.device,
                               dtype=args.dtype, template=args.template, system_prompt=args.system_prompt,
                               progress=not args.no_progress, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    kept = f" ({result.skipped} kept from the earlier run)" if result.skipped else ""
    errors = f", {result.errors} of them error lines (unreadable media)" if result.errors else ""
    print(f"wrote {result.written} prediction(s) to {result.out}{errors}; it holds {result.total}{kept}")
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "infer", help="answer a data file's questions with a model: one JSON line per question",
        description="Batched generation (left padding, KV cache), greedy unless --temperature > 0. Each line of "
                    "--out holds id, question, prediction, answer (when the record has one) and the record's other "
                    "fields; lines are written as each batch finishes, and --resume finishes a killed run.")
    p.add_argument("--model", required=True, help="checkpoint directory (a training run's output_dir, a "
                                                  "checkpoint-N, or an exported model)")
    p.add_argument("--base", default=None, help="the full checkpoint a LoRA / connector-only --model builds on, "
                                                "when it is no longer where its medm_checkpoint.json says")
    p.add_argument("--data", required=True, help="questions: medm / LLaVA / ShareGPT records (JSON or JSONL), or a "
                                                 "benchmark's published file with --layout")
    p.add_argument("--out", required=True, help="predictions JSONL file to write")
    p.add_argument("--layout", default="records", help="how --data is laid out: records (default), or a task name "
                                                       "with a published layout: vqa-rad, slake, pathvqa")
    p.add_argument("--image-dir", default=None, help="directory relative image paths start from")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1: no beam search)")
    p.add_argument("--resume", action="store_true", help="keep the lines --out already holds and answer only the "
                                                         "missing ids (a half-written last line is redone)")
    p.add_argument("--overwrite", action="store_true", help="start --out afresh if it exists")
    p.add_argument("--blank-images", action="store_true", help="replace every image by a blank one (image-reliance "
                                                               "check: compare with medm eval --blank)")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N questions")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:1, cpu")
    p.add_argument("--dtype", default=None, help="bfloat16, float16, float32; default: the checkpoint's")
    p.add_argument("--template", default=None, help="registered chat template; default: the model's")
    p.add_argument("--system-prompt", default=None, help="system prompt; default: the model's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python files the checkpoint ships "
                                                                    "(`auto_map`); off by default: only for "
                                                                    "checkpoints you trust")
    p.set_defaults(func=_cmd_infer)
