"""`medm demo`: phantom VQA data -> pretrain -> finetune -> held-out evaluation, on the CPU in minutes.

Run: medm demo [--kind medm|qwen-vl|3d] [--3d] [--out runs/demo] [--finetune-steps N]

`--kind medm` (default) pretrains the vision tower and connector on captions, then finetunes the tiny medm model
(configs/demo/pretrain.yaml, finetune.yaml); `--kind qwen-vl` fully finetunes the tiny Qwen2.5-VL in one stage
(configs/demo/finetune_qwenvl.yaml); `--3d` (`--kind 3d`) does the medm stages with a 3D tower on phantom volumes
(configs/demo/pretrain3d.yaml, finetune3d.yaml; data from `medm.data.builders.phantoms3d`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

from medm.data.annotations import load_records

# torch, the trainer and the data builders load in `run_demo`, so `medm --help` does not wait for them.

logger = logging.getLogger(__name__)
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
# Per model kind: its stages in order as (YAML in configs/demo, phantom file, output subdirectory), each starting
# from the previous one's checkpoint; and the default output directory.
DEMOS = {
    "medm": ([("pretrain", "captions", "pretrain"), ("finetune", "train", "finetune")], "runs/demo"),
    "qwen-vl": ([("finetune_qwenvl", "train", "finetune")], "runs/demo-qwen-vl"),
    "3d": ([("pretrain3d", "captions", "pretrain"), ("finetune3d", "train", "finetune")], "runs/demo3d"),
}
# Training images per kind when --n-train is not given. The medm demo draws 8,000: at 4,000 the 2000 finetune steps it
# ran then saw each image about 5 times and location questions reached 0.76-0.99 held-out over seeds 0-2; at 8,000,
# 0.90-1.0.
N_TRAIN = {"medm": 8000}


def demo_data(variant: str):
    """(builder writing `captions` / `train` / `test`, question kinds) of a demo variant: 2D phantoms, or volumes."""
    if variant == "3d":
        from medm.data.builders.phantoms3d import KINDS, build_phantoms3d  # defers numpy (medm --help)

        return build_phantoms3d, KINDS
    from medm.data.builders.phantoms import KINDS, build_phantoms  # defers numpy (medm --help)

    return build_phantoms, KINDS


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def accuracy_by_kind(records, predictions: list[str]) -> dict[str, float]:
    """Exact match after normalisation, per `question_type` and overall."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for rec, pred in zip(records, predictions):
        ok = _norm(pred) == _norm(str(rec.answer))
        hits[rec.extra.get("question_type", "all")].append(ok)
        hits["overall"].append(ok)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def majority_by_kind(train_records, test_records) -> dict[str, float]:
    """Accuracy of always giving the most common training answer of each question kind."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in train_records:
        counts[r.extra.get("question_type", "all")][_norm(str(r.answer))] += 1
    preds = [counts[r.extra.get("question_type", "all")].most_common(1)[0][0] for r in test_records]
    return accuracy_by_kind(test_records, preds)


def run_demo(out: str | None = None, finetune_steps: int | None = None, pretrain_steps: int | None = None,
             n_train: int | None = None, n_test: int = 200, seed: int = 0, kind: str = "medm",
             threads: int | None = None) -> dict:
    """Build the data, train the stages of `kind` (see `DEMOS`), evaluate, and write `out/results.json`."""
    from medm._threads import pick_threads  # defers torch, transformers
    from medm.infer import GenerationSettings, Predictor  # defers torch, transformers
    from medm.train.args import load_train_config  # defers torch, transformers
    from medm.train.trainer import run_training  # defers torch, transformers

    if kind not in DEMOS:
        raise ValueError(f"unknown demo kind {kind!r}; known: {', '.join(DEMOS)}")
    stages, default_out = DEMOS[kind]
    out = out or default_out
    data = os.path.join(out, "data")
    build, kinds = demo_data(kind)
    paths = build(data, n_train=N_TRAIN.get(kind, 4000) if n_train is None else n_train, n_test=n_test, seed=seed)
    # A 2D demo step of the 4-layer tower took 0.21 s on 2 idle cores, 0.33 s on one, but on cores others keep busy
    # OpenMP's spin-waiting makes more threads far slower (3.6 s vs 0.47 s): unless --threads says, time a few steps
    # of the last (longest) stage with 1 thread and with every core, and keep the faster.
    last_yaml, last_file, _ = stages[-1]
    choice = pick_threads(threads, lambda: load_train_config(str(CONFIGS / f"{last_yaml}.yaml"), [
        f"data.path={paths[last_file]}", f"data.image_dir={data}", f"train.seed={seed}"]))
    print(f"threads: {choice.describe()}", flush=True)
    t0 = time.time()
    previous = None
    for number, (yaml_name, data_file, sub) in enumerate(stages, 1):
        steps = pretrain_steps if sub == "pretrain" else finetune_steps
        # A header over each stage's progress bar, so two bars in a row read as two stages.
        print(f"\nstage {number}/{len(stages)}: {sub} (configs/demo/{yaml_name}.yaml -> {out}/{sub})", flush=True)
        run_training(load_train_config(str(CONFIGS / f"{yaml_name}.yaml"), [
            f"data.path={paths[data_file]}", f"data.image_dir={data}", f"train.output_dir={out}/{sub}",
            f"train.seed={seed}", *([f"stage.init_from={previous}"] if previous else []),
            *([f"train.max_steps={steps}"] if steps else [])]))
        previous = f"{out}/{sub}"
    train_seconds = time.time() - t0

    predictor = Predictor.from_pretrained(f"{out}/finetune", image_dir=data)
    test = load_records(paths["test"])
    settings = GenerationSettings(max_new_tokens=6)
    preds = [p for _, p in predictor.predict(test, batch_size=64, settings=settings)]
    blank = [p for _, p in predictor.predict(test, batch_size=64, settings=settings, blank_images=True)]
    acc, blanked = accuracy_by_kind(test, preds), accuracy_by_kind(test, blank)
    majority = majority_by_kind(load_records(paths["train"]), test)
    counts = Counter(r.extra.get("question_type") for r in test)
    results = {
        "accuracy": acc["overall"], "majority_baseline": majority["overall"], "blanked_accuracy": blanked["overall"],
        "per_kind": {k: {"n": counts[k], "accuracy": acc.get(k), "majority_baseline": majority.get(k),
                         "blanked_accuracy": blanked.get(k)} for k in kinds if counts[k]},
        "n_test": len(test), "train_seconds": round(train_seconds, 1),
        "checkpoint": os.path.abspath(f"{out}/finetune"), "threads": choice.threads,
        "threads_choice": choice.describe(),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "predictions.jsonl"), "w") as f:
        for rec, p, b in zip(test, preds, blank):
            f.write(json.dumps({"id": rec.id, "question_type": rec.extra.get("question_type"), "answer": rec.answer,
                                "prediction": p, "prediction_blank_image": b}) + "\n")
    print_table(results, out, validation_curve(f"{out}/finetune"))
    return results


# The validation figures the demo's finetune stage logs (train.eval_task: vqa), as the curve shows them.
CURVE_COLUMNS = (("eval_loss", "val loss"), ("eval_closed_accuracy", "closed acc"), ("eval_open_accuracy", "open acc"),
                 ("eval_overall", "overall"))


def validation_curve(run_dir: str) -> list[dict]:
    """The evaluations of a training run (`curve` of its results.json: step and figures); [] when it has none."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f).get("curve", [])


def format_curve(curve: list[dict]) -> list[str]:
    """Lines of a step -> validation table: the loss, and the accuracies as fractions like the demo's table (the
    task logs percentages); a figure an evaluation lacks (no open question among the records) shows as -."""
    if not curve:
        return []
    columns = [(k, h) for k, h in CURVE_COLUMNS if any(k in point for point in curve)]
    lines = [f"{'step':>6} " + " ".join(f"{h:>10}" for _, h in columns)]
    for point in curve:
        cells = [point.get(k) for k, _ in columns]
        cells = [v if v is None or k == "eval_loss" else v / 100 for (k, _), v in zip(columns, cells)]
        lines.append(f"{point['step']:>6} " + " ".join(f"{'-':>10}" if v is None else f"{v:>10.3f}" for v in cells))
    return lines


def print_table(results: dict, out: str, curve: list[dict] | None = None) -> None:
    rows = [(k, v["n"], v["accuracy"], v["majority_baseline"], v["blanked_accuracy"])
            for k, v in results["per_kind"].items()]
    rows.append(("overall", results["n_test"], results["accuracy"], results["majority_baseline"],
                 results["blanked_accuracy"]))
    print(f"\nmedm demo: held-out phantom VQA ({results['n_test']} questions), trained in "
          f"{results['train_seconds']:.0f} s on the CPU\n")
    print(f"{'kind':<10} {'n':>5} {'accuracy':>9} {'majority':>9} {'blank img':>10}")
    for k, n, a, m, b in rows:
        print(f"{k:<10} {n:>5} {a:>9.3f} {m:>9.3f} {b:>10.3f}")
    if curve:
        n = curve[-1].get("eval_n")
        print(f"\nvalidation during finetuning ({n} questions split off the training data, scored as `medm eval "
              f"--task vqa`):\n")
        print("\n".join(format_curve(curve)))
    if "threads_choice" in results:
        print(f"\nthreads:    {results['threads_choice']}")
    print(f"checkpoint: {results['checkpoint']}\nfigures:    {os.path.join(out, 'results.json')}")
    print(f"open it:    python playground.py --model {results['checkpoint']}")


def _cmd_demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_demo(args.out, finetune_steps=args.finetune_steps, pretrain_steps=args.pretrain_steps,
             n_train=args.n_train, n_test=args.n_test, seed=args.seed, kind=args.kind, threads=args.threads)
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train and evaluate the tiny phantom-VQA model on the CPU")
    p.add_argument("--kind", default="medm", choices=sorted(DEMOS),
                   help="model kind: medm (pretrain + finetune the tiny medm model) or qwen-vl (finetune the tiny "
                        "Qwen2.5-VL) or 3d (pretrain + finetune the tiny medm model with a 3D tower on volumes)")
    p.add_argument("--3d", dest="kind", action="store_const", const="3d",
                   help="the 3D demo on phantom volumes (the same as --kind 3d)")
    p.add_argument("--out", default=None, help="output directory (data, checkpoints, results.json); default "
                                               "runs/demo, runs/demo-qwen-vl for --kind qwen-vl, runs/demo3d for --3d")
    p.add_argument("--finetune-steps", type=int, default=None, help="override the finetune stage's max_steps")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the pretrain stage's max_steps "
                                                                     "(medm kind)")
    p.add_argument("--n-train", type=int, default=None, help="training images (about 3 questions each); default "
                                                              "8000 for the medm kind, 4000 for the others")
    p.add_argument("--n-test", type=int, default=200, help="held-out images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: measured, the faster of "
                                                              "1 and every core this process may use")
    p.set_defaults(func=_cmd_demo)
