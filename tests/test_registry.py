"""The registries find components by their files: every public module of a plugin folder is imported at the first
lookup (no import line to add), `medm --help` stays free of torch, and every component carries its own tiny preset."""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from medm import registry
from medm.models.tiny import tiny_connector, tiny_vision
from medm.registry import CONNECTOR, VISION

REPO = Path(__file__).resolve().parents[1]


def test_every_public_module_of_every_plugin_folder_is_loaded_at_first_lookup():
    VISION.names()
    for package in registry.PLUGIN_FOLDERS:
        folder = importlib.import_module(package).__path__
        public = [m.name for m in pkgutil.iter_modules(folder) if not m.name.startswith("_")]
        assert public, package
        missing = [name for name in public if f"{package}.{name}" not in sys.modules]
        assert not missing, f"{package}: {missing} not imported by the registry"
    # Each registered encoder's class lives in a module of the folder.
    folder = importlib.import_module("medm.models.vision").__path__
    modules = {f"medm.models.vision.{m.name}" for m in pkgutil.iter_modules(folder)}
    assert {VISION.get(n).__module__ for n in VISION.names()} <= modules

def test_a_failed_plugin_import_is_raised_again_at_the_next_lookup(monkeypatch, tmp_path):
    (tmp_path / "broken_plugins").mkdir()
    (tmp_path / "broken_plugins" / "__init__.py").write_text("")
    (tmp_path / "broken_plugins" / "bad.py").write_text("raise RuntimeError('bad plugin file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "PLUGIN_FOLDERS", (*registry.PLUGIN_FOLDERS, "broken_plugins"))
    monkeypatch.setattr(registry, "_loaded", False)
    for _ in range(2):  # not a silently partial registry the second time
        with pytest.raises(RuntimeError, match="bad plugin file"):
            VISION.names()


def test_medm_help_and_the_registry_module_import_no_torch():
    code = ("import sys\nfrom medm.cli import main\nimport medm.registry\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'medm --help imported torch'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()


def test_every_component_has_its_own_tiny_preset():
    for name in VISION.names():
        if name == "hf":  # the generic encoder's twin keeps the section's model_type
            assert tiny_vision(name, {"model_type": "vit"})["model_type"] == "vit"
            continue
        settings = tiny_vision(name)
        assert settings == VISION.get(name).tiny() and settings is not tiny_vision(name)  # a fresh copy each time
    for name in CONNECTOR.names():
        assert tiny_connector(name) == CONNECTOR.get(name).tiny()
    with pytest.raises(KeyError, match="unknown vision encoder 'nope'"):
        tiny_vision("nope")
