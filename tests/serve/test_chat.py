"""`medm chat`: the terminal chat driven through its stdin against tiny 2D and 3D checkpoints."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medm.cli import main
from medm.data.annotations import Record
from medm.infer import GenerationSettings, Predictor

REPO = Path(__file__).resolve().parents[2]


class Terminal(io.StringIO):
    """stdout that also keeps each write, to see that answers arrive in pieces."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def expected(ckpt, question, image=None, volume=None) -> str:
    tag = "<image3d>\n" if volume else "<image>\n" if image else ""
    rec = Record(id="x", conversations=[{"from": "human", "value": tag + question}],
                 image=[str(image)] if image else [], image3d=[str(volume)] if volume else [])
    predictor = Predictor.from_pretrained(str(ckpt))
    return next(iter(predictor.predict([rec], settings=GenerationSettings(max_new_tokens=8))))[1]


def chat(monkeypatch, lines: list[str], *args: str) -> Terminal:
    out = Terminal()
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["chat", *map(str, args), "--max-new-tokens", "8", "--device", "cpu"]) == 0
    return out


def answers(out: Terminal) -> list[str]:
    return [line.split("medm> ", 1)[1] for line in out.getvalue().split("\n") if "medm> " in line]


def test_chat_streams_answers_and_follows_commands(monkeypatch, ckpt2d, media):
    out = chat(monkeypatch, ["Is there a lesion?", f"/image {media['png2']}", "What organ is shown?", "/clear",
                             "What organ is shown?", "/exit", "Never answered?"],
               "--model", ckpt2d, "--image", media["png"])
    first = expected(ckpt2d, "Is there a lesion?", image=media["png"])
    second = expected(ckpt2d, "What organ is shown?", image=media["png2"])
    # /image starts a new context with the new picture; /clear forgets the turns, the picture is carried again.
    assert answers(out) == [first, second, second]
    assert len(first.split()) > 1 and sum(1 for w in out.writes if w and w in first) > 1  # streamed in pieces
    text = out.getvalue()
    assert "[a.png: 32 x 32 image" in text and "[b.png: 32 x 32 image" in text
    assert "[conversation cleared; the next question carries b.png again]" in text
    assert "Never answered?" not in text


def test_chat_gives_a_3d_model_the_whole_volume_and_reports_mistakes(monkeypatch, ckpt3d, media):
    out = chat(monkeypatch, ["Any lesion?", "/image /no/such.png", f"/image {media['npy']}", "/volume", "/frobnicate"],
               "--model", ckpt3d, "--volume", media["npy"])
    text = out.getvalue()
    assert answers(out) == [expected(ckpt3d, "Any lesion?", volume=media["npy"])]
    assert "the model is given the whole volume" in text
    assert "error: /image: cannot open 'such.png'" in text
    assert f"error: /image: '{media['npy']}' is a volume; use /volume {media['npy']}" in text
    assert "error: /volume needs a file: /volume PATH" in text
    assert "error: unknown command /frobnicate; commands: /image PATH, /volume PATH, /clear, /exit" in text


@pytest.mark.slow
def test_medm_chat_reads_questions_piped_into_it(ckpt2d, media):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "medm.cli", "chat", "--model", str(ckpt2d), "--max-new-tokens", "8",
                           "--device", "cpu"], input=f"/image {media['png']}\nIs there a lesion?\n", text=True,
                          capture_output=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"medm> {expected(ckpt2d, 'Is there a lesion?', image=media['png'])}\n" in proc.stdout


def test_a_wrong_starting_picture_is_one_error_line_naming_the_option(monkeypatch, capsys, ckpt2d, media):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Never asked?\n"))
    assert main(["chat", "--model", str(ckpt2d), "--image", str(media["npy"]), "--device", "cpu"]) == 2
    out = capsys.readouterr()
    assert f"error: --image: '{media['npy']}' is a volume; use --volume {media['npy']}" in out.err
    assert "medm>" not in out.out
