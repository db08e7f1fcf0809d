"""`medm eval`: score a `medm infer` predictions file with a task; write metrics.json and report.md, print the table.
`medm bench`: a suite of tasks (infer + eval each) into one table (`medm.eval.bench`).

    medm eval --task vqa-rad --pred runs/eval/preds.jsonl --out runs/eval
    medm eval --task vqa-rad --pred preds.jsonl --blank preds_blank.jsonl --protocol llava-med --out runs/eval
    medm eval --task vqa-rad --pred a/preds.jsonl --compare b/preds.jsonl --bootstrap 1000 --seed 0 --out a
    medm bench --suite radiology-vqa --model runs/finetune [--compare runs/bench/radiology-vqa/base]
"""

from __future__ import annotations

import argparse
import os
import sys

from medm.config import ConfigError
from medm.eval.bench import load_suite, run_bench


def _cmd_eval(args: argparse.Namespace) -> int:
    from medm.eval.report import evaluate, render_markdown, write_report  # defers torch, transformers

    try:
        result = evaluate(args.task, args.pred, protocol=args.protocol, blank=args.blank, image_dir=args.image_dir,
                          bootstrap=args.bootstrap, seed=args.seed, compare=args.compare)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else os.path.dirname(os.path.abspath(args.pred))
    paths = write_report(result, out)
    print(render_markdown(result))
    print(f"wrote {paths['metrics']} and {paths['report']}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        suite = load_suite(args.suite)
        out = args.out or os.path.join("runs", "bench", suite.name,
                                       os.path.basename(os.path.normpath(args.model)) or "model")
        result = run_bench(suite, args.model, out, compare=args.compare, data_root=args.data_root,
                           bootstrap=args.bootstrap, seed=args.seed, device=args.device, dtype=args.dtype,
                           batch_size=args.batch_size, limit=args.limit,
                           only=[t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
                           progress=not args.no_progress)
    except (OSError, ValueError, KeyError, ConfigError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    with open(result.paths["markdown"], encoding="utf-8") as f:
        print(f.read())
    print(f"wrote {result.paths['markdown']} and {result.paths['csv']}")
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score a predictions file: metrics.json, report.md",
        description="Score the JSONL file `medm infer` wrote with an evaluation task (medm list shows them: vqa, "
                    "vqa-rad, slake, pathvqa, report, report-zh, grounding, spine, omnimedvqa, pmc-vqa, medxpertqa, "
                    "mmmu, m3d-vqa-closed, m3d-vqa-open, m3d-cap, iu-xray, flare25), overall and per group where the "
                    "data has them, each figure with a 95% bootstrap interval.")
    p.add_argument("--task", required=True, help="evaluation task (the list above; docs/eval.md)")
    p.add_argument("--pred", required=True, help="predictions JSONL written by medm infer")
    p.add_argument("--protocol", default=None, help="scoring protocol; VQA tasks: strict (default) or llava-med "
                                                    "(LLaVA-Med's substring scorer, to compare with papers)")
    p.add_argument("--out", default=None, help="directory for metrics.json and report.md (default: --pred's)")
    p.add_argument("--blank", default=None, help="predictions for the same questions with blank images (medm infer "
                                                 "--blank-images): adds accuracy with and without the image")
    p.add_argument("--image-dir", default=None, help="directory relative image paths start from (grounding reads "
                                                     "image sizes from the images)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% interval of every "
                                                                   "figure (default 1000; 0: no intervals)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    p.add_argument("--compare", default=None, help="another model's predictions for the same questions: adds the "
                                                   "paired difference of each figure, its interval and p-value")
    p.set_defaults(func=_cmd_eval)

    b = subparsers.add_parser(
        "bench", help="run a benchmark suite (infer + eval per task): one table of headline figures",
        description="Runs every task of a suite (configs/bench/NAME.yaml, or a YAML path) with one model: "
                    "OUT/<task>/preds.jsonl, metrics.json, report.md, then OUT/bench.md and OUT/bench.csv with "
                    "each task's headline figure and 95% interval. Running it again resumes (answered questions "
                    "are kept). --compare adds another model's figures and the paired differences.")
    b.add_argument("--suite", required=True, help="suite name (configs/bench/NAME.yaml) or a YAML file")
    b.add_argument("--model", required=True, help="checkpoint directory")
    b.add_argument("--out", default=None, help="bench folder (default runs/bench/<suite>/<model folder name>)")
    b.add_argument("--compare", default=None, help="another model's bench folder for the same suite")
    b.add_argument("--data-root", default=os.environ.get("MEDM_DATA_DIR"),
                   help="directory the suite's relative data paths start from (default $MEDM_DATA_DIR, else as "
                        "written)")
    b.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    b.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    b.add_argument("--tasks", default=None, help="run only these tasks of the suite (comma-separated names)")
    b.add_argument("--limit", type=int, default=None, help="answer at most N questions per task")
    b.add_argument("--batch-size", type=int, default=None, help="questions per generate call (default: the suite's)")
    b.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cpu")
    b.add_argument("--dtype", default=None, help="bfloat16, float16, float32; default: the checkpoint's")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=_cmd_bench)
