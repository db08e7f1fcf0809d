"""Fixtures for the qwen-vl kind (helpers: qwenvl_helpers.py): phantom data, one CPU thread."""

import pytest
import torch

from medm.data.builders.phantoms import build_phantoms


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tiny models run far faster on one thread than on two oversubscribed ones (shared CI machines).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> dict[str, str]:
    """A small phantom VQA set (64 px grayscale): train.json (24 images), test.json (6), captions.json, images/."""
    out = tmp_path_factory.mktemp("phantoms")
    paths = build_phantoms(str(out), n_train=24, n_test=6, seed=0)
    return {**paths, "image_dir": str(out)}
