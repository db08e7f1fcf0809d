"""An OpenAI chat-completions request body read into what `medm.infer.Predictor` takes.

Message `content` is a string or a list of parts: `{"type": "text", "text"}`, `{"type": "image_url", "image_url":
{"url"}}` with a `data:` URL (base64) or a local path (`file://` URL or plain path), and medm's extension for 3D
volumes, `{"type": "volume_url", "volume_url": {"url", "format"}}`, `format` one of `nii`, `nii.gz`, `npy` (needed
for a data URL; a path's suffix says it otherwise; a DICOM series is a local folder). Each picture becomes an
`<image>` / `<image3d>` placeholder at its place among the text parts, joined by newlines as in the training data.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from medm.data.annotations import IMAGE3D_TOKEN, IMAGE_TOKEN, Record
from medm.infer import GenerationSettings

__all__ = ["ChatRequest", "RequestError", "parse_request"]

_ROLES = {"system": "system", "developer": "system", "user": "human", "assistant": "gpt"}
_IMAGE_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
                 "image/bmp": ".bmp", "image/gif": ".gif", "image/tiff": ".tif", "application/dicom": ".dcm"}
VOLUME_FORMATS = {"nii": ".nii", "nii.gz": ".nii.gz", "npy": ".npy"}
_VOLUME_MIME = {"application/x-npy": "npy", "application/gzip": "nii.gz", "application/x-nifti": "nii"}
# Longest answer a request may ask for, whatever the server's default.
MAX_TOKENS_LIMIT = 4096


class RequestError(ValueError):
    """A request the server cannot answer; `status` is the HTTP code, `param` the offending field."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class ChatRequest:
    """One request: its turns with placeholders, the files they refer to, and how to decode.

    Attributes:
        messages: `{"role", "content"}` turns (roles system / user / assistant), `<image>` / `<image3d>` in place.
        images, volumes: file paths, one per placeholder, in order.
        temp_files: files written for data URLs, removed by `cleanup`.
    """

    messages: list[dict[str, str]]
    settings: GenerationSettings
    stream: bool = False
    images: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)

    def record(self) -> Record:
        return Record(id="request", image=list(self.images), image3d=list(self.volumes),
                      conversations=[{"from": _ROLES[m["role"]], "value": m["content"]} for m in self.messages])

    def cleanup(self) -> None:
        for path in self.temp_files:
            try:
                os.remove(path)
            except OSError:
                pass
        self.temp_files = []


def _number(body: dict, key: str, kind, default, low=None, high=None):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise RequestError(f"`{key}` must be {'an integer' if kind is int else 'a number'}, got {value!r}", param=key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"`{key}` must be in [{low}, {high}], got {value!r}", param=key)
    return kind(value)


def _settings(body: dict, defaults: GenerationSettings) -> GenerationSettings:
    if _number(body, "n", int, 1) != 1:
        raise RequestError("`n` must be 1: this server returns one answer per request", param="n")
    if body.get("stop"):
        raise RequestError("`stop` is not supported: answers end at the model's end of turn or at `max_tokens`",
                           param="stop")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return GenerationSettings(max_new_tokens=_number(body, key, int, defaults.max_new_tokens, 1, MAX_TOKENS_LIMIT),
                              temperature=_number(body, "temperature", float, defaults.temperature, 0, 2),
                              top_p=_number(body, "top_p", float, defaults.top_p, 0, 1),
                              num_beams=defaults.num_beams)


class _Files:
    """Turns image / volume URLs into local file paths, writing data URLs to temp files."""

    def __init__(self, allow_local_files: bool, tmp_dir: str | None):
        self.allow_local = allow_local_files
        self.tmp_dir = tmp_dir
        self.written: list[str] = []

    def path(self, url: Any, where: str, volume: bool, fmt: str | None) -> str:
        if not isinstance(url, str) or not url:
            raise RequestError(f"{where}: `url` must be a non-empty string", param=where)
        if url.startswith("data:"):
            header, sep, data = url[5:].partition(",")
            if not sep or not header.endswith(";base64"):
                raise RequestError(f"{where}: a data URL must be base64 (data:<type>;base64,...)", param=where)
            mime = header[:-len(";base64")].lower()
            if volume:
                fmt = fmt or _VOLUME_MIME.get(mime)
                if fmt not in VOLUME_FORMATS:
                    raise RequestError(f"{where}: give the volume's `format` ({', '.join(VOLUME_FORMATS)}) beside "
                                       "its data URL", param=where)
                suffix = VOLUME_FORMATS[fmt]
            else:
                suffix = _IMAGE_SUFFIX.get(mime, ".img")  # the image loader reads the content, not the suffix
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as e:
                raise RequestError(f"{where}: the data URL is not valid base64 ({e})", param=where) from e
            fd, path = tempfile.mkstemp(suffix=suffix, prefix="medm-serve-", dir=self.tmp_dir)
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            self.written.append(path)
            return path
        if url.startswith(("http://", "https://")):
            raise RequestError(f"{where}: this server does not download URLs; send the file as a data URL "
                               "(data:image/png;base64,...)", param=where)
        path = url[len("file://"):] if url.startswith("file://") else url
        if not self.allow_local:
            raise RequestError(f"{where}: local paths are turned off on this server (--no-local-files); send the "
                               "file as a data URL", param=where)
        if not os.path.exists(path):
            raise RequestError(f"{where}: no such file on the server: {path!r}", param=where)
        if volume and fmt is not None and fmt not in VOLUME_FORMATS:
            raise RequestError(f"{where}: unknown volume format {fmt!r}; known: {', '.join(VOLUME_FORMATS)}")
        return path


def _content(msg: dict, i: int, files: _Files, images: list[str], volumes: list[str]) -> str:
    content = msg.get("content")
    if content is None:
        content = ""
    if isinstance(content, str):
        parts: list = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise RequestError(f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}]")
    pieces = []
    for j, part in enumerate(parts):
        where = f"messages[{i}].content[{j}]"
        part_type = part.get("type") if isinstance(part, dict) else None
        if part_type == "text":
            # Typed placeholders would ask for pictures that are not there.
            text = str(part.get("text", "")).replace(IMAGE3D_TOKEN, " ").replace(IMAGE_TOKEN, " ")
            pieces.append(text)
        elif part_type in ("image_url", "volume_url"):
            if msg.get("role") != "user":
                raise RequestError(f"{where}: pictures go in user messages", param=where)
            ref = part.get(part_type)
            ref = ref if isinstance(ref, dict) else {"url": ref}
            volume = part_type == "volume_url"
            path = files.path(ref.get("url"), where, volume, ref.get("format"))
            (volumes if volume else images).append(path)
            pieces.append(IMAGE3D_TOKEN if volume else IMAGE_TOKEN)
        else:
            raise RequestError(f"{where}: unknown part type {part_type!r}; known: text, image_url, volume_url",
                               param=where)
    return "\n".join(p for p in pieces if p)


def parse_request(body: Any, defaults: GenerationSettings, *, allow_local_files: bool = True,
                  tmp_dir: str | None = None) -> ChatRequest:
    """Read a chat-completions body; data URLs are written to temp files (the request's `cleanup` removes them).

    Raises:
        RequestError: naming the field that is wrong and what it must be.
    """
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list", param="messages")
    settings = _settings(body, defaults)
    files = _Files(allow_local_files, tmp_dir)
    images: list[str] = []
    volumes: list[str] = []
    turns = []
    try:
        for i, msg in enumerate(messages):
            role = msg.get("role") if isinstance(msg, dict) else None
            if role not in _ROLES:
                raise RequestError(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}",
                                   param=f"messages[{i}]")
            turns.append({"role": _ROLES[role].replace("human", "user").replace("gpt", "assistant"),
                          "content": _content(msg, i, files, images, volumes)})
        if not any(t["role"] == "user" for t in turns):
            raise RequestError("`messages` has no user message to answer", param="messages")
    except RequestError:
        ChatRequest(turns, settings, temp_files=files.written).cleanup()
        raise
    return ChatRequest(turns, settings, bool(body.get("stream")), images, volumes, files.written)
