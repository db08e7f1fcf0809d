"""Fixtures for playground tests: a tiny checkpoint, demo-like phantom examples, and one server for the session
(helpers: playground_helpers.py)."""

from pathlib import Path

import pytest
import torch
from playground_helpers import start_server, stop_server

from medm.models import build_model, save_model
from medm.models.tiny import tiny_model_config


@pytest.fixture(scope="session")
def playground_ckpt(tmp_path_factory) -> Path:
    """A full checkpoint of the tiny model whose matrices are redrawn with std 0.3 (seeded), so that greedy answers
    run for many tokens instead of ending at once."""
    torch.manual_seed(0)
    model, tok = build_model(tiny_model_config())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("ckpt")
    save_model(model, tok, str(out))
    return out


@pytest.fixture(scope="session")
def phantom_records(tmp_path_factory) -> Path:
    """The demo's phantom test file (a few images, every question kind)."""
    from medm.data.builders.phantoms import build_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    return Path(build_phantoms(str(out), n_train=1, n_test=3, seed=0)["test"])


@pytest.fixture(scope="session")
def server(tmp_path_factory, playground_ckpt, phantom_records):
    """`python playground.py --model <tiny> --examples <phantoms>` on a free loopback port, shared by the tests.

    At the end it is stopped with SIGTERM and must exit cleanly, leaving nothing in its TMPDIR: uploads lived in
    the app's own temp dir."""
    srv = start_server(playground_ckpt, tmp_path_factory.mktemp("server"), phantom_records)
    yield srv
    code = stop_server(srv)
    assert code == 0, srv.log_text()
    left = sorted(p.name for p in srv.tmp.iterdir())
    assert not left, f"the playground left {left} in its temp dir"
