"""Named registries of swappable parts: configs name components, never import paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


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
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}")
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

REGISTRIES = {"vision": VISION, "connector": CONNECTOR, "llm": LLM, "template": TEMPLATE, "builder": BUILDER,
              "task": TASK}


def _load_components() -> None:
    # Registration happens when a component's module is imported; import the packages that hold
    # them on first lookup, so `medm.registry` itself stays import-cheap.
    import medm.data.builders  # noqa: F401
    import medm.data.templates  # noqa: F401
    import medm.eval.tasks  # noqa: F401
    import medm.models.connectors  # noqa: F401
    import medm.models.llm  # noqa: F401
    import medm.models.vision  # noqa: F401
