"""Reading Google-style docstrings: the `Args:` text of a function or class (the config reference, and the
`--help` of `medm data build NAME`, come from it)."""

from __future__ import annotations

import inspect
import re
from typing import Any


def docstring_args(obj: Any) -> dict[str, str]:
    """`name -> text` from the `Args:` (or `Attributes:`) section of a Google-style docstring.

    An entry may name several parameters (`in_dim, out_dim: ...` or `a / b: ...`); continuation lines are joined.
    """
    doc = inspect.getdoc(obj) or ""
    found: dict[str, str] = {}
    lines = doc.splitlines()
    in_section, current = False, []
    for line in lines:
        if re.match(r"^(Args|Arguments|Attributes):\s*$", line):
            in_section, current = True, []
            continue
        if not in_section:
            continue
        if line and not line.startswith(" "):  # the section ended
            in_section = False
            continue
        entry = re.match(r"^ {4}([A-Za-z_][\w, /]*?):\s*(.*)$", line)
        if entry:
            current = [n.strip() for n in re.split(r"[,/]", entry.group(1))]
            for name in current:
                found[name] = entry.group(2).strip()
        elif line.startswith(" " * 8) and current:
            for name in current:
                found[name] = (found[name] + " " + line.strip()).strip()
    return found
