"""Stage plan modes (`frozen`, `full`, `lora`, `qlora`, `partial:N`) per component: parsed when a train config is
read (medm.train.args) and when a stage is applied (medm.train.stages)."""

from __future__ import annotations

from dataclasses import dataclass

from medm.config import ConfigError

ENCODERS = ("vision", "vision3d")
CONNECTORS = ("connector", "connector3d")
COMPONENTS = ("vision", "connector", "llm", "vision3d", "connector3d")
DEFAULT_MODES = {"vision": "frozen", "connector": "full", "llm": "full", "vision3d": "frozen", "connector3d": "full"}
ALLOWED = {"vision": ("frozen", "full", "lora", "partial"), "vision3d": ("frozen", "full", "lora", "partial"),
           "connector": ("frozen", "full", "lora"), "connector3d": ("frozen", "full", "lora"),
           "llm": ("frozen", "full", "lora", "qlora")}


@dataclass(frozen=True)
class Mode:
    """One component's mode; `blocks` is N of `partial:N`."""

    name: str  # frozen | full | lora | qlora | partial
    blocks: int = 0

    @property
    def trains(self) -> bool:
        return self.name != "frozen"

    @property
    def adapter(self) -> bool:
        return self.name in ("lora", "qlora")


def parse_mode(component: str, value: str) -> Mode:
    """`full` -> Mode("full"); `partial:2` -> Mode("partial", 2); errors name `stage.<component>`."""
    text = str(value).strip()
    name, _, n = text.partition(":")
    if name not in ALLOWED[component]:
        raise ConfigError(f"stage.{component}: {value!r} is not a mode for the {component}; "
                          f"valid: {', '.join('partial:N' if a == 'partial' else a for a in ALLOWED[component])}")
    if name == "partial":
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"stage.{component}: {value!r} must be partial:N with N >= 1 (the last N blocks)")
        return Mode(name, int(n))
    if n:
        raise ConfigError(f"stage.{component}: {value!r}: only partial takes a ':N'")
    return Mode(name)
