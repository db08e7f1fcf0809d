"""`medm serve`: the OpenAI-compatible API driven by the `openai` client against tiny 2D and 3D checkpoints."""

import base64
import threading
import time

import httpx
import openai
import pytest

from medm.data.annotations import Record
from medm.infer import GenerationSettings

SHORT = GenerationSettings(max_new_tokens=8)


def data_url(path, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def user(text, *pictures) -> list[dict]:
    return [{"role": "user", "content": [*pictures, {"type": "text", "text": text}]}]


def expected(predictor, question, image=None, volume=None) -> str:
    """What the predictor answers alone, greedy, to the same turn."""
    tag = "<image3d>\n" if volume else "<image>\n" if image else ""
    rec = Record(id="x", conversations=[{"from": "human", "value": tag + question}],
                 image=[str(image)] if image else [], image3d=[str(volume)] if volume else [])
    return next(iter(predictor.predict([rec], batch_size=1, settings=SHORT)))[1]


@pytest.fixture(scope="module")
def srv(serve_app, ckpt2d):
    return serve_app(ckpt2d)


def test_models_lists_the_served_model(srv):
    assert [m.id for m in srv.client().models.list()] == ["tiny"]


def test_a_data_url_image_gets_the_predictors_answer(srv, media):
    out = srv.client().chat.completions.create(
        model="tiny", messages=user("Is there a lesion?", {"type": "image_url", "image_url": {"url": data_url(
            media["png"])}}))
    want = expected(srv.predictor, "Is there a lesion?", image=media["png"])
    assert want and out.choices[0].message.content == want
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens > 0 and out.usage.prompt_tokens > srv.predictor.model.num_image_tokens


def test_streaming_sends_the_same_answer_in_pieces(srv, media):
    pic = {"type": "image_url", "image_url": {"url": str(media["png"])}}  # a local path
    pieces = [c.choices[0].delta.content for c in srv.client().chat.completions.create(
        model="tiny", messages=user("Is there a lesion?", pic), stream=True) if c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == expected(srv.predictor, "Is there a lesion?", image=media["png"])


def test_file_url_and_multi_turn_text(srv, media):
    msgs = [{"role": "system", "content": "Answer briefly."},
            *user("Describe it.", {"type": "image_url", "image_url": {"url": f"file://{media['png2']}"}}),
            {"role": "assistant", "content": "A scan."}, {"role": "user", "content": "Anything else?"}]
    out = srv.client().chat.completions.create(model="tiny", messages=msgs)
    assert isinstance(out.choices[0].message.content, str)


def test_concurrent_requests_share_one_batch(srv, media):
    batcher = srv.app.state.batcher
    questions = [("Is there a lesion?", media["png"]), ("What organ is shown?", media["png2"]),
                 ("Is it normal?", media["png"])]
    answers = [None] * len(questions)

    def ask(i, q, image):
        out = srv.client().chat.completions.create(
            model="tiny", messages=user(q, {"type": "image_url", "image_url": {"url": data_url(image)}}))
        answers[i] = out.choices[0].message.content

    with batcher.lock:  # the model is busy: the requests queue up
        threads = [threading.Thread(target=ask, args=(i, q, im)) for i, (q, im) in enumerate(questions)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while batcher.waiting < len(questions) and time.time() < deadline:
            time.sleep(0.02)
        assert batcher.waiting == len(questions)
    for t in threads:
        t.join(60)
    assert batcher.batch_sizes[-1] == len(questions)
    assert answers == [expected(srv.predictor, q, image=im) for q, im in questions]


@pytest.mark.parametrize("kwargs, status, match", [
    ({"model": "other"}, 404, "'other' is not served here; this server serves 'tiny'"),
    ({"n": 2}, 400, "`n` must be 1"),
    ({"temperature": -1}, 400, "`temperature` must be in"),
    ({"messages": user("Hi", {"type": "image_url", "image_url": {"url": "https://example.org/x.png"}})}, 400,
     "does not download URLs"),
    ({"messages": user("Hi", {"type": "image_url", "image_url": {"url": "/no/such.png"}})}, 400,
     "no such file on the server: '/no/such.png'"),
    ({"messages": user("Hi", {"type": "volume_url", "volume_url": {"url": "data:;base64,AAAA"}})}, 400,
     "give the volume's `format`"),
])
def test_bad_requests_get_openai_errors_naming_the_field(srv, kwargs, status, match):
    body = {"model": "tiny", "messages": user("Hi"), **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        srv.client().chat.completions.create(**body)
    assert e.value.status_code == status and match in e.value.message


def test_a_volume_for_a_2d_model_is_an_error_for_that_request_only(srv, media):
    vol = {"type": "volume_url", "volume_url": {"url": str(media["npy"])}}
    with pytest.raises(openai.BadRequestError, match="this model has no 3D encoder"):
        srv.client().chat.completions.create(model="tiny", messages=user("Any lesion?", vol))
    assert srv.client().chat.completions.create(model="tiny", messages=user("Hi")).choices[0].message.content


def test_limits_on_request_size_and_concurrency(serve_app, ckpt2d, media):
    srv = serve_app(ckpt2d, max_request_bytes=4096, max_concurrency=1)
    big = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 8000}}
    with pytest.raises(openai.APIStatusError, match="at most 4,096") as e:
        srv.client().chat.completions.create(model="tiny", messages=user("Hi", big))
    assert e.value.status_code == 413
    with srv.app.state.batcher.lock:
        first = threading.Thread(target=lambda: srv.client().chat.completions.create(model="tiny",
                                                                                     messages=user("Hi")))
        first.start()
        deadline = time.time() + 30
        while srv.app.state.batcher.waiting < 1 and time.time() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError, match="busy: 1 requests in flight"):
            srv.client().chat.completions.create(model="tiny", messages=user("Hi"))
    first.join(60)
    # The in-flight count comes back down: the next request is answered.
    assert srv.client().chat.completions.create(model="tiny", messages=user("Hi")).choices[0].message.content


def test_3d_volumes_as_data_url_and_path(serve_app, ckpt3d, media):
    srv = serve_app(ckpt3d)
    want = expected(srv.predictor, "Any lesion?", volume=media["npy"])
    inline = {"type": "volume_url", "volume_url": {"url": data_url(media["npy"], "application/octet-stream"),
                                                   "format": "npy"}}
    out = srv.client().chat.completions.create(model="tiny", messages=user("Any lesion?", inline))
    assert want and out.choices[0].message.content == want
    path = {"type": "volume_url", "volume_url": {"url": str(media["npy"])}}
    pieces = [c.choices[0].delta.content for c in srv.client().chat.completions.create(
        model="tiny", messages=user("Any lesion?", path), stream=True) if c.choices[0].delta.content]
    assert "".join(pieces) == want
    assert httpx.get(srv.url.replace("/v1", "/health")).json()["in_flight"] == 0


@pytest.mark.slow
def test_medm_serve_command_answers_and_stops_on_sigterm(ckpt2d, media, tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "serve.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "medm.cli", "serve", "--model", str(ckpt2d), "--port",
                                 str(port), "--device", "cpu", "--max-new-tokens", "8"], cwd=repo, env=env,
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        name = ckpt2d.name  # the model id defaults to the checkpoint folder's name
        assert [m.id for m in client.models.list()] == [name]
        pic = {"type": "image_url", "image_url": {"url": data_url(media["png"])}}
        out = client.chat.completions.create(model=name, messages=user("Is there a lesion?", pic))
        from medm.infer import Predictor

        assert out.choices[0].message.content == expected(Predictor.from_pretrained(str(ckpt2d)), "Is there a lesion?",
                                                          image=media["png"])
    finally:
        proc.terminate()
        code = proc.wait(30)
    # uvicorn shuts down gracefully, then ends by the signal it caught (as a process killed by it would).
    assert code in (0, -15) and "Traceback" not in log.read_text(), log.read_text()
    assert f"on http://127.0.0.1:{port}/v1" in log.read_text()


def test_a_qwen_vl_checkpoint_serves_through_the_same_api(serve_app, media, tmp_path):
    from pathlib import Path

    import torch

    from medm.config import load_yaml
    from medm.models import build_model, save_model

    torch.manual_seed(0)
    repo = Path(__file__).resolve().parents[2]
    model, processor = build_model(load_yaml(str(repo / "configs" / "model" / "tiny-qwen2.5-vl.yaml")))
    with torch.no_grad():  # answers of several tokens, not an immediate end of turn
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    save_model(model, processor, str(tmp_path / "qwen"))
    srv = serve_app(tmp_path / "qwen")
    pic = {"type": "image_url", "image_url": {"url": data_url(media["png"])}}
    out = srv.client().chat.completions.create(model="tiny", messages=user("Is there a lesion?", pic))
    answer = out.choices[0].message.content
    assert answer and answer == expected(srv.predictor, "Is there a lesion?", image=media["png"])
    streamed = "".join(c.choices[0].delta.content or "" for c in srv.client().chat.completions.create(
        model="tiny", messages=user("Is there a lesion?", pic), stream=True))
    assert streamed == out.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="this model has no 3D encoder"):
        srv.client().chat.completions.create(model="tiny", messages=user("Any lesion?", {
            "type": "volume_url", "volume_url": {"url": str(media["npy"])}}))
