"""Named registries of swappable parts: configs name components, never import paths."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from medm.config import closest


class UnknownNameError(KeyError):
    """A name no component is registered under; the message lists the known names."""

    def __str__(self) -> str:  # KeyError's own str() is the repr of its message
        return str(self.args[0]) if self.args else ""


class Registry:
    """A name -> factory table.

    Example:
        >>> VISION = Registry("vision encoder")
        >>> @VISION.register("clip")
        ... class ClipEncoder: ...
        >>> VISION.build("clip", **cfg)
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items and self._items[name] is not obj:
                raise KeyError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            self._items[name] = obj
            try:  # lets a component report the name it was built under
                obj.registry_name = name
            except (AttributeError, TypeError):
                pass
            return obj

        return wrap

    def get(self, name: str) -> Callable[..., Any]:
        _load_components()
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            best = closest(name, self._items)
            hint = f" did you mean {best}?" if best else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r};{hint} known: {known}")
        return self._items[name]

    def build(self, name: str, **cfg: Any) -> Any:
        return self.get(name)(**cfg)

    def names(self) -> list[str]:
        _load_components()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        _load_components()
        return name in self._items


VISION = Registry("vision encoder")
CONNECTOR = Registry("connector")
LLM = Registry("LLM family")
TEMPLATE = Registry("chat template")
BUILDER = Registry("data builder")
TASK = Registry("eval task")
# Model kinds (medm.models.kind.ModelKind): how a model config builds, a checkpoint loads, records become a dataset
# and a model answers; `model.kind` in the YAML names one.
KIND = Registry("model kind")
DEFAULT_KIND = "medm"  # `model.kind` when unset; also the kind of a checkpoint no other kind claims

REGISTRIES = {"vision": VISION, "connector": CONNECTOR, "llm": LLM, "template": TEMPLATE, "builder": BUILDER,
              "task": TASK, "kind": KIND}


# Plugin folders: every module there whose name does not start with `_` registers its components when imported, so a
# new component is one file in its folder (no import line to add). Registries filled by one module list it here.
PLUGIN_FOLDERS = ("medm.models.vision", "medm.models.connectors", "medm.data.builders", "medm.eval.tasks")
PLUGIN_MODULES = ("medm.models.llm", "medm.data.templates", "medm.models.kind", "medm.qwenvl.kind")
_loaded = False


def import_folder(package: str) -> list[str]:
    """Import every public module (name not starting with `_`) of a package folder; returns their names."""
    pkg = importlib.import_module(package)
    names = sorted(info.name for info in pkgutil.iter_modules(pkg.__path__) if not info.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


def _load_components() -> None:
    # On first lookup, not at import, so `medm.registry` itself (and `medm --help`) stays import-cheap.
    global _loaded
    if _loaded:
        return
    _loaded = True  # set first: a component module that looks a name up while loading must not recurse
    try:
        for module in PLUGIN_MODULES:
            importlib.import_module(module)
        for package in PLUGIN_FOLDERS:
            import_folder(package)
    except BaseException:
        _loaded = False  # the next lookup raises the import error again instead of seeing a partial registry
        raise
