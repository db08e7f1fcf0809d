"""Fixtures for the robustness matrix: the training tests' helpers and bright/dark toy data (tests/train)."""

import sys
from pathlib import Path

import pytest

# The tiny training setup (configs, toy data, subprocess env) lives with the training tests; reuse it, not a copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from train_helpers import write_bright_dark  # noqa: E402


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """16 bright (answer yes) / dark (answer no) 32 px images with LLaVA records: train.json."""
    return write_bright_dark(tmp_path_factory.mktemp("toy"))
