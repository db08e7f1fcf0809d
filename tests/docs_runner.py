"""Run the docs' shell blocks for tests/test_docs.py: `python tests/docs_runner.py JOBS.json ROOT` writes
ROOT/results.json.

One process runs every block, so the package is imported once: a command that is `medm ARGS` and nothing else runs
as `medm.cli.main(ARGS)` (the console script's own entry point) in this process; any other command runs through
`bash -euo pipefail -c`. A page's blocks run in order in one fresh folder under ROOT (as a reader following the
page would), which links the repository's `configs/`, `scripts/` and `benchmarks/`. A synopsis runs
`medm SUBCOMMAND --help` for each command it shows.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINKED = ("configs", "scripts", "benchmarks", "playground.py")
SHELL_SYNTAX = re.compile(r"[|&;<>$`()]|^\s*\w+=")  # pipes, lists, redirections, variables, env prefixes


def commands(script: str, synopsis: bool = False) -> list[str]:
    """The commands of a block: continuation lines joined (in a synopsis, indented lines continue the one above too),
    comment and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", script)
    if synopsis:
        joined = re.sub(r"\n[ \t]+", " ", joined)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _in_process(argv: list[str]) -> tuple[int, str]:
    from medm.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: --help exits 0, a usage error 2
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:
            traceback.print_exc(file=out)
            rc = 1
    return rc, out.getvalue()


def run_command(cmd: str, cwd: Path) -> tuple[int, str]:
    argv = shlex.split(cmd, comments=True)
    os.chdir(cwd)
    if argv and argv[0] == "medm" and not SHELL_SYNTAX.search(cmd.split("#")[0]):
        return _in_process(argv[1:])
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def synopsis_prefix(cmd: str) -> list[str]:
    """`medm data build NAME --out DIR [...]` -> [medm, data, build]: the words before the first placeholder,
    option, bracket or path."""
    words = []
    for w in shlex.split(cmd, comments=True):
        if not re.fullmatch(r"[a-z][a-z0-9-]*", w):
            break
        words.append(w)
    return words


def main() -> int:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    root = Path(sys.argv[2])
    results = []
    folders: dict[str, Path] = {}
    for job in jobs:
        page = job["page"]
        if page not in folders:
            folders[page] = root / re.sub(r"\W", "_", page)
            folders[page].mkdir(parents=True)
            for name in LINKED:
                (folders[page] / name).symlink_to(REPO / name)
        cwd, log, ok = folders[page], [], True
        for cmd in commands(job["script"], job["mode"] == "synopsis"):
            if job["mode"] == "synopsis":
                prefix = synopsis_prefix(cmd)
                if prefix[:1] != ["medm"]:
                    ok, log = False, log + [f"$ {cmd}\na synopsis shows medm commands; mark this block otherwise"]
                    break
                cmd = shlex.join([*prefix, "--help"])
            rc, text = run_command(cmd, cwd)
            log.append(f"$ {cmd}\n{text[-3000:]}")
            if rc != 0:
                ok = False
                log.append(f"exit status {rc}")
                break
        results.append({"id": job["id"], "ok": ok, "log": "\n".join(log)})
        os.chdir(root)
    (root / "results.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
