"""`medm eval`: metrics.json (keys as docs/eval.md documents them, values as the protocols compute them), the
printed / written report, the blank-image comparison, clear errors, and scripts/eval/*.sh."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medm.cli import main
from medm.eval.protocols import score

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "eval"

ROWS = [
    {"id": "a", "question": "Is there a mass?", "prediction": "Yes, in the liver.", "answer": "yes",
     "answer_type": "CLOSED", "question_type": "PRES", "image_organ": "ABD"},
    {"id": "b", "question": "Is this an MRI or a CT?", "prediction": "It is a CT.", "answer": "CT",
     "answer_type": "CLOSED", "question_type": "MODALITY", "image_organ": "HEAD"},
    {"id": "c", "question": "Is the heart enlarged?", "prediction": "I do not know", "answer": "no",
     "answer_type": "CLOSED", "question_type": "SIZE", "image_organ": "CHEST"},
    {"id": "d", "question": "Where is the lesion?", "prediction": "left left lobe", "answer": "left lung",
     "answer_type": "OPEN", "question_type": "POS", "image_organ": "CHEST"},
    {"id": "e", "question": "What organ is shown?", "prediction": "The liver.", "answer": "liver",
     "answer_type": "OPEN", "question_type": "ORGAN", "image_organ": "ABD"},
]
BLANK_ANSWERS = ["No.", "It is an MRI.", "no", "right", "liver"]
BLANK = [dict(r, prediction=p, blank_images=True) for r, p in zip(ROWS, BLANK_ANSWERS)]


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def documented_keys(section: str) -> set[str]:
    """Keys in the table under `### <section>` of docs/eval.md's "metrics.json keys" part."""
    text = (REPO / "docs" / "eval.md").read_text()
    part = text.split("## metrics.json keys", 1)[1]
    block = part.split(f"### {section}\n", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([A-Za-z0-9_]+)` \|", block, flags=re.M))


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_eval_vqa_writes_documented_metrics_and_prints_the_table(tmp_path, capsys):
    pred = _jsonl(tmp_path / "preds.jsonl", ROWS)
    assert main(["eval", "--task", "vqa", "--pred", pred, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    m = _metrics(tmp_path / "out")
    expected = score(ROWS, "strict")
    assert {k: m[k] for k in expected} == expected
    assert m["task"] == "vqa" and m["predictions"] == pred and m["blank_predictions"] is None
    assert set(m) == documented_keys("Every task") | documented_keys("VQA tasks (vqa, vqa-rad, slake, pathvqa)")
    # Breakdowns: answer type, question type and organ, each group scored on its own questions.
    assert set(m["breakdown"]) == {"answer_type", "question_type", "image_organ"}
    abd = [r for r in ROWS if r["image_organ"] == "ABD"]
    assert {k: m["breakdown"]["image_organ"]["ABD"][k] for k in expected} == score(abd, "strict")
    assert m["breakdown"]["answer_type"]["OPEN"]["n"] == 2
    # The table: header, then all questions, then the groups.
    report = (tmp_path / "out" / "report.md").read_text()
    assert report in printed
    assert "protocol: `strict`" in report
    assert "| group | n | closed acc | open recall | open acc | exact match | overall |" in report
    e = expected
    assert (f"| all | 5 | {e['closed_accuracy']:.2f} | {e['open_recall']:.2f} | {e['open_accuracy']:.2f} | "
            f"{e['exact_match']:.2f} | {e['overall']:.2f} |") in report
    assert "| answer type: OPEN | 2 | - |" in report and "| organ: CHEST | 2 |" in report
    assert "| question type: MODALITY | 1 | 100.00 |" in report


def test_llava_med_protocol_is_named_and_scored(tmp_path, capsys):
    pred = _jsonl(tmp_path / "preds.jsonl", ROWS)
    assert main(["eval", "--task", "vqa", "--pred", pred, "--protocol", "llava-med"]) == 0  # --out: pred's folder
    m = _metrics(tmp_path)
    assert m["protocol"] == "llava-med" and m["closed_accuracy"] == score(ROWS, "llava-med")["closed_accuracy"]
    assert m["closed_accuracy"] != score(ROWS, "strict")["closed_accuracy"]  # "no" inside "I do not know"
    assert "protocol: `llava-med`. llava-med: LLaVA-Med's batch scorer" in capsys.readouterr().out


def test_vqa_rad_report_states_the_split_and_splits_multi_label_types(tmp_path, capsys):
    rows = [dict(ROWS[0], question_type="PRES, POS"), *ROWS[1:]]
    assert main(["eval", "--task", "vqa-rad", "--pred", _jsonl(tmp_path / "p.jsonl", rows)]) == 0
    out = capsys.readouterr().out
    assert "# VQA-RAD evaluation" in out and "is by question, not by image" in out
    m = _metrics(tmp_path)
    assert m["breakdown"]["question_type"]["PRES"]["n"] == 1 and m["breakdown"]["question_type"]["POS"]["n"] == 2


@pytest.mark.parametrize("task,rows,section", [
    ("report", [{"id": "r1", "prediction": "Small left effusion.", "answer": "Small left pleural effusion."}],
     "report"),
    ("grounding", [{"id": "g1", "prediction": '{"bbox_2d": [0, 0, 10, 10]}', "answer": [0, 0, 10, 20]}],
     "grounding"),
])
def test_report_and_grounding_keys_are_documented(tmp_path, capsys, task, rows, section):
    assert main(["eval", "--task", task, "--pred", _jsonl(tmp_path / "p.jsonl", rows)]) == 0
    m = _metrics(tmp_path)
    assert set(m) == documented_keys("Every task") | documented_keys(section)
    assert m["breakdown"] == {} and m["n"] == 1
    if task == "grounding":
        assert m["mean_iou"] == pytest.approx(50.0) and m["acc_at_iou"] == 100.0
    assert f"protocol: `{m['protocol']}`" in capsys.readouterr().out


def test_blank_predictions_side_by_side(tmp_path, capsys):
    pred, blank = _jsonl(tmp_path / "p.jsonl", ROWS), _jsonl(tmp_path / "b.jsonl", BLANK)
    assert main(["eval", "--task", "vqa", "--pred", pred, "--blank", blank]) == 0
    out = capsys.readouterr().out
    m, with_image, without = _metrics(tmp_path), score(ROWS, "strict"), score(BLANK, "strict")
    assert m["blank_predictions"] == blank
    assert m["closed_accuracy"] == with_image["closed_accuracy"]
    assert m["blank_closed_accuracy"] == without["closed_accuracy"] and m["blank_open_recall"] == without["open_recall"]
    assert m["breakdown"]["image_organ"]["ABD"]["blank_closed_accuracy"] == 0.0  # "No." to a "yes"
    assert "## Image reliance" in out
    assert ("| group | n | closed acc (image) | closed acc (blank) | closed acc (change) | open recall (image) | "
            "open recall (blank) | open recall (change) |") in out
    a, b = with_image["closed_accuracy"], without["closed_accuracy"]
    c, d = with_image["open_recall"], without["open_recall"]
    assert f"| all | 5 | {a:.2f} | {b:.2f} | {b - a:+.2f} | {c:.2f} | {d:.2f} | {d - c:+.2f} |" in out
    assert "does not mark every row" not in out
    # A blank file that is not one (no blank_images marks) is pointed out.
    assert main(["eval", "--task", "vqa", "--pred", pred, "--blank", pred]) == 0
    assert "does not mark every row `blank_images`" in capsys.readouterr().out


def test_blank_predictions_must_answer_the_same_questions(tmp_path, capsys):
    pred = _jsonl(tmp_path / "p.jsonl", ROWS)
    assert main(["eval", "--task", "vqa", "--pred", pred, "--blank", _jsonl(tmp_path / "b.jsonl", BLANK[:3])]) == 2
    err = capsys.readouterr().err
    assert "b.jsonl" in err and "2 id(s) of" in err and "'d'" in err
    other = [dict(BLANK[0], answer="no"), *BLANK[1:]]
    assert main(["eval", "--task", "vqa", "--pred", pred, "--blank", _jsonl(tmp_path / "b.jsonl", other)]) == 2
    assert "id 'a' has answer 'no'" in capsys.readouterr().err


def test_eval_errors_are_clear(tmp_path, capsys):
    pred = _jsonl(tmp_path / "p.jsonl", ROWS)
    assert main(["eval", "--task", "coco", "--pred", pred]) == 2
    err = capsys.readouterr().err
    assert "unknown eval task 'coco'; known: " in err
    assert all(name in err.split("known: ")[1] for name in ("grounding", "pathvqa", "report", "slake", "vqa-rad"))
    assert main(["eval", "--task", "vqa", "--pred", str(tmp_path / "nope.jsonl")]) == 2
    assert "predictions file not found" in capsys.readouterr().err
    assert main(["eval", "--task", "vqa", "--pred", pred, "--protocol", "bleu"]) == 2
    assert "no protocol 'bleu'; known: strict, llava-med" in capsys.readouterr().err
    with open(pred, "a") as f:
        f.write('{"id": "f", "predic')
    assert main(["eval", "--task", "vqa", "--pred", pred]) == 2
    assert "p.jsonl:6: not a JSON object" in (err := capsys.readouterr().err) and "--resume" in err
    dup = _jsonl(tmp_path / "dup.jsonl", [ROWS[0], ROWS[0]])
    assert main(["eval", "--task", "vqa", "--pred", dup]) == 2
    assert "id 'a' appears more than once" in capsys.readouterr().err
    no_answer = _jsonl(tmp_path / "x.jsonl", [{"id": "x", "prediction": "y"}])
    assert main(["eval", "--task", "report", "--pred", no_answer]) == 2
    assert "row 1 (id 'x') has no 'answer'" in capsys.readouterr().err


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "MODEL", "DATA", "IMAGE_DIR", "LAYOUT", "BLANK")}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHON": sys.executable,
            **extra}


def test_every_script_starts_with_its_command_and_passes_its_task():
    layouts = {"vqa": "records", "vqa_rad": "vqa-rad", "slake": "slake", "pathvqa": "pathvqa", "report": "records",
               "grounding": "records"}
    assert {p.stem for p in SCRIPTS.glob("[a-z]*.sh")} == set(layouts) | {"bench"}  # bench.sh: tests/eval/test_bench
    for name, layout in layouts.items():
        lines = (SCRIPTS / f"{name}.sh").read_text().splitlines()
        assert lines[1].startswith("# ") and lines[1].endswith(f"bash scripts/eval/{name}.sh"), name
        proc = subprocess.run(["bash", str(SCRIPTS / f"{name}.sh"), "--limit", "3"], capture_output=True, text=True,
                              env=_env(DRY_RUN="1", MODEL="/m", DATA="/d.json", BLANK="1", PROTOCOL="p"), timeout=30)
        assert proc.returncode == 0, proc.stderr
        infer, blank, evaluate = proc.stdout.splitlines()[1:]
        task = name.replace("_", "-")
        assert f"--layout {layout} " in infer and "--out runs/eval/" in infer and infer.endswith("--limit 3 ")
        assert "--blank-images" in blank and f"--blank runs/eval/{task}/preds_blank.jsonl" in evaluate
        assert f"eval --task {task} " in evaluate and "--protocol p" in evaluate
    proc = subprocess.run(["bash", str(SCRIPTS / "vqa.sh")], capture_output=True, text=True, env=_env(), timeout=30)
    assert proc.returncode != 0 and "set MODEL to a checkpoint directory" in proc.stderr


def test_vqa_script_runs_on_a_tiny_checkpoint(tmp_path):
    from medm.models import build_model, save_model
    from medm.models.tiny import tiny_model_config

    torch.manual_seed(0)
    model, tok = build_model(tiny_model_config())
    save_model(model, tok, str(tmp_path / "ckpt"))
    (tmp_path / "images").mkdir()
    records = []
    for i, (q, a) in enumerate([("Is there a mass?", "yes"), ("Which lobe?", "left lobe"), ("Is it a CT?", "no")]):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "answer": a, "image_organ": "CHEST",
                        "conversations": [{"from": "human", "value": f"<image>\n{q}"}]})
    (tmp_path / "test.json").write_text(json.dumps(records))
    out = tmp_path / "eval"
    proc = subprocess.run(["bash", str(SCRIPTS / "vqa.sh"), "--no-progress"], capture_output=True, text=True,
                          timeout=240, env=_env(MODEL=str(tmp_path / "ckpt"), DATA=str(tmp_path / "test.json"),
                                                IMAGE_DIR=str(tmp_path / "images"), OUT=str(out), BATCH_SIZE="2",
                                                MAX_NEW_TOKENS="4", DEVICE="cpu"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "preds.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["s0", "s1", "s2"] and rows[1]["question"] == "Which lobe?"
    m = _metrics(out)
    assert m["n"] == 3 and m["n_closed"] == 2 and m["n_open"] == 1
    assert {k: m[k] for k in ("closed_accuracy", "open_recall")} == \
        {k: score(rows, "strict")[k] for k in ("closed_accuracy", "open_recall")}
    assert "| all | 3 |" in proc.stdout and (out / "report.md").is_file()
