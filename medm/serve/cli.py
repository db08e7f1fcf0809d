"""`medm chat` (a terminal chat) and `medm serve` (an OpenAI-compatible API) over a trained model.

    medm chat --model runs/demo/finetune --image scan.png
    medm serve --model runs/demo/finetune --port 8000
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

from medm.infer.cli import open_predictor


def _model_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (a training run's output_dir, a "
                                                  "checkpoint-N, or an exported model)")
    p.add_argument("--base", default=None, help="the full checkpoint a LoRA / connector-only --model builds on, "
                                                "when it is no longer where its medm_checkpoint.json says")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:1, cpu")
    p.add_argument("--dtype", default=None, help="bfloat16, float16, float32; default: the checkpoint's")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python files the checkpoint ships "
                                                                    "(auto_map); off by default: only for "
                                                                    "checkpoints you trust")
    p.add_argument("--template", default=None, help="registered chat template; default: the model's")
    p.add_argument("--system-prompt", default=None, help="system prompt; default: the model's")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"longest answer in tokens (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1)")


def _open(args: argparse.Namespace):
    """The Predictor, or None after one error line naming --model (a folder that is not a checkpoint, a moved base)."""
    try:
        return open_predictor(args)
    except (OSError, ValueError) as e:
        print(f"error: cannot open --model {args.model}: {' '.join(str(e).split())} (give a training run's "
              "output_dir, a checkpoint-N or an exported model)", file=sys.stderr)
        return None


def _settings(args: argparse.Namespace):
    from medm.infer import GenerationSettings  # defers torch, transformers

    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)


def _cmd_chat(args: argparse.Namespace) -> int:
    from medm.playground.model_info import takes_volumes  # defers torch, transformers
    from medm.serve.chat import COMMANDS, ChatLoop  # defers torch, transformers

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    if args.image and args.volume:
        print("error: give --image or --volume, not both (one picture per conversation; /image and /volume "
              "change it later)", file=sys.stderr)
        return 2
    predictor = _open(args)
    if predictor is None:
        return 2
    with tempfile.TemporaryDirectory(prefix="medm-chat-") as work:  # unpacked DICOM series, volume cache
        loop = ChatLoop(predictor, _settings(args), whole_volumes=takes_volumes(args.model), work_dir=work)
        if sys.stdin.isatty():
            print(f"medm chat: {args.model}. Commands: {COMMANDS}.")
        if args.image or args.volume:
            error = loop.attach(args.image or args.volume, bool(args.volume), "--volume" if args.volume else "--image")
            if error:
                print(f"error: {error}", file=sys.stderr)
                return 2
        return loop.run()


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn  # defers uvicorn

    from medm.serve.api import build_app  # defers torch, transformers

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    name = args.name or os.path.basename(os.path.normpath(args.model))
    predictor = _open(args)
    if predictor is None:
        return 2
    app = build_app(predictor, name, defaults=_settings(args), max_concurrency=args.max_concurrency,
                    max_request_bytes=int(args.max_request_mb * 1024**2), max_batch_size=args.max_batch_size,
                    allow_local_files=not args.no_local_files)
    print(f"medm serve: {args.model} as {name!r} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "chat", help="chat with a model in the terminal (streamed answers; /image, /volume, /clear, /exit)",
        description="A terminal chat: type a question, the answer streams back. Commands: /image PATH and "
                    "/volume PATH give the model a picture (the next question carries it), /clear forgets the "
                    "conversation, /exit (or Ctrl-D) leaves. Questions may also come on stdin.")
    _model_arguments(p, max_new_tokens=256)
    p.add_argument("--image", default=None, help="a 2D image the first question is about")
    p.add_argument("--volume", default=None, help="a 3D volume (.nii, .nii.gz, .npy, zipped DICOM series) the "
                                                  "first question is about")
    p.set_defaults(func=_cmd_chat)

    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/models)",
        description="An OpenAI-compatible HTTP API: /v1/chat/completions (streaming or not; images as data URLs "
                    "or server-side paths; 3D volumes through medm's `volume_url` part) and /v1/models. "
                    "Concurrent requests are batched. docs/serving.md has the details and when to use vLLM.")
    _model_arguments(p, max_new_tokens=256)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", default=None, help="the model id clients send (default: --model's folder name)")
    p.add_argument("--max-concurrency", type=int, default=16, help="requests in flight at once, queued or "
                                                                   "generating; more get HTTP 429 (default 16)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests answered by one generate call "
                                                                 "(default 8)")
    p.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body in MB, pictures "
                                                                      "included (default 32); larger get HTTP 413")
    p.add_argument("--no-local-files", action="store_true", help="refuse server-side paths in requests (only data "
                                                                 "URLs); use it when others can reach the server")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning; info logs "
                                                          "every request)")
    p.set_defaults(func=_cmd_serve)
