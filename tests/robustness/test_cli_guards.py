"""Command-line edges (issue 26, items 11 and 13): `medm infer` never writes over its own questions, and every data
builder answers `--help` with its options; the MedMNIST builder reads its flag from a file named as published."""

import inspect
import json
import os

import numpy as np
import pytest
import torch

from medm.cli import main
from medm.data.annotations import load_records
from medm.models import build_model, save_model
from medm.models.tiny import tiny_model_config
from medm.registry import BUILDER


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    torch.manual_seed(0)
    model, tok = build_model(tiny_model_config())
    out = tmp_path_factory.mktemp("ckpt")
    save_model(model, tok, str(out))
    return out


@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink", "hardlink"])
def test_infer_refuses_an_output_that_is_its_input(spelling, saved_tiny, tmp_path, monkeypatch, capsys):
    data = tmp_path / "questions.jsonl"
    rows = [{"id": f"q{i}", "conversations": [{"from": "human", "value": f"Is {i} even?"}]} for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = data.read_bytes()
    monkeypatch.chdir(tmp_path)
    out = {"same": str(data), "dotted": "./sub/../questions.jsonl", "symlink": "link.jsonl",
           "hardlink": "hard.jsonl"}[spelling]
    (tmp_path / "sub").mkdir()
    os.symlink(data, tmp_path / "link.jsonl")
    os.link(data, tmp_path / "hard.jsonl")
    for resume in (["--resume"], ["--overwrite"]):
        rc = main(["infer", "--model", str(saved_tiny), "--data", str(data), "--out", out, "--device", "cpu",
                   "--no-progress", "--max-new-tokens", "2", *resume])
        assert rc == 2
        assert f"--out {out} is the --data file {data}" in capsys.readouterr().err
        assert data.read_bytes() == before
    assert [r.id for r in load_records(str(data))] == ["q0", "q1", "q2"]


@pytest.mark.parametrize("name", BUILDER.names())
def test_every_builder_lists_its_options_with_help(name, capsys):
    assert main(["data", "build", name, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: medm data build {name}")
    for param in inspect.signature(BUILDER.get(name)).parameters.values():
        flag = "--" + param.name.replace("_", "-")
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(flag + " ")), None)
        assert line is not None, f"{flag} missing from the help of {name}"
        # Each option says what it is: the builder's docstring text (on that line or wrapped onto the next).
        after = text.split(line, 1)[1].split("\n  --", 1)[0]
        assert len((line.split(param.name.upper(), 1)[-1] + after).split()) >= 3, f"{flag} of {name} has no text"
    assert main(["data", "build", name, "-h"]) == 0 and capsys.readouterr().out == text


def test_medmnist_builder_reads_its_flag_from_the_file_name(tmp_path, capsys):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array([[0], [1], [1]], np.uint8)
    for file_name, flag, answers in (("breastmnist.npz", "breastmnist", ["malignant", "normal, benign"]),
                                     ("pneumoniamnist_64.npz", "pneumoniamnist", ["normal", "pneumonia"])):
        np.savez(tmp_path / file_name, **arrays)
        out = tmp_path / flag
        assert main(["data", "build", "medmnist", "--src", str(tmp_path / file_name), "--out", str(out),
                     "--splits", "test"]) == 0
        records = json.loads((out / "test.json").read_text())
        assert [r["answer"] for r in records] == [answers[0], answers[1], answers[1]]
        assert records[0]["id"] == f"{flag}-test-0" and records[0]["data_source"] == f"medmnist-{flag}"
    # A name that is no MedMNIST flag still needs --flag or --labels.
    np.savez(tmp_path / "scans.npz", **arrays)
    assert main(["data", "build", "medmnist", "--src", str(tmp_path / "scans.npz"), "--out", str(tmp_path / "x")]) == 2
    assert "without --flag, give --labels" in capsys.readouterr().err
