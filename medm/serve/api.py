"""`medm serve`: an OpenAI-compatible HTTP API over one model (`/v1/chat/completions`, `/v1/models`).

    medm serve --model runs/demo/finetune --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "finetune", "messages": [{"role": "user", "content": "Is there a lesion?"}]}'

Built on FastAPI (which Gradio brings); every request goes through one `Batcher`, so concurrent requests share
batched `generate` calls. Limits: at most `max_concurrency` requests in flight (queued or generating; more get 429)
and at most `max_request_bytes` per request body (413). Errors are OpenAI's JSON shape,
`{"error": {"message", "type", "param", "code"}}`. docs/serving.md has the request format, including 3D volumes.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from medm.infer import GenerationSettings
from medm.serve._batcher import Answer, Batcher, Job
from medm.serve._requests import RequestError, parse_request

__all__ = ["build_app"]


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def _from_exception(e: BaseException) -> JSONResponse:
    if isinstance(e, RequestError):
        return _error(e.status, str(e), e.param)
    if isinstance(e, (ValueError, OSError)):  # a picture that does not load, a volume for a 2D-only model, ...
        return _error(400, str(e))
    return _error(500, f"{type(e).__name__}: {e}")


def build_app(predictor, model_name: str, *, defaults: GenerationSettings | None = None, max_concurrency: int = 16,
              max_request_bytes: int = 32 * 1024**2, max_batch_size: int = 8, allow_local_files: bool = True,
              tmp_dir: str | None = None) -> FastAPI:
    """The API app; the model worker starts and stops with the app (`app.state.batcher`).

    Args:
        predictor: a `medm.infer.Predictor`.
        model_name: the id `/v1/models` lists and requests must name.
        defaults: decoding settings of requests that do not set them (greedy unless `temperature` > 0).
        allow_local_files: pictures may be server-side paths; turn off when others can reach the server.
        tmp_dir: where data-URL pictures are written while their request runs (default: the system's).
    """
    defaults = defaults or GenerationSettings(max_new_tokens=256)
    batcher = Batcher(predictor, max_batch_size)
    created = int(time.time())
    tmp_dir = tmp_dir or tempfile.gettempdir()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="medm", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.in_flight = 0

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "medm"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "in_flight": app.state.in_flight, "waiting": batcher.waiting}

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_request_bytes:
            raise RequestError(f"the request is {int(length):,} bytes; this server takes at most "
                               f"{max_request_bytes:,} (--max-request-mb)", status=413)
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_request_bytes:
                raise RequestError(f"the request is over {max_request_bytes:,} bytes, the most this server takes "
                                   "(--max-request-mb)", status=413)
        return bytes(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if app.state.in_flight >= max_concurrency:
            return _error(429, f"the server is busy: {max_concurrency} requests in flight (--max-concurrency); "
                               "retry later")
        app.state.in_flight += 1
        streaming = False
        try:
            try:
                body = json.loads(await read_body(request))
            except json.JSONDecodeError as e:
                raise RequestError(f"the body is not valid JSON ({e})") from e
            if not isinstance(body, dict) or body.get("model") != model_name:
                name = body.get("model") if isinstance(body, dict) else None
                raise RequestError(f"model {name!r} is not served here; this server serves {model_name!r} "
                                   "(GET /v1/models)", status=404, param="model")
            req = await asyncio.to_thread(parse_request, body, defaults, allow_local_files=allow_local_files,
                                          tmp_dir=tmp_dir)
            missing = _missing_encoder(predictor, req)
            if missing:
                req.cleanup()
                raise RequestError(missing)
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            if req.stream:
                streaming = True
                return StreamingResponse(_stream(req, rid), media_type="text/event-stream")
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            batcher.submit(Job(req, lambda res: loop.call_soon_threadsafe(_settle, future, res)))
            answer = await future
            if isinstance(answer, BaseException):
                return _from_exception(answer)
            return _completion(rid, answer)
        except Exception as e:
            return _from_exception(e)
        finally:
            if not streaming:
                app.state.in_flight -= 1

    def _chunk(rid: str, delta: dict, finish: str | None = None) -> str:
        data = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(data)}\n\n"

    async def _stream(req, rid: str):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        batcher.submit(Job(req, lambda res: loop.call_soon_threadsafe(queue.put_nowait, ("done", res)),
                           lambda text: loop.call_soon_threadsafe(queue.put_nowait, ("text", text))))
        try:
            yield _chunk(rid, {"role": "assistant", "content": ""})
            sent = ""
            while True:
                event, value = await queue.get()
                if event == "text":
                    # Whitespace at either end waits for the text after it: the joined pieces equal the
                    # non-streamed (stripped) answer.
                    value = value.strip()
                    if value.startswith(sent) and len(value) > len(sent):
                        yield _chunk(rid, {"content": value[len(sent):]})
                        sent = value
                    continue
                if isinstance(value, BaseException):
                    yield f"data: {_from_exception(value).body.decode()}\n\n"
                else:
                    yield _chunk(rid, {}, value.finish_reason)
                yield "data: [DONE]\n\n"
                return
        finally:
            app.state.in_flight -= 1

    def _completion(rid: str, answer: Answer) -> dict:
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                             "finish_reason": answer.finish_reason}],
                "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                          "total_tokens": answer.prompt_tokens + answer.completion_tokens}}

    return app


def _missing_encoder(predictor, req) -> str | None:
    """Why the model cannot take the request's pictures, or None."""
    if req.volumes and getattr(predictor, "volume_preprocess", None) is None:
        return ("this model has no 3D encoder (model.vision3d), so it takes no `volume_url`; send a slice as an "
                "`image_url`, or serve a model with a 3D encoder")
    if req.images and hasattr(predictor, "image_preprocess") and predictor.image_preprocess is None:
        return "this model has no 2D encoder (model.vision), so it takes no `image_url`"
    return None


def _settle(future: asyncio.Future, result) -> None:
    if not future.done():
        future.set_result(result)
