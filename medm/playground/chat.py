"""One playground conversation: the turns the model reads, the pictures it was given, and what the page shows.

A `Session` lives in the page's `gr.State`, so each browser tab has its own and nothing is shared between users.
The first question after an upload carries it to the model; later questions about the same upload do not repeat it.
A question that carries a new picture starts the model's context afresh (the earlier turns stay on screen): the
models medm trains see one picture per conversation, and a second one in the same context confuses them. What is
carried depends on the model (`whole_volumes`, from its config):

- a 2D image, or a volume for a model without a 3D encoder: the picture on screen (for a volume the axial slice shown,
  at the window chosen) as an `<image>`; a new slice or window is carried again by the next question;
- a volume for a model with a 3D encoder: the whole volume (its file) as an `<image3d>`, prepared by the model's
  own volume preprocessing; the slice and window on screen are only for looking.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image

from medm.data.annotations import IMAGE3D_TOKEN, IMAGE_TOKEN
from medm.infer import GenerationSettings
from medm.playground.media import Upload

__all__ = ["EMPTY_ANSWER", "Session"]

# Shown in place of an answer that is empty (the model ended its turn at once).
EMPTY_ANSWER = "(no answer: the model ended its turn at once)"


@dataclass
class Session:
    """A conversation and the upload it is about.

    Args:
        whole_volumes: the model has a 3D encoder, so volumes go to it whole (else as the slice on screen).
        messages: the turns the model reads, `{"role", "content"}` with `<image>` / `<image3d>` placeholders.
        images: one picture per `<image>` in `messages`, in order (Predictor.stream's `images`).
        volumes: one volume path per `<image3d>` in `messages`, in order (Predictor.stream's `volumes`).
        chat: the `gr.Chatbot` messages (`{"role", "content"}`; user turns may show their picture).
        upload: the file on screen; None before any upload.
        attached: the upload on screen was already given to the model in this conversation.
        failed: the last answer failed: `messages` ends with its question, the chat with the error.
    """

    whole_volumes: bool = False
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    chat: list[dict] = field(default_factory=list)
    upload: Upload | None = None
    attached: bool = False
    failed: bool = False

    def set_upload(self, upload: Upload | None) -> None:
        """A new file: the next question carries it."""
        self.upload = upload
        self.attached = False

    def view_changed(self) -> None:
        """Another slice or window is on screen: the next question carries it, unless the model takes the volume
        whole (then the view does not change what it is given)."""
        if not self._gives_volume():
            self.attached = False

    def ask(self, question: str, picture_file: str | None = None) -> None:
        """Add a user turn; it carries the upload unless the conversation already has it.

        Args:
            picture_file: the picture on screen saved as a file, shown beside the question in the chat.
        """
        if self.failed:  # the failed question stays on screen, but the model's turns go on without it
            self._drop_last_question()
            self.failed = False
        # Typed placeholders would ask for pictures that are not there.
        question = " ".join(question.replace(IMAGE_TOKEN, " ").replace(IMAGE3D_TOKEN, " ").split())
        content = question
        shown: list = [question]
        if self.upload is not None and not self.attached:
            self.messages, self.images, self.volumes = [], [], []  # a new picture: a new context for the model
            if self._gives_volume():
                content = f"{IMAGE3D_TOKEN}\n{question}"
                self.volumes.append(self.upload.path)
                note = f"{self.upload.caption()} (the model is given the whole volume)"
            else:
                content = f"{IMAGE_TOKEN}\n{question}"
                self.images.append(self.upload.picture())
                note = self.upload.caption()
            self.attached = True
            if picture_file is not None:
                shown = [{"path": picture_file, "alt_text": note}, question]
        self.messages.append({"role": "user", "content": content})
        self.chat.append({"role": "user", "content": shown})

    def stream_answer(self, predictor, settings: GenerationSettings) -> Iterator[None]:
        """Stream the model's answer to the last user turn into the chat; yields after each new piece of text.

        On an error the chat shows it in place of the answer, `failed` is set, and the exception is raised again;
        `forget_answer` then retries the question, or the next `ask` replaces it.
        """
        self.chat.append({"role": "assistant", "content": ""})
        # `volumes` only when there are some, so 2D conversations need nothing beyond (messages, images, settings).
        extra = {"volumes": list(self.volumes)} if self.volumes else {}
        text = ""
        try:
            for text in predictor.stream(self.messages, self.images, settings, **extra):
                self.chat[-1]["content"] = text
                yield
        except Exception as e:
            self.chat[-1]["content"] = f"Error: {e}"
            self.failed = True
            raise
        self.messages.append({"role": "assistant", "content": text})
        if not text.strip():
            self.chat[-1]["content"] = EMPTY_ANSWER
            yield

    def can_regenerate(self) -> bool:
        return self.failed or (bool(self.messages) and self.messages[-1]["role"] == "assistant")

    def forget_answer(self) -> None:
        """Drop the last answer (or error) so the last question can be answered again."""
        if not self.can_regenerate():
            raise ValueError("there is no answer to regenerate yet")
        if not self.failed:
            self.messages.pop()
        self.chat.pop()
        self.failed = False

    def clear(self) -> None:
        """Forget the conversation; the upload stays, and the next question carries it again."""
        self.messages, self.images, self.volumes, self.chat = [], [], [], []
        self.attached = self.failed = False

    def _gives_volume(self) -> bool:
        return self.whole_volumes and self.upload is not None and self.upload.is_volume

    def _drop_last_question(self) -> None:
        last = self.messages.pop()
        if last["content"].startswith(IMAGE_TOKEN):
            self.images.pop()
            self.attached = False
        elif last["content"].startswith(IMAGE3D_TOKEN):
            self.volumes.pop()
            self.attached = False
