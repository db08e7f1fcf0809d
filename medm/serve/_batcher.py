"""One thread that owns the model: requests that arrive together are answered in one batched `generate`.

Requests wait in a queue. When the model is free the worker takes the oldest one and, unless it streams, every
other waiting non-streaming request with the same decoding settings (up to `max_batch_size`), and answers them with
one `Predictor.predict` call (left padding, KV cache). A streaming request is generated alone, its text handed out
as it grows. If a batch fails, its requests are answered one by one, so one bad picture fails only its own request.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import astuple, dataclass
from typing import Any

from medm.serve._requests import ChatRequest

__all__ = ["Answer", "Batcher", "Job"]

logger = logging.getLogger(__name__)


@dataclass
class Answer:
    """A finished answer and its token counts (`finish_reason`: "stop" at the end of turn, "length" at the cap)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class Job:
    """A request in the queue. `done(answer_or_exception)` and `on_text(text so far)` are called from the worker."""

    request: ChatRequest
    done: Callable[[Any], None]
    on_text: Callable[[str], None] | None = None


class Batcher:
    """Answers jobs on one worker thread.

    Attributes:
        lock: held while the model generates (holding it from outside pauses the worker: jobs queue up).
        batch_sizes: the size of every batch generated so far, in order (for logs and tests).
    """

    def __init__(self, predictor, max_batch_size: int = 8):
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.lock = threading.Lock()
        self.batch_sizes: list[int] = []
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="medm-serve-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._cond:
            self._pending.append(job)
            self._cond.notify()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._pending)

    # ---- worker ---------------------------------------------------------------------------------------------------
    def _take(self) -> list[Job]:
        first = self._pending.popleft()
        if first.on_text is not None:
            return [first]
        key = astuple(first.request.settings)
        batch, rest = [first], deque()
        while self._pending:
            job = self._pending.popleft()
            if len(batch) < self.max_batch_size and job.on_text is None and astuple(job.request.settings) == key:
                batch.append(job)
            else:
                rest.append(job)
        self._pending = rest
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            with self.lock:
                with self._cond:
                    batch = self._take()
                self.batch_sizes.append(len(batch))
                try:
                    if batch[0].on_text is not None:
                        self._stream(batch[0])
                    else:
                        self._answer(batch)
                finally:
                    for job in batch:
                        job.request.cleanup()

    def _usage(self, request: ChatRequest, text: str) -> Answer:
        tok = self.predictor.tokenizer
        completion = len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0
        try:
            prompt = len(self.predictor.encode(request.messages))
        except Exception:  # a kind whose prompt length depends on its images (qwen-vl): not counted
            prompt = 0
        reason = "length" if completion >= request.settings.max_new_tokens else "stop"
        return Answer(text, prompt, completion, reason)

    def _answer(self, batch: list[Job]) -> None:
        try:
            records = [job.request.record() for job in batch]
            texts = [text for _, text in self.predictor.predict(records, batch_size=len(batch),
                                                                settings=batch[0].request.settings)]
            answers = [self._usage(job.request, text) for job, text in zip(batch, texts)]
        except Exception as e:
            if len(batch) > 1:  # find the request that failed: the others still get their answers
                for job in batch:
                    self._answer([job])
                return
            batch[0].done(e)
            return
        for job, answer in zip(batch, answers):
            job.done(answer)

    def _stream(self, job: Job) -> None:
        req = job.request
        text = ""
        try:
            for text in self.predictor.stream(req.messages, req.images, req.settings, volumes=req.volumes):
                job.on_text(text)
            answer = self._usage(req, text)
        except Exception as e:
            job.done(e)
            return
        job.done(answer)
