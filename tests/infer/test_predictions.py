"""Batch inference to JSONL: the rows `medm infer` writes, resuming (in process and after a real kill), blank images,
and clear errors."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from infer_helpers import write_questions

from medm.cli import main
from medm.data.annotations import Record, load_records
from medm.infer import (
    GenerationSettings,
    PredictionFileError,
    Predictor,
    prediction_row,
    question_text,
    read_predictions,
    run_inference,
)

REPO = Path(__file__).resolve().parents[2]
SHORT = GenerationSettings(max_new_tokens=4)


@pytest.fixture(scope="module")
def predictor(tiny_ckpt):
    return Predictor.from_pretrained(str(tiny_ckpt), device="cpu")


def _ids(path) -> list[str]:
    return [json.loads(line)["id"] for line in Path(path).read_text().splitlines()]


def test_row_has_question_prediction_answer_and_record_fields():
    rec = Record(id="r1", conversations=[{"from": "human", "value": "<image>\nIs  there a\nfracture?"},
                                         {"from": "gpt", "value": "No."}],
                 image=["a.png"], extra={"answer_type": "CLOSED", "question": "stale", "image_organ": "HEAD"})
    assert question_text(rec) == "Is there a fracture?"
    row = prediction_row(rec, "no")
    # The reference falls back to the final gpt turn; the row's own question wins over a record field of that name.
    assert row == {"id": "r1", "question": "Is there a fracture?", "prediction": "no", "answer": "No.",
                   "image": ["a.png"], "answer_type": "CLOSED", "image_organ": "HEAD"}
    assert list(row)[:4] == ["id", "question", "prediction", "answer"]
    rec.answer = "no"
    assert prediction_row(rec, "yes", blank_images=True)["answer"] == "no"
    assert prediction_row(rec, "yes", blank_images=True)["blank_images"] is True
    prompt = Record(id="p", conversations=[{"from": "human", "value": "Describe <image> and <image3d>."}],
                    image=["a.png"], image3d=["v.nii.gz"])
    row = prediction_row(prompt, "text")
    assert "answer" not in row and row["question"] == "Describe and ." and row["image3d"] == ["v.nii.gz"]


def test_read_predictions_half_written_last_line(tmp_path):
    good = b'{"id": "a", "prediction": "x"}\n{"id": "b", "prediction": "y"}\n'
    path = tmp_path / "p.jsonl"
    path.write_bytes(good + b'{"id": "c", "predic')
    rows, end = read_predictions(str(path), resuming=True)
    assert [r["id"] for r in rows] == ["a", "b"] and end == len(good)
    with pytest.raises(PredictionFileError, match=r"p.jsonl:3: .*--resume"):
        read_predictions(str(path))
    # A complete last object without its newline counts when reading, but is redone when resuming (its write may
    # not have finished).
    path.write_bytes(good + b'{"id": "c", "prediction": "z"}')
    assert [r["id"] for r in read_predictions(str(path))[0]] == ["a", "b", "c"]
    assert read_predictions(str(path), resuming=True) == (rows, len(good))
    # A broken line before the end is never silently dropped.
    path.write_bytes(b'{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(PredictionFileError, match=r"p.jsonl:2: not a JSON object"):
        read_predictions(str(path), resuming=True)
    path.write_bytes(b'{"prediction": "x"}\n')
    with pytest.raises(PredictionFileError, match="without an 'id'"):
        read_predictions(str(path))


def test_run_inference_writes_every_record_in_order(tmp_path, predictor):
    records = load_records(str(write_questions(tmp_path, 5)))
    out = tmp_path / "preds.jsonl"
    result = run_inference(predictor, records, str(out), batch_size=2, settings=SHORT, progress=False)
    assert (result.total, result.written, result.skipped) == (5, 5, 0)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    direct = [p for _, p in predictor.predict(records, batch_size=2, settings=SHORT)]
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert [r["prediction"] for r in rows] == direct
    assert rows[1]["answer"] == "yes" and rows[1]["answer_type"] == "CLOSED" and rows[1]["image_organ"] == "CHEST"
    assert rows[0]["question"] == "Is there a lesion in region 0?" and "blank_images" not in rows[0]

    # An existing file is never clobbered by accident.
    with pytest.raises(FileExistsError, match="--resume .* --overwrite"):
        run_inference(predictor, records, str(out), settings=SHORT, progress=False)
    result = run_inference(predictor, records[:2], str(out), overwrite=True, settings=SHORT, progress=False)
    assert _ids(out) == ["q000", "q001"] and result.written == 2
    # Resuming a finished file answers nothing.
    result = run_inference(predictor, records[:2], str(out), resume=True, settings=SHORT, progress=False)
    assert (result.written, result.skipped) == (0, 2) and _ids(out) == ["q000", "q001"]


def test_resume_keeps_rows_and_redoes_a_half_written_line(tmp_path, predictor):
    records = load_records(str(write_questions(tmp_path, 7)))
    out = tmp_path / "preds.jsonl"
    run_inference(predictor, records[:3], str(out), batch_size=3, settings=SHORT, progress=False)
    kept = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b'{"id": "q003", "question": "Is th')  # what a kill mid-write leaves
    result = run_inference(predictor, records, str(out), resume=True, batch_size=3, settings=SHORT, progress=False)
    assert (result.skipped, result.written, result.total) == (3, 4, 7)
    assert out.read_bytes().startswith(kept)
    assert _ids(out) == [r.id for r in records]

    # Rows of another data file are not silently mixed in.
    with pytest.raises(PredictionFileError, match="5 row.*q002"):
        run_inference(predictor, records[:2], str(out), resume=True, settings=SHORT, progress=False)


def test_duplicate_record_ids_are_an_error(tmp_path, predictor):
    records = load_records(str(write_questions(tmp_path, 2)))
    records[1].id = records[0].id
    with pytest.raises(ValueError, match="'q000' appears more than once"):
        run_inference(predictor, records, str(tmp_path / "p.jsonl"), settings=SHORT, progress=False)


def test_blank_images_answer_as_black_images_do(tmp_path, predictor):
    noise = load_records(str(write_questions(tmp_path, 6, image="noise")))
    black = load_records(str(write_questions(tmp_path, 6, image="black")))
    settings = GenerationSettings(max_new_tokens=6)
    run_inference(predictor, noise, str(tmp_path / "blank.jsonl"), blank_images=True, settings=settings, progress=False)
    run_inference(predictor, black, str(tmp_path / "black.jsonl"), settings=settings, progress=False)
    run_inference(predictor, noise, str(tmp_path / "noise.jsonl"), settings=settings, progress=False)
    read = {k: [json.loads(x) for x in (tmp_path / f"{k}.jsonl").read_text().splitlines()]
            for k in ("blank", "black", "noise")}
    assert all(r["blank_images"] is True for r in read["blank"])
    assert [r["prediction"] for r in read["blank"]] == [r["prediction"] for r in read["black"]]
    # The images matter to this model, so the check above could tell a blank run from a real one.
    assert [r["prediction"] for r in read["noise"]] != [r["prediction"] for r in read["black"]]


def test_generation_never_emits_image_placeholders(tmp_path, predictor):
    # This model's weights favour odd tokens; a generated <image> / <image3d> id would be read as a placeholder
    # without features at the next decoding step and stop the run.
    records = load_records(str(write_questions(tmp_path, 8)))
    prompts = [predictor.encode(r) for r in records]
    pixels = torch.cat([predictor.images(r.image) for r in records])
    new = predictor.generate_ids(prompts, pixels, GenerationSettings(max_new_tokens=48))
    media = set(predictor.sizes)
    assert len(media) == 2 and all(not media & set(ids) for ids in new)
    assert sum(len(ids) for ids in new) > 8 * 10  # long answers: the check saw many tokens


def test_infer_cli_errors_are_clear(tmp_path, tiny_ckpt, capsys):
    data = write_questions(tmp_path, 2)
    base = ["infer", "--model", str(tiny_ckpt), "--out", str(tmp_path / "p.jsonl"), "--no-progress"]
    assert main([*base, "--data", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert main([*base, "--data", str(data), "--layout", "coco"]) == 2
    err = capsys.readouterr().err
    assert "unknown --layout 'coco'" in err and "records, " in err and "vqa-rad" in err and "slake" in err
    assert main(["infer", "--model", str(tmp_path / "no_ckpt"), "--data", str(data), "--out",
                 str(tmp_path / "p.jsonl")]) == 2
    assert "no_ckpt" in capsys.readouterr().err
    (tmp_path / "p.jsonl").write_text('{"id": "q000", "prediction": "x"}\n')
    assert main([*base, "--data", str(data)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_killed_infer_resumes_with_every_id_once(tmp_path, tiny_ckpt, capsys):
    data = write_questions(tmp_path, 120)
    out = tmp_path / "preds.jsonl"
    args = ["infer", "--model", str(tiny_ckpt), "--data", str(data), "--image-dir", str(tmp_path), "--out", str(out),
            "--max-new-tokens", "24", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "medm.cli", *args, "--batch-size", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.is_file() and out.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.02)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode != 0, "the run finished before it could be killed: " + err.decode()[-2000:]
    written = out.read_bytes()
    complete = written[:written.rfind(b"\n") + 1]
    assert 4 <= complete.count(b"\n") < 120
    with open(out, "ab") as f:
        f.write(b'{"id": "q0')  # make sure a half-written last line is there to drop

    assert main([*args, "--batch-size", "32", "--resume"]) == 0
    assert "kept from the earlier run" in capsys.readouterr().out
    ids = _ids(out)
    assert ids == [f"q{i:03d}" for i in range(120)]  # every id exactly once, in order
    assert out.read_bytes().startswith(complete)  # nothing the killed run finished was lost or rewritten
