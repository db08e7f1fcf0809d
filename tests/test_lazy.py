"""Packages load their public names on first use (medm._lazy): a name resolves to the object of the module it
lives in, an unknown one is an AttributeError naming the package, and `__all__` lists what resolves."""

import importlib

import pytest

PACKAGES = ["medm.infer", "medm.interop", "medm.playground", "medm.qwenvl", "medm.serve", "medm.train"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_listed_name_resolves_to_its_modules_object(package):
    pkg = importlib.import_module(package)
    for name in pkg.__all__:
        assert getattr(pkg, name) is getattr(importlib.import_module(pkg._EXPORTS[name]), name)
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nope'"):
        pkg.nope
