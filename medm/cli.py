"""`medm` command line: `medm list | train | infer | eval | data | demo | export ...`.

Each subcommand is a thin function here or in its own module; logic lives in the library.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_list(args: argparse.Namespace) -> int:
    from medm.registry import REGISTRIES

    for kind, reg in REGISTRIES.items():
        print(f"{kind} ({reg.kind}): {', '.join(reg.names())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medm", description=__doc__.splitlines()[0])
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option, so `a.b=c` overrides written after an option
    # come back as extras: they still belong to the command's overrides, in the order given.
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
