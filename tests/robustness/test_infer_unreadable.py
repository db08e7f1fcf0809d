"""`medm infer` and an unreadable image (issue 26 item 8): the record gets an error line (id, file, reason) and the
run goes on with the rest of its batch; `--resume` finishes such a file; `medm eval` counts those lines as
unanswered."""

import json
import shutil

import pytest
import torch

from medm.cli import main
from medm.data.annotations import load_records
from medm.eval.report import evaluate
from medm.infer.predictions import load_predictions, run_inference
from medm.models import build_model, save_model
from medm.models.tiny import tiny_model_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt")
    save_model(*build_model(tiny_model_config()), str(out))
    return out


@pytest.fixture
def data(tmp_path, toy_data):
    """The 16 toy records, image 2 garbled and image 5 deleted."""
    shutil.copytree(toy_data.parent, tmp_path / "data")
    images = tmp_path / "data" / "images"
    (images / "002.png").write_bytes((images / "002.png").read_bytes()[:40] + bytes(100))
    (images / "005.png").unlink()
    return tmp_path / "data" / "train.json"


def _run(ckpt, data, out, **kw):
    return run_inference(str(ckpt), load_records(str(data))[:8], str(out), image_dir=str(data.parent),
                         batch_size=4, device="cpu", progress=False, **kw)


def test_an_unreadable_image_costs_its_record_not_the_run(ckpt, data, tmp_path):
    out = tmp_path / "preds.jsonl"
    result = _run(ckpt, data, out)
    rows = {r["id"]: r for r in load_predictions(str(out))}
    assert sorted(rows) == sorted(f"toy{i}" for i in range(8)) and result.errors == 2
    for rid, name, reason in (("toy2", "002.png", "not a recognised image format"),
                              ("toy5", "005.png", "file not found")):
        row = rows[rid]
        assert "prediction" not in row and reason in row["error"] and row["file"].endswith(name)
        assert row["answer"] in ("yes", "no") and row["image"] == [f"images/{name}"]
    # The rest of each batch was answered.
    assert all(isinstance(rows[f"toy{i}"]["prediction"], str) for i in (0, 1, 3, 4, 6, 7))

    # medm eval scores the file, counting the error lines as unanswered (and wrong).
    result = evaluate("vqa", str(out))
    assert result.metrics["unanswered"] == 2 and result.metrics["n"] == 8
    assert any("2 of 8 question(s) are unanswered" in n for n in result.notes)


def test_resume_finishes_a_file_with_error_lines(ckpt, data, tmp_path):
    out = tmp_path / "preds.jsonl"
    _run(ckpt, data, out)
    lines = out.read_text().splitlines(keepends=True)
    # As a kill leaves it: the first batch's lines and half of the next line.
    out.write_text("".join(lines[:4]) + lines[4][:10])
    assert main(["infer", "--model", str(ckpt), "--data", str(data), "--image-dir", str(data.parent),
                 "--out", str(out), "--resume", "--limit", "8", "--device", "cpu", "--batch-size", "4",
                 "--no-progress"]) == 0
    rows = load_predictions(str(out))  # every id exactly once
    assert sorted(r["id"] for r in rows) == sorted(f"toy{i}" for i in range(8))
    assert sorted(r["id"] for r in rows if "error" in r) == ["toy2", "toy5"]
    assert all(json.loads(line) for line in out.read_text().splitlines())
