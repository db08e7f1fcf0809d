"""`medm data validate | convert | build | split`: check annotation files record by record, convert between layouts,
run a registered data builder, and split a file into train / dev by group.

    medm data validate train.json --image-dir images/ [--write-clean clean.json] [--inference]
    medm data convert --to sharegpt train.json train_sharegpt.json
    medm data build vqa-rad --out data/vqa_rad --src ../shared/data/vqa_rad
    medm data split labels.json --out data/spine --dev-ratio 0.2 --seed 0
    medm data prepare configs/train/finetune.yaml data.cache_dir=/shared/medm-cache data.num_proc=16
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from medm._docstrings import docstring_args
from medm.config import ConfigError
from medm.data.annotations import (
    FAILURE_KINDS,
    AnnotationError,
    Record,
    RecordError,
    iter_file,
    load_records,
    resolve_path,
    write_json_records,
    write_records,
)
from medm.data.split import SplitError, split_file
from medm.data.templates import TemplateError
from medm.registry import BUILDER

if TYPE_CHECKING:
    from medm.data._media import ModelMedia


@dataclass
class ValidationReport:
    """What `validate_files` found: good raw records (as read) and failures grouped by kind."""

    total: int = 0
    good: list[Any] = field(default_factory=list)
    failures: dict[str, list[RecordError]] = field(default_factory=lambda: defaultdict(list))

    @property
    def num_bad(self) -> int:
        return self.total - len(self.good)


def check_files(record: Record, image_dir: str | None = None, decode: bool = True,
                media: ModelMedia | None = None) -> list[RecordError]:
    """Missing or undecodable media of one record (every file is checked; nothing stops at the first); with a
    model's `media`, media its preprocessing (as training applies it) fails on."""
    from medm.data._media import check_media  # defers torch, transformers

    errors = []
    for key, paths in (("image", record.image), ("image3d", record.image3d)):
        for p in paths:
            full = resolve_path(p, image_dir)
            # A volume may be a DICOM series folder.
            if not (os.path.isfile(full) or key == "image3d" and os.path.isdir(full)):
                errors.append(RecordError(record.id, "missing_file", f"{key} file {full!r} does not exist"))
            elif decode:
                try:
                    check_media(key, full, media, record.extra.get("modality"))
                except (ValueError, OSError) as e:
                    errors.append(RecordError(record.id, "corrupt_image", str(e)))
    return errors


# Chat-format control tokens of the common templates (ChatML / Qwen / Llama 3 / Phi `<|...|>`, Llama 2 / Mistral,
# Gemma). Training reads them in a record as plain text, so in an answer they teach the model to write control-token
# text: nearly always a formatting slip of the source. No tokenizer is needed to spot them.
CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?s>|<(?:unk|pad|bos|eos|start_of_turn|end_of_turn)>|\[/?INST\]"
                           r"|<</?SYS>>")


def check_text(record: Record) -> list[RecordError]:
    """Chat control tokens written in an answer (gpt turn) of one record."""
    for i, t in enumerate(record.conversations):
        found = CONTROL_TOKEN.findall(t["value"]) if t["from"] == "gpt" else []
        if found:
            return [RecordError(record.id, "special_token", f"turn {i} (gpt) holds chat control token(s) "
                                                            f"{', '.join(dict.fromkeys(found))}")]
    return []


def validate_files(paths: list[str], image_dir: str | None = None, for_training: bool = True,
                   decode: bool = True, media: ModelMedia | None = None) -> ValidationReport:
    """Check every record of every file: schema, turns, placeholders, control tokens in answers, unique ids, and
    that each media file exists and decodes. The first record of an id is kept; later ones are `duplicate_id`.

    Raises:
        AnnotationError: a file that is not valid JSON / JSONL (names file, line and column).
    """
    report = ValidationReport()
    first: dict[str, str] = {}  # id -> where it was first seen
    for path in paths:
        for i, (raw, rec) in enumerate(iter_file(path, for_training=for_training)):
            report.total += 1
            if isinstance(rec, RecordError):
                errors = [rec]
            else:
                errors = check_text(rec) + check_files(rec, image_dir, decode, media)
                if rec.id in first:
                    errors.insert(0, RecordError(rec.id, "duplicate_id", f"{path} item {i} repeats the id of "
                                                                         f"{first[rec.id]} (ids must be unique)"))
                first.setdefault(rec.id, f"{path} item {i}")
            first_of_each: dict[str, RecordError] = {}
            for e in errors:
                first_of_each.setdefault(e.kind, e)
            for problem, error in first_of_each.items():  # one failure per kind of problem and record
                report.failures[problem].append(error)
            if not errors:
                report.good.append(raw)
    return report


def _print_report(report: ValidationReport, paths: list[str], max_ids: int = 20) -> None:
    print(f"checked {report.total} record(s) in {', '.join(paths)}: {len(report.good)} good, {report.num_bad} bad")
    for kind in FAILURE_KINDS:
        errs = report.failures.get(kind)
        if not errs:
            continue
        ids = ", ".join(e.record_id for e in errs[:max_ids]) + (f", ... ({len(errs) - max_ids} more)"
                                                                 if len(errs) > max_ids else "")
        print(f"  {kind}: {len(errs)} ({FAILURE_KINDS[kind]}): {ids}")
        print(f"    e.g. {errs[0]}")


def _cmd_validate(args: argparse.Namespace) -> int:
    from medm.data._media import load_model_media  # defers torch, transformers

    try:
        media = load_model_media(args.model) if args.model else None
        report = validate_files(args.files, args.image_dir, for_training=not args.inference,
                                decode=not args.no_decode, media=media)
    except (AnnotationError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if media is not None and not args.no_decode:
        print(f"media checked through the preprocessing of {args.model} (as its training reads them)")
    elif not args.no_decode:
        print("media checked for decoding only; pass --model CONFIG_OR_CHECKPOINT to apply a model's preprocessing "
              "(its volume: settings, sizes), so that what validates is what trains")
    _print_report(report, args.files)
    if args.write_clean:
        write_json_records(args.write_clean, report.good)
        print(f"wrote {len(report.good)} good record(s) to {args.write_clean}")
        return 0
    return 1 if report.num_bad else 0


def _cmd_convert(args: argparse.Namespace) -> int:
    try:
        records = load_records(args.input)
    except (AnnotationError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_records(args.output, records, layout=args.to)
    print(f"wrote {len(records)} record(s) in the {args.to} layout to {args.output}")
    return 0


def builder_kwargs(builder, options: list[str]) -> dict[str, Any]:
    """`["--out", "d", "--n-train", "100"]` -> `{"out": "d", "n_train": 100}` (values parsed as YAML), checked
    against the builder's signature: unknown or missing required options are errors that list the valid ones."""
    params = inspect.signature(builder).parameters
    flags = ", ".join("--" + p.replace("_", "-") for p in params)
    if len(options) % 2:
        raise ValueError(f"builder options come in `--name value` pairs, got {options}; options: {flags}")
    kwargs = {}
    for flag, value in zip(options[::2], options[1::2]):
        name = flag.lstrip("-").replace("-", "_")
        if not flag.startswith("--") or name not in params:
            raise ValueError(f"unknown option {flag!r} for builder {builder.registry_name!r}; options: {flags}")
        kwargs[name] = yaml.safe_load(value)
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        need = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise ValueError(f"builder {builder.registry_name!r} needs {need}")
    return kwargs


def builder_help(name: str, builder) -> str:
    """`medm data build NAME --help`: the builder's options from its signature, described by its docstring."""
    doc = inspect.getdoc(builder) or ""
    texts = docstring_args(builder)
    parser = argparse.ArgumentParser(
        prog=f"medm data build {name}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=doc.split("\n\n")[0] + "\n\nValues are read as YAML: numbers, true / false, null, lists [a, b].")
    for p, param in inspect.signature(builder).parameters.items():
        required = param.default is inspect.Parameter.empty
        text = texts.get(p, "")
        default = param.default
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else \
            str(list(default) if isinstance(default, tuple) else default)
        text += " (required)" if required else f" (default: {shown})"
        parser.add_argument("--" + p.replace("_", "-"), metavar=p.upper(), required=required,
                            help=text.strip().replace("%", "%%"))
    return parser.format_help()


def _cmd_build(args: argparse.Namespace) -> int:
    try:
        builder = BUILDER.get(args.name)
        if "-h" in args.options or "--help" in args.options:
            print(builder_help(args.name, builder), end="")
            return 0
        kwargs = builder_kwargs(builder, args.options)
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    try:
        written = builder(**kwargs)
    except (ValueError, OSError) as e:  # SourceError included: the message names the file, row and field
        print(f"error: medm data build {args.name}: {e}", file=sys.stderr)
        return 2
    for role, path in (written or {}).items():
        print(f"{role}: {path}")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    try:
        result = split_file(args.file, args.out, args.dev_ratio, args.seed, args.by, args.list_key or None)
    except (SplitError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, c in result["counts"].items():
        print(f"{name}: {result[name]} ({c['items']} item(s), {c['groups']} {args.by} group(s))")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from medm.data._prepare import prepare  # defers torch, transformers
    from medm.train.args import load_train_config  # defers torch, transformers

    try:
        cfg = load_train_config(args.config, args.overrides)
        stores = prepare(cfg)
    except (ConfigError, AnnotationError, TemplateError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in stores:
        how = f"built in {s['build_seconds']} s by {s['num_proc']} process(es)" if s["built"] else "already built"
        print(f"{s['path']}: {s['samples']} samples of {s['records']} records ({s['dropped']} dropped, "
              f"{s['bad_media']} with unreadable media), {s['size_mb']} MB, {how}; from {', '.join(s['files'])}")
    if stores:
        print(f"cache dir: {os.path.dirname(stores[0]['path'])} (data.cache_dir; point every node's job at it)")
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add `medm data validate | convert | build | split`."""
    p = subparsers.add_parser("data", help="check and convert conversation annotation files")
    sub = p.add_subparsers(dest="data_command", required=True)
    v = sub.add_parser("validate", help="check every record; list failures by kind with the bad ids",
                       description="Check schema, turn order, <image>/<image3d> placeholders, and that every image "
                                   "exists and decodes. Exit 1 when any record is bad, unless --write-clean.")
    v.add_argument("files", nargs="+", help="annotation files (LLaVA / MedM-VL or ShareGPT; JSON list or JSONL)")
    v.add_argument("--image-dir", help="base directory of relative image / volume paths")
    v.add_argument("--write-clean", metavar="OUT", help="write the good records, as read, to OUT (.jsonl: JSONL, "
                                                        "else a JSON list) and exit 0")
    v.add_argument("--inference", action="store_true", help="records are prompts: a final human turn is fine")
    v.add_argument("--no-decode", action="store_true", help="only check that image files exist (faster)")
    v.add_argument("--model", metavar="CONFIG_OR_CHECKPOINT", help="apply this model's 2D and 3D preprocessing to "
                                                                   "every file (model or train YAML, or checkpoint)")
    v.set_defaults(func=_cmd_validate)
    c = sub.add_parser("convert", help="convert between the LLaVA (internal) and ShareGPT (LLaMA-Factory) layouts")
    c.add_argument("--to", required=True, choices=["sharegpt", "llava"], help="layout to write")
    c.add_argument("input", help="annotation file, either layout")
    c.add_argument("output", help="output file (.jsonl: JSONL, else a JSON list)")
    c.set_defaults(func=_cmd_convert)
    b = sub.add_parser("build", help="run a registered data builder (`medm list` shows them)",
                       description="Write a data source as conversation records: medm data build NAME --out DIR "
                                   "[--option value ...]; the options are the builder's arguments, listed by "
                                   "medm data build NAME --help.")
    b.add_argument("name", help="builder name, e.g. phantoms, vqa-rad")
    b.add_argument("options", nargs=argparse.REMAINDER, help="--out DIR and other --option value pairs")
    b.set_defaults(func=_cmd_build)
    pr = sub.add_parser("prepare", help="tokenize a training config's records into the record store cache",
                        description="Build the memory-mapped record stores (medm.data.store) that `medm train CONFIG` "
                                    "would open: training files, mixture entries and validation records, tokenized "
                                    "by data.num_proc processes (default: every core) into data.cache_dir. Run it "
                                    "once on one machine with data.cache_dir on a shared disk; every rank and node "
                                    "of the job then opens the same files.")
    pr.add_argument("config", help="train YAML")
    pr.add_argument("overrides", nargs="*", help="key=value overrides, as for medm train (e.g. data.num_proc=16 "
                                                  "data.cache_dir=/shared/medm-cache)")
    pr.set_defaults(func=_cmd_prepare)
    s = sub.add_parser("split", help="split a file into train / dev by group (study, image), deterministic per seed",
                       description="Items sharing the --by value go to the same side; groups are shuffled with "
                                   "--seed and round(dev-ratio * groups) go to dev. Writes OUT/train.json and "
                                   "OUT/dev.json in the input's shape.")
    s.add_argument("file", help="JSON list, JSONL, or a JSON object holding the list under --list-key")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--dev-ratio", type=float, default=0.1, help="share of groups that go to dev (default 0.1)")
    s.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    s.add_argument("--by", default="study_id", help="item field that forms the groups (default study_id; records: "
                                                    "image)")
    s.add_argument("--list-key", default="studies", help="key of the item list when the file is a JSON object "
                                                         "(default studies, the spine label schema)")
    s.set_defaults(func=_cmd_split)
