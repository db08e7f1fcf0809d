"""Shared fixtures: tiny offline models and the path to ../shared/data (tests using it skip when absent)."""

import os
from pathlib import Path

import pytest
import torch

# Tests never download: any hub access is an error.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDM_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _session_record_cache(tmp_path_factory):
    """Record stores (medm.data.store) built by module- and session-scoped fixtures (set up before any test's own
    fixtures) go to a temporary directory too, never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDM_CACHE_DIR", str(tmp_path_factory.mktemp("records-session")))
        yield


@pytest.fixture(autouse=True)
def record_cache(tmp_path_factory, monkeypatch) -> Path:
    """Record stores (medm.data.store) go to a fresh temporary directory, never ~/.cache (subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("records")
    monkeypatch.setenv("MEDM_CACHE_DIR", str(path))
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set MEDM_DATA_DIR)")
    return SHARED_DATA


@pytest.fixture
def tiny_model():
    """(model, tokenizer): CLIP + mlp2x_gelu + tiny Qwen2, random weights, seeded."""
    from medm.models import build_model
    from medm.models.tiny import tiny_model_config

    torch.manual_seed(0)
    model, tok = build_model(tiny_model_config())
    return model.eval(), tok
