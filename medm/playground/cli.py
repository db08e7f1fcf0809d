"""`medm playground` (or `python playground.py`): chat with a model about an image or a volume in the browser.

    python playground.py [--model DIR] [--host 127.0.0.1] [--port 7860]

With no `--model` it serves the demo checkpoint (`runs/demo/finetune`), training it first with `medm demo` when it
is missing, and offers the demo's held-out phantoms as example cases.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading

from medm.demo import run_demo

DEMO_OUT = "runs/demo"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (a training run's output_dir, a checkpoint-N, "
                                                 "or an exported model); default: the demo model, trained first "
                                                 "when missing")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--examples", default=None, help="records file (JSON / JSONL with 2D images) whose questions are "
                                                    "offered as example cases; default: the demo's test.json when it "
                                                    "exists; `none`: no examples")
    p.add_argument("--image-dir", default=None, help="base of the example records' relative image paths (default: "
                                                     "the records file's folder)")
    p.add_argument("--demo-out", default=DEMO_OUT, help=f"where the demo lives / is trained (default {DEMO_OUT})")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:1, cpu")
    p.add_argument("--dtype", default=None, help="bfloat16, float16, float32; default: the checkpoint's")
    p.add_argument("--max-file-size", default="200mb", help="largest upload, e.g. 200mb or 2gb (default 200mb)")
    p.add_argument("--concurrency", type=int, default=4, help="answers generated at once; more requests wait in "
                                                              "the queue (default 4)")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python files the checkpoint ships "
                                                                    "(`auto_map`); off by default: only for "
                                                                    "checkpoints you trust")


def demo_checkpoint(demo_out: str = DEMO_OUT) -> str:
    """The demo model's directory, trained first (`medm.demo.run_demo`) when it holds no model yet."""
    ckpt = os.path.join(demo_out, "finetune")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        print(f"no demo model in {ckpt}: training it first (medm demo, a few minutes on the CPU)", flush=True)
        run_demo(demo_out)
    return ckpt


def _examples(args: argparse.Namespace, demo_out: str):
    from medm.playground.model_info import load_examples  # defers torch, transformers

    path = args.examples
    if path is None:
        path = os.path.join(demo_out, "data", "test.json")
        if not os.path.isfile(path):
            return []
    if path.lower() == "none":
        return []
    return load_examples(path, args.image_dir)


def serve(args: argparse.Namespace) -> int:
    """Load the model, build the page and serve it until interrupted; uploads stay in a temp dir removed at exit."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    model_dir = args.model or demo_checkpoint(args.demo_out)
    try:
        examples = _examples(args, args.demo_out)
    except (OSError, ValueError) as e:
        print(f"error: --examples: {e}", file=sys.stderr)
        return 2
    own = tempfile.mkdtemp(prefix="medm-playground-")
    # gradio keeps uploads in GRADIO_TEMP_DIR, read when gradio is imported and when the app is built: set it first.
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(own, "gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import torch  # defers torch

        from medm.infer import Predictor  # defers torch, transformers
        from medm.playground.app import build_app, launch  # defers torch, transformers

        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
            ("cpu" if args.device == "auto" else args.device)
        try:
            predictor = Predictor.from_pretrained(model_dir, dtype=args.dtype, device=device,
                                                  trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as e:
            print(f"error: cannot open --model {model_dir}: {e}", file=sys.stderr)
            return 2
        app = build_app(predictor, model_dir, work_dir=os.path.join(own, "work"), examples=examples,
                        examples_label="Example cases" + (" (demo phantoms)" if args.examples is None else ""))
        if threading.current_thread() is threading.main_thread():
            # `kill` ends the server like Ctrl-C, so the temp dir is removed.
            signal.signal(signal.SIGTERM, _interrupt)
        print(f"medm playground: {model_dir} on http://{args.host}:{args.port}", flush=True)
        # The example files themselves, never their folders: anyone reaching the port may ask for any path.
        launch(app, args.host, args.port, max_file_size=args.max_file_size, concurrency=args.concurrency,
               allowed_paths=sorted({os.path.abspath(e.image) for e in examples}))
    finally:
        shutil.rmtree(own, ignore_errors=True)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _cmd_playground(args: argparse.Namespace) -> int:
    return serve(args)


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("playground", help="chat with a model about an image or a volume in the browser",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=_cmd_playground)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="playground.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return serve(parser.parse_args(argv))
