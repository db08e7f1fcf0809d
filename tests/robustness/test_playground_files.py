"""The playground serves the example images and nothing else of their folder (issue 26 item 2): with `--examples`,
other files beside them (secrets, dotfiles, subfolders) are refused, also to clients on the network."""

import json
import sys
from pathlib import Path

import httpx
import pytest

from medm.models import build_model, save_model
from medm.models.tiny import tiny_model_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "playground"))

from playground_helpers import start_server, stop_server, write_png  # noqa: E402

pytestmark = pytest.mark.slow


def test_only_the_example_images_are_served(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_model(*build_model(tiny_model_config()), str(ckpt))
    cases = tmp_path / "cases"
    (cases / "images").mkdir(parents=True)
    (cases / "sub" / ".ssh").mkdir(parents=True)
    write_png(cases / "images" / "a.png")
    write_png(cases / "images" / "other.png", seed=1)  # an image no example uses
    (cases / "secret.txt").write_text("secret")
    (cases / ".env").write_text("TOKEN=x")
    (cases / "images" / "notes.txt").write_text("private")
    (cases / "sub" / ".ssh" / "id_rsa").write_text("key")
    records = cases / "test.json"
    records.write_text(json.dumps([{"id": "a", "image": ["images/a.png"], "conversations": [
        {"from": "human", "value": "<image>\nIs it bright?"}, {"from": "gpt", "value": "yes"}]}]))
    server = start_server(ckpt, tmp_path / "server", records)
    try:
        def get(path: Path) -> int:
            return httpx.get(f"{server.url}gradio_api/file={path.resolve()}", timeout=10).status_code

        assert get(cases / "images" / "a.png") == 200, server.log_text()  # the example itself still shows
        for private in ("secret.txt", ".env", "images/notes.txt", "images/other.png", "sub/.ssh/id_rsa",
                        "test.json"):
            assert get(cases / private) != 200, private
    finally:
        stop_server(server)
