"""`medm chat`: talk with a model in the terminal, the answer streamed as it is generated.

    medm chat --model runs/demo/finetune --image scan.png
    you> Is there a lesion?
    medm> yes

Lines starting with `/` are commands: `/image PATH` and `/volume PATH` give the model a picture (the next question
carries it and starts a new context, as in the playground), `/clear` forgets the conversation, `/exit` (or end of
input) leaves. The conversation is the playground's own `Session`, so both treat pictures the same way: a volume goes
whole to a model with a 3D encoder, else as its middle axial slice.
"""

from __future__ import annotations

import sys
import tempfile
from typing import TextIO

from medm.infer import GenerationSettings
from medm.playground.chat import EMPTY_ANSWER, Session
from medm.playground.media import UploadError, open_upload

__all__ = ["COMMANDS", "ChatLoop"]

COMMANDS = "/image PATH, /volume PATH, /clear, /exit"
PROMPT = "you> "
ANSWER = "medm> "


class ChatLoop:
    """Read questions and commands from `stdin`, stream answers to `stdout`.

    Args:
        predictor: a `medm.infer.Predictor`.
        whole_volumes: the model has a 3D encoder (volumes go to it whole).
        stdin, stdout: default: the process's.
        work_dir: where zipped DICOM series are unpacked and the volume cache lives (default: a temp dir).
    """

    def __init__(self, predictor, settings: GenerationSettings, *, whole_volumes: bool = False,
                 stdin: TextIO | None = None, stdout: TextIO | None = None, work_dir: str | None = None):
        self.predictor = predictor
        self.settings = settings
        self.session = Session(whole_volumes=whole_volumes)
        self.stdin, self.stdout = stdin or sys.stdin, stdout or sys.stdout
        self.work_dir = work_dir or tempfile.mkdtemp(prefix="medm-chat-")

    def say(self, text: str = "", end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    def attach(self, path: str, want_volume: bool, label: str | None = None) -> str | None:
        """Open `path` for the next question and print what was loaded; returns None, or the error (not printed).

        Args:
            label: how the user asked for it in error messages (default `/image` or `/volume`).
        """
        label = label or ("/volume" if want_volume else "/image")
        try:
            upload = open_upload(path, work_dir=self.work_dir)
        except UploadError as e:
            return f"{label}: {e}"
        if upload.is_volume != want_volume:
            other = label.replace("volume", "image") if want_volume else label.replace("image", "volume")
            return f"{label}: {path!r} is {'a volume' if upload.is_volume else 'a 2D image'}; use {other} {path}"
        self.session.set_upload(upload)
        how = ("the model is given the whole volume" if want_volume and self.session.whole_volumes else
               "the model is given this slice (it has no 3D encoder)" if want_volume else "")
        self.say(f"[{upload.caption()}{'; ' + how if how else ''}; the next question carries it]")
        return None

    def answer(self, question: str) -> None:
        """Ask `question` and stream the answer; an error is one line, and the conversation goes on without it."""
        self.session.ask(question)
        self.stdout.write(ANSWER)
        shown = ""
        try:
            for _ in self.session.stream_answer(self.predictor, self.settings):
                text = self.session.chat[-1]["content"].strip()  # as `medm infer` and the API show answers
                if text == EMPTY_ANSWER or not text.startswith(shown):
                    continue
                self.stdout.write(text[len(shown):])
                self.stdout.flush()
                shown = text
        except Exception as e:  # the session marked the turn failed; the next question replaces it
            self.say(f"\nerror: {e}")
            return
        self.say(EMPTY_ANSWER if not shown.strip() else "")

    def run(self) -> int:
        """The read-answer loop; returns 0 at `/exit`, end of input or Ctrl-C."""
        try:
            return self._loop()
        except KeyboardInterrupt:
            self.say()
            return 0

    def _loop(self) -> int:
        while True:
            self.stdout.write(PROMPT)
            self.stdout.flush()
            line = self.stdin.readline()
            if not line:  # end of input
                self.say()
                return 0
            line = line.strip()
            if not line:
                continue
            if not self.stdin.isatty():  # questions piped in: show them, so the transcript reads as a chat
                self.say(line)
            if not line.startswith("/"):
                self.answer(line)
                continue
            command, _, rest = line.partition(" ")
            rest = rest.strip()
            if command in ("/exit", "/quit"):
                return 0
            if command == "/clear":
                self.session.clear()  # like the playground's Clear: the picture stays for the next question
                up = self.session.upload
                self.say("[conversation cleared" + (f"; the next question carries {up.name} again]" if up else "]"))
            elif command in ("/image", "/volume") and rest:
                error = self.attach(rest, command == "/volume")
                if error:
                    self.say(f"error: {error}")
            elif command in ("/image", "/volume"):
                self.say(f"error: {command} needs a file: {command} PATH")
            else:
                self.say(f"error: unknown command {command}; commands: {COMMANDS}")
