"""Fixtures for chat and serve tests: tiny 2D and 3D checkpoints, a picture of each kind, and an API server on a
free loopback port (uvicorn in a thread of the test process)."""

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medm.models import build_model, save_model
from medm.models.tiny import tiny_model_config

REPO = Path(__file__).resolve().parents[2]


def _save(cfg, out: Path, redraw: bool) -> Path:
    """Seeded tiny model; `redraw` sets its matrices to std 0.3 so greedy answers run for several tokens."""
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    if redraw:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.3)
    save_model(model, tok, str(out))
    return out


@pytest.fixture(scope="session")
def ckpt2d(tmp_path_factory) -> Path:
    return _save(tiny_model_config(), tmp_path_factory.mktemp("ckpt2d"), redraw=True)


@pytest.fixture(scope="session")
def ckpt3d(tmp_path_factory) -> Path:
    from medm.config import load_yaml

    return _save(load_yaml(str(REPO / "configs" / "model" / "tiny-3d.yaml")), tmp_path_factory.mktemp("ckpt3d"),
                 redraw=True)


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """Two random 32 px PNGs and a (12, 20, 20) uint8 .npy volume."""
    out = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out / name)
    np.save(out / "v.npy", np.random.default_rng(0).integers(0, 256, (12, 20, 20)).astype(np.uint8))
    return {"png": out / "a.png", "png2": out / "b.png", "npy": out / "v.npy"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`build_app` served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the API server did not start")
            time.sleep(0.05)

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key="unused", max_retries=0, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="session")
def serve_app():
    """Start an API server: `serve_app(ckpt_dir, **build_app kwargs)` -> Server (stopped at the end)."""
    from medm.infer import GenerationSettings, Predictor
    from medm.serve.api import build_app

    servers = []

    def start(ckpt: Path, **kw) -> Server:
        predictor = Predictor.from_pretrained(str(ckpt))
        kw.setdefault("defaults", GenerationSettings(max_new_tokens=8))
        srv = Server(build_app(predictor, "tiny", **kw))
        srv.predictor = predictor
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()
