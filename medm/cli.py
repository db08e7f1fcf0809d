"""`medm` command line: `medm list | train | infer | eval | data | demo | export ...`.

Each subcommand is a thin function here or in its own module; logic lives in the library.
"""

from __future__ import annotations

import argparse
import os
import sys

from medm._accelerator import name_accelerator_for_deepspeed
from medm.registry import REGISTRIES


def _cmd_list(args: argparse.Namespace) -> int:
    for kind, reg in REGISTRIES.items():
        print(f"{kind} ({reg.kind}): {', '.join(reg.names())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medm", description=__doc__.splitlines()[0],
                                     epilog="Errors you can fix are printed as one line; MEDM_DEBUG=1 or --debug "
                                            "(anywhere on the line) shows the traceback.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (as MEDM_DEBUG=1 does)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="print every registered component name")
    p.set_defaults(func=_cmd_list)
    # Subcommands from other modules register themselves here: (module, function that adds parsers).
    for module in _SUBCOMMAND_MODULES:
        __import__(module, fromlist=["add_parsers"]).add_parsers(sub)
    return parser


# Each module defines `add_parsers(subparsers)` that adds its commands with `set_defaults(func=...)`.
_SUBCOMMAND_MODULES: list[str] = ["medm.data.cli", "medm.train.cli", "medm.demo", "medm.infer.cli", "medm.eval.cli",
                                   "medm.interop.cli", "medm.playground.cli", "medm.estimate",
                                   "medm.serve.cli"]


# Builtin errors that mean a file or folder the user named is missing or unreadable, not a bug.
_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def user_error(e: BaseException) -> bool:
    """An error the user can fix from its message: one of medm's own error classes (ConfigError, VolumeLoadError,
    TemplateError, ...: each names the setting, file, record or checkpoint), or a named file that is missing."""
    return type(e).__module__.split(".")[0] == "medm" or isinstance(e, _FILE_ERRORS)


def _settings_hint(extra: list[str]) -> str:
    """For `medm train cfg.yaml --model x`: settings are `key=value`, not options."""
    flag = next(e for e in extra if e.startswith("--"))
    key, _, value = flag[2:].partition("=")
    if not value:
        after = extra[extra.index(flag) + 1:]
        value = after[0] if after and not after[0].startswith("-") else "VALUE"
    return (f"; settings are key=value overrides after the YAML, not options: write {key.replace('-', '_')}={value} "
            f"(dotted for nested keys, e.g. train.max_steps=10); --help lists the keys")


# Commands that train or save models: transformers imports DeepSpeed (when installed) to unwrap a model it saves.
_SAVING_COMMANDS = ("train", "demo", "export", "import")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug may stand anywhere on the line, so a failing command is rerun by adding it at the end.
    debug = "--debug" in argv or os.environ.get("MEDM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option, so `a.b=c` overrides written after an option
    # come back as extras: they still belong to the command's overrides, in the order given.
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        hint = _settings_hint(extra) if hasattr(args, "overrides") and any(e.startswith("--") for e in extra) else ""
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    if args.command in _SAVING_COMMANDS:
        name_accelerator_for_deepspeed()
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if debug or not user_error(e):
            raise
        message = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        print(f"error: {message}", file=sys.stderr)
        return 1 if isinstance(e, RuntimeError) else 2


if __name__ == "__main__":
    sys.exit(main())
