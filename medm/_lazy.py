"""Names a package loads on first use (PEP 562), so `medm.cli` can import a package's `cli` module without importing
torch or transformers."""

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """The module `__getattr__` of `package`: `name` -> that attribute of the module `exports[name]`, imported then.

    Use as `__getattr__ = lazy_exports(__name__, _EXPORTS)` in the package's `__init__.py`.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(exports[name]), name)

    return __getattr__
