"""`medm import llava-hf SRC OUT`: a transformers LLaVA checkpoint becomes a medm checkpoint.

    medm import llava-hf /models/llava-interleave-qwen-0.5b-hf runs/imported
    medm train configs/train/finetune_lora.yaml model=runs/imported/model.yaml stage.init_from=runs/imported

(`medm export --to llava-hf` is the other direction; it lives with `medm export` in medm.train.cli.)
"""

from __future__ import annotations

import argparse
import logging
import sys

FORMATS = ("llava-hf",)


def _cmd_import(args: argparse.Namespace) -> int:
    from medm.interop.llava_hf import ImportFormatError, import_llava_hf

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        out = import_llava_hf(args.src, args.out, family=args.family, template=args.template,
                              system_prompt=args.system_prompt, dtype=args.dtype)
    except (ImportFormatError, OSError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    print(f"medm checkpoint written to {out}")
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "import", help="turn another format's checkpoint into a medm checkpoint",
        description="medm import llava-hf SRC OUT: a transformers LlavaForConditionalGeneration directory (CLIP or "
                    "SigLIP tower, two-layer projector, any causal LM) becomes a medm full checkpoint (config, "
                    "weights, tokenizer, README.md) for `stage.init_from`, `medm infer` or `medm export`.")
    p.add_argument("format", choices=FORMATS, help="the source format")
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--family", default=None, help="medm LLM family (LoRA targets); default: the text config's "
                                                  "model_type when medm knows it, else auto")
    p.add_argument("--template", default=None, help="registered medm chat template; default: the checkpoint's own")
    p.add_argument("--system-prompt", default=None, help="default system prompt; default: the one a medm export "
                                                         "recorded, else none")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16; default: as stored")
    p.set_defaults(func=_cmd_import)
