"""The playground server driven through gradio_client: streamed multi-turn chat about an image, a volume with its
slice viewer, error messages for bad uploads, regenerate / clear, and several users at once."""

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from playground_helpers import marker_volume, write_nifti, write_png

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

MAX_NEW_TOKENS = 16


def _client(server) -> Client:
    # download_files=False: file outputs come back as the server's own paths (checked to be in its temp dir).
    return Client(server.url, verbose=False, download_files=False)


def _text(message: dict) -> str:
    return "".join(part["text"] for part in message["content"] if part.get("type") == "text")


def _files(message: dict) -> list[dict]:
    """The file parts of a chat message: {"file": FileData, "alt_text": ...}."""
    return [part for part in message["content"] if part.get("type") == "file"]


def _send(client: Client, question: str):
    """Send a question; returns (final chat, every streamed answer text in order)."""
    job = client.submit(question, 0.0, 1.0, MAX_NEW_TOKENS, api_name="/send")
    chat, box = job.result(timeout=120)
    assert box == ""  # the question box is emptied
    streamed = [_text(out[0][-1]) for out in job.outputs() if out[0] and out[0][-1]["role"] == "assistant"]
    return chat, streamed


def _path(value) -> str:
    return value["path"] if isinstance(value, dict) else value.path if hasattr(value, "path") else value


def test_two_turn_chat_about_an_image_streams_its_answers(server, tmp_path):
    client = _client(server)
    preview, slider, caption = client.predict(handle_file(write_png(tmp_path / "scan.png")), "default",
                                              api_name="/upload")
    assert caption == "scan.png: 40 x 48 image, window default"
    assert _path(preview).startswith(str(server.tmp))  # the upload and its preview stay in the app's temp dir

    chat, streamed = _send(client, "Is there a lesion?")
    assert [m["role"] for m in chat] == ["user", "assistant"]
    answer = _text(chat[1])
    assert answer and streamed[-1] == answer
    # Streamed token by token: several partial answers, each growing the one before.
    partial = [t for t in dict.fromkeys(streamed) if t]
    assert len(partial) >= 3, streamed
    assert all(b.startswith(a) for a, b in zip(partial, partial[1:]))
    shown = _files(chat[0])  # the question shows the picture the model was given
    assert len(shown) == 1 and _path(shown[0]["file"]).startswith(str(server.tmp))

    chat2, streamed2 = _send(client, "Where is it?")
    assert [m["role"] for m in chat2] == ["user", "assistant", "user", "assistant"]
    assert _text(chat2[1]) == answer and _text(chat2[2]) == "Where is it?"
    assert not _files(chat2[2])  # the second question does not repeat the picture
    assert len([t for t in dict.fromkeys(streamed2) if t]) >= 2 and _text(chat2[3])

    job = client.submit(0.0, 1.0, MAX_NEW_TOKENS, api_name="/regenerate")
    chat3 = job.result(timeout=120)
    assert len(chat3) == 4 and _text(chat3[3]) == _text(chat2[3])  # greedy: the same answer again
    assert client.predict(api_name="/clear") == []


def test_bad_upload_shows_an_error_and_the_app_keeps_answering(server, tmp_path):
    client = _client(server)
    (tmp_path / "notes.txt").write_text("hello")
    preview, _, caption = client.predict(handle_file(tmp_path / "notes.txt"), "default", api_name="/upload")
    assert preview is None
    assert caption.startswith("**Error:** cannot open 'notes.txt': not a recognised image format")
    chat, _ = _send(client, "What is this?")  # a text-only question still gets an answer
    assert [m["role"] for m in chat] == ["user", "assistant"] and not _files(chat[0]) and _text(chat[1])


def test_uploads_above_the_size_limit_are_refused(server, tmp_path):
    import httpx

    big = tmp_path / "big.npy"
    np.save(big, np.zeros((3 * 1024**2 // 4,), np.float32))  # 3 MB, above the server's 2 MB limit
    # The page (and gradio_client) read the limit from the server's config and refuse before sending...
    with pytest.raises(ValueError, match="exceeds the maximum file size of 2097152 bytes"):
        _client(server).predict(handle_file(big), "default", api_name="/upload")
    # ... and the server refuses it anyway.
    with big.open("rb") as f:
        r = httpx.post(server.url + "gradio_api/upload", files={"files": ("big.npy", f)}, timeout=30)
    assert r.status_code == 413


def test_volume_gets_a_slice_viewer_and_the_model_sees_the_slice_shown(server, tmp_path):
    client = _client(server)
    path = write_nifti(tmp_path / "ct.nii.gz", marker_volume((20, 10, 6)))
    _, slider, caption = client.predict(handle_file(path), "lung", api_name="/upload")
    assert slider["visible"] is True and slider["maximum"] == 5 and slider["value"] == 3
    assert caption == "ct.nii.gz: axial slice 4 of 6, window lung"
    _, caption = client.predict(0, api_name="/select_slice")
    assert caption == "ct.nii.gz: axial slice 1 of 6, window lung"
    _, caption = client.predict("bone", api_name="/select_window")
    assert caption == "ct.nii.gz: axial slice 1 of 6, window bone"
    chat, _ = _send(client, "Any bright spot?")
    (shown,) = _files(chat[0])
    assert shown["alt_text"] == caption and _text(chat[1])


def test_eight_users_at_once_all_get_answers(server, tmp_path):
    images = [write_png(tmp_path / f"u{i}.png", seed=i) for i in range(8)]

    def user(i: int) -> tuple[int, str]:
        client = _client(server)
        client.predict(handle_file(images[i]), "default", api_name="/upload")
        chat, _ = _send(client, f"Question {i}?")
        return i, chat

    t0 = time.time()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(user, range(8)))
    assert time.time() - t0 < 90
    for i, chat in results:  # each session saw only its own conversation
        assert [m["role"] for m in chat] == ["user", "assistant"]
        assert _text(chat[0]) == f"Question {i}?" and _text(chat[1])
