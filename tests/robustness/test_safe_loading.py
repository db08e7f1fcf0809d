"""Safe loading: weights only from safetensors or `torch.load(weights_only=True)` (checked over the whole tree and
with a booby-trapped `.bin`), `trust_remote_code` off unless configured and then named in the log, the playground on
loopback, and ids from records never steering where files are written.

(Playground uploads stay in its own temp dir, removed at exit: tests/playground/conftest.py `server` and
test_app.py::test_two_turn_chat_about_an_image_streams_its_answers.)
"""

import ast
import io
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

import medm
from medm.models.builder import LLMArgs, load_model
from medm.models.llm import resolve_text_config
from medm.models.tiny import tiny_llm
from medm.qwenvl.args import QwenVLArgs

PACKAGE = Path(medm.__file__).resolve().parent


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_load_in_the_package_refuses_pickled_code():
    """torch.load always with weights_only=True, np.load never with allow_pickle=True, no pickle / yaml.load /
    torch.jit.load, and trust_remote_code never hard-wired on."""
    problems, torch_loads = [], 0
    for file in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(file.read_text(), str(file))
        for call, func in _calls(tree):
            where = f"{file.relative_to(PACKAGE.parent)}:{call.lineno}: {ast.unparse(call)[:100]}"
            if func == "torch.load":
                torch_loads += 1
                value = _kw(call, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(where)
            elif func in ("np.load", "numpy.load"):
                value = _kw(call, "allow_pickle")
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    problems.append(where)
            elif func in ("pickle.load", "pickle.loads", "torch.jit.load", "yaml.load", "yaml.unsafe_load",
                          "dill.load", "joblib.load"):
                problems.append(where)
            value = _kw(call, "trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is True:
                problems.append(where)
    assert torch_loads >= 2  # the legacy .bin paths (interop import, vit3d weights) are seen by this check
    assert not problems, "\n".join(problems)


class _Trap:
    """Unpickling this runs a shell command: what a malicious `.bin` does under a plain `torch.load`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _trapped_bin(path: Path, marker: Path) -> Path:
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "trap": _Trap(marker)}, path)
    return path


def test_a_booby_trapped_bin_is_refused_without_running_code(tmp_path):
    from medm.interop._source import load_weights
    from medm.models.llm import load_llm

    marker = tmp_path / "pwned"
    # `medm import` of a legacy MedM-VL / TinyLLaVA checkpoint (pytorch_model.bin).
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    _trapped_bin(legacy / "pytorch_model.bin", marker)
    torch.load(legacy / "pytorch_model.bin", weights_only=False)  # the trap is real: a plain load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported global"):
        load_weights(str(legacy))
    # A pretrained LLM directory with only a .bin (transformers' loader, weights_only=True).
    llm_dir = tmp_path / "llm"
    config = AutoConfig.for_model(**tiny_llm("qwen2"))
    config.save_pretrained(llm_dir)
    _trapped_bin(llm_dir / "pytorch_model.bin", marker)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported global"):
        load_llm(str(llm_dir), config)
    # A medm checkpoint opens from safetensors only: a .bin in its place is not read at all.
    with pytest.raises(OSError, match="(?i)safetensors|no file named"):
        load_model(str(llm_dir))
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_configured_and_then_logged(tmp_path, monkeypatch, caplog):
    assert LLMArgs().trust_remote_code is False and QwenVLArgs().trust_remote_code is False
    llm_dir = tmp_path / "my-llm"
    AutoConfig.for_model(**tiny_llm("qwen2")).save_pretrained(llm_dir)
    seen = []
    real = AutoConfig.from_pretrained

    def spy(path, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(path, **{**kw, "trust_remote_code": False})  # the tiny config ships no code either way

    monkeypatch.setattr("medm.models.llm.AutoConfig.from_pretrained", spy)
    with caplog.at_level(logging.WARNING, logger="medm"):
        resolve_text_config({"path": str(llm_dir)})
    assert seen == [False] and "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="medm"):
        resolve_text_config({"path": str(llm_dir), "trust_remote_code": True})
    assert seen == [False, True]
    assert f"trust_remote_code is ON: running the config code shipped with {llm_dir}" in caplog.text


def test_playground_listens_on_loopback_by_default():
    import argparse

    from medm.playground.app import launch
    from medm.playground.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).host == "127.0.0.1"

    class FakeApp:
        def queue(self, **kw):
            pass

        def launch(self, **kw):
            self.kw = kw

    app = FakeApp()
    launch(app, block=False)
    assert app.kw["server_name"] == "127.0.0.1" and app.kw["share"] is False


def test_record_ids_never_steer_where_a_builder_writes(tmp_path):
    """MedTrinity rows carry their image bytes; the builder names the files after the row ids."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from PIL import Image

    from medm.data.builders.medtrinity import build_medtrinity

    def png():
        buf = io.BytesIO()
        Image.new("L", (8, 8), 7).save(buf, format="PNG")
        return buf.getvalue()

    ids = ["../../escape", "/etc/cron.d/x", "a/../../b", "..", "ok-1", "..\\win"]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": png(), "path": None} for _ in ids], image_type),
                      "id": pa.array(ids, pa.string()),
                      "caption": pa.array([f"A CT slice, case {i}." for i in range(len(ids))], pa.string())})
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(table, src / "shard.parquet")
    out = tmp_path / "deep" / "out"
    build_medtrinity(str(out), str(src / "shard.parquet"), tasks="caption")
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file() and src not in p.parents)
    assert all(out in p.parents for p in written), written  # nothing outside the output directory
    images = sorted(p.name for p in (out / "images").iterdir())
    assert len(images) == len(ids) and all(p.parent == out / "images" for p in written if p.suffix == ".png")
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"medtrinity-cap-{i}" for i in ids]  # the ids themselves are kept as data
