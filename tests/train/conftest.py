"""Fixtures for training tests."""

from pathlib import Path

import pytest
from train_helpers import write_bright_dark


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """16 bright (answer yes) / dark (answer no) 32 px images with LLaVA records: train.json."""
    return write_bright_dark(tmp_path_factory.mktemp("toy"))
