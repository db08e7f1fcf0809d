"""Fixtures for inference tests: a saved tiny checkpoint (helpers: infer_helpers.py)."""

from pathlib import Path

import pytest
import torch

from medm.models import build_model, save_model
from medm.models.tiny import tiny_model_config


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A full checkpoint of the tiny model, random weights (seeded) whose matrices are redrawn with std 0.3: the
    default init answers every question with the same token, these answers vary and depend on the image."""
    torch.manual_seed(0)
    model, tok = build_model(tiny_model_config())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("ckpt")
    save_model(model, tok, str(out))
    return out
