"""`medm import llava-hf | medm-vl | tinyllava | llava SRC OUT`: another format's checkpoint becomes a medm checkpoint.

    medm import llava-hf /models/llava-interleave-qwen-0.5b-hf runs/imported
    medm import medm-vl /models/MedM-VL-CT-Chest-3B-en runs/ct-chest --image3d-slices 32
    medm import tinyllava /models/TinyLLaVA-Qwen2-0.5B-CLIP runs/tinyllava
    medm import llava /models/llava-med-v1.5-mistral-7b runs/llava-med --encoder-path /models/clip-vit-large-patch14-336
    medm train configs/train/finetune_lora.yaml model=runs/imported/model.yaml stage.init_from=runs/imported

`medm export --merge | --to llava-hf SRC OUT` is the other direction: a training checkpoint becomes a standalone
medm model or transformers' LLaVA format.

    medm export --merge runs/finetune_lora runs/finetune_lora_merged
    medm export --to llava-hf runs/finetune_lora runs/finetune_llava --eval-metrics runs/eval/metrics.json
"""

from __future__ import annotations

import argparse
import logging
import sys

FORMATS = ("llava-hf", "medm-vl", "tinyllava", "llava")
# Options that only some source formats read.
_SOURCE_OPTIONS = {"llm_path": ("medm-vl", "tinyllava", "llava"), "encoder_path": ("medm-vl", "tinyllava", "llava"),
                   "encoder3d_path": ("medm-vl",), "image3d_slices": ("medm-vl",),
                   "ct_intensity": ("medm-vl",)}


def _run_import(args: argparse.Namespace) -> str:
    common = {"family": args.family, "template": args.template, "system_prompt": args.system_prompt,
              "dtype": args.dtype}
    for option, formats in _SOURCE_OPTIONS.items():
        if getattr(args, option) is not None and args.format not in formats:
            raise ValueError(f"--{option.replace('_', '-')} applies to {' and '.join(formats)}, not {args.format}")
    if args.format == "medm-vl":
        from medm.interop.medm_vl import import_medm_vl  # defers torch

        return import_medm_vl(args.src, args.out, llm_path=args.llm_path, encoder_path=args.encoder_path,
                              encoder3d_path=args.encoder3d_path, image3d_slices=args.image3d_slices,
                              ct_intensity=args.ct_intensity, **common)
    if args.format == "tinyllava":
        from medm.interop.tinyllava import import_tinyllava  # defers torch

        return import_tinyllava(args.src, args.out, llm_path=args.llm_path, encoder_path=args.encoder_path, **common)
    if args.format == "llava":
        from medm.interop.llava import import_llava  # defers torch

        return import_llava(args.src, args.out, llm_path=args.llm_path, encoder_path=args.encoder_path, **common)
    from medm.interop.llava_hf import import_llava_hf  # defers torch

    return import_llava_hf(args.src, args.out, **common)


def _cmd_import(args: argparse.Namespace) -> int:
    from medm.interop.llava_hf import ImportFormatError  # defers torch

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        out = _run_import(args)
    except (ImportFormatError, ValueError, OSError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    print(f"medm checkpoint written to {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("medm").setLevel(logging.INFO)
    if args.to is None and not args.merge:
        print("error: give --merge (a standalone medm model) or --to llava-hf (transformers' LLaVA format)",
              file=sys.stderr)
        return 2
    if args.to == "llava-hf":
        from medm.interop.llava_hf import ExportError, export_llava_hf  # defers torch

        try:
            out = export_llava_hf(args.src, args.out, base=args.base, eval_metrics=args.eval_metrics)
        except (ExportError, OSError, ValueError) as e:  # OSError / ValueError: SRC is not a medm checkpoint
            print(f"error: cannot export {args.src} to llava-hf: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        print(f"transformers LLaVA model written to {out}")
        return 0
    from medm.interop.merge import export_merged  # defers torch, transformers

    out = export_merged(args.src, args.out, base=args.base)
    if args.eval_metrics:
        from medm.interop.model_card import write_model_card  # defers torch, transformers

        write_model_card(out, fmt="full", source=args.src, eval_metrics=args.eval_metrics)
    print(f"merged model written to {out}")
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "import", help="turn another format's checkpoint into a medm checkpoint",
        description="medm import FORMAT SRC OUT: a checkpoint of another codebase becomes a medm full checkpoint "
                    "(config, weights, tokenizer, model.yaml, README.md) for `stage.init_from`, `medm infer` or "
                    "`medm export`. llava-hf: a transformers LlavaForConditionalGeneration directory; medm-vl: a "
                    "MedM-VL (LVLMForConditionalGeneration) directory; tinyllava: a TinyLLaVA_Factory directory "
                    "(finetune layout, or the pretrain layout's language_model/ vision_tower/ connector/ folders); "
                    "llava: an original LLaVA / LLaVA-Med directory (LlavaLlamaForCausalLM / "
                    "LlavaMistralForCausalLM; merged, or projector-only mm_projector.bin with --llm-path).")
    p.add_argument("format", choices=FORMATS, help="the source format")
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--family", default=None, help="medm LLM family (LoRA targets); default: the text config's "
                                                  "model_type when medm knows it, else auto")
    p.add_argument("--template", default=None, help="registered medm chat template; default: the checkpoint's own "
                                                    "(llava-hf), medm-vl, tinyllava, llava_v1 (llava, Llama) or "
                                                    "mistral_instruct (llava, Mistral)")
    p.add_argument("--system-prompt", default=None, help="default system prompt; default: the one a medm export "
                                                         "recorded, else none")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16; default: as stored")
    p.add_argument("--llm-path", default=None, help="medm-vl, tinyllava, llava: base LLM directory (or hub id) for the "
                                                    "config and tokenizer the checkpoint does not carry")
    p.add_argument("--encoder-path", default=None, help="medm-vl, tinyllava, llava: base vision encoder directory (or "
                                                        "hub id) for its config and image processor "
                                                        "(preprocessor_config.json); llava: a local copy of the CLIP "
                                                        "tower mm_vision_tower names, also its weights when the "
                                                        "checkpoint has none")
    p.add_argument("--encoder3d-path", default=None, help="medm-vl: base 3D encoder directory (M3D-CLIP, "
                                                          "MedM-CLIP-CT) for its config")
    p.add_argument("--image3d-slices", type=int, default=None, help="medm-vl: the checkpoint's 2D encoder reads "
                                                                    "volumes slice by slice (MedM-VL-CT-Chest: 32); "
                                                                    "import it as a 3D tower of this many slices")
    p.add_argument("--ct-intensity", choices=("hu", "stored"), default=None,
                   help="medm-vl volumes: how the checkpoint's MedM-VL version read CT .npy volumes: hu (b1b0770 "
                        "and later: HU clipped to -1000..1000, scaled to 0..255) or stored (193feb7, the release "
                        "era: the stored values, uint8 for CT-Chest); default: hu for the current config format "
                        "(lvlm_ keys), stored for the released one")
    p.set_defaults(func=_cmd_import)

    p = subparsers.add_parser("export", help="write a standalone model from a training checkpoint",
                              description="medm export --merge SRC OUT: fold a LoRA adapter (or a connector-only "
                                          "checkpoint) into its base weights; OUT opens with medm.models.load_model. "
                                          "medm export --to llava-hf SRC OUT: the same merge, written as transformers' "
                                          "LlavaForConditionalGeneration + LlavaProcessor (CLIP / SigLIP tower, mlp "
                                          "connector); parts that format cannot hold are refused with the reason.")
    p.add_argument("--merge", action="store_true", help="merge adapters / components into the base (a medm model)")
    p.add_argument("--to", choices=["llava-hf"], default=None,
                   help="write another format (adapters are merged first): llava-hf = transformers' LLaVA")
    p.add_argument("--eval-metrics", nargs="+", default=None, metavar="METRICS_JSON",
                   help="medm eval metrics.json files to show in OUT's README.md model card")
    p.add_argument("--base", default=None, help="full checkpoint holding the base weights (default: the one the "
                                                "checkpoint's medm_checkpoint.json names)")
    p.add_argument("src", help="training checkpoint directory (output_dir or a checkpoint-N)")
    p.add_argument("out", help="output directory")
    p.set_defaults(func=_cmd_export)
