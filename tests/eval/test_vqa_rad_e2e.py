"""End to end on the real VQA-RAD data: build the records, train the tiny model briefly on the training split,
`medm infer` the 451 test questions, `medm eval --task vqa-rad`; the reported numbers are those the protocol
computes from the predictions file. Skips when ../shared/data is absent."""

import json

import pytest
import torch

from medm.cli import main
from medm.data.builders.vqa_rad import build_vqa_rad
from medm.eval.protocols import score
from medm.models.tiny import tiny_model_config
from medm.train.args import parse_train_config
from medm.train.trainer import run_training

pytestmark = pytest.mark.slow


def test_vqa_rad_train_infer_eval(shared_data, tmp_path, capsys):
    src = shared_data / "vqa_rad"
    if not (src / "split" / "testset.json").is_file():
        pytest.skip(f"VQA-RAD split files not found under {src}")
    data = build_vqa_rad(str(tmp_path / "data"), str(src))
    run, preds, out = tmp_path / "run", tmp_path / "preds.jsonl", tmp_path / "eval"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is faster on one thread than on two shared ones
    try:
        cfg = parse_train_config({
            "model": tiny_model_config(), "stage": {"vision": "full"},
            "data": {"path": data["train"], "image_dir": data["image_dir"], "max_length": 128},
            "train": {"output_dir": str(run), "max_steps": 40, "per_device_train_batch_size": 16,
                      "learning_rate": 3e-3, "warmup_steps": 0, "lr_scheduler_type": "constant", "logging_steps": 10,
                      "save_strategy": "no", "report_to": [], "disable_tqdm": True, "device": "cpu", "seed": 0,
                      "plot_loss": False}})
        run_training(cfg)
        assert main(["infer", "--model", str(run), "--data", data["test"], "--image-dir", data["image_dir"],
                     "--out", str(preds), "--batch-size", "64", "--max-new-tokens", "8", "--device", "cpu",
                     "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    test = json.loads(open(data["test"]).read())
    assert [r["id"] for r in rows] == [t["id"] for t in test] and len(rows) == 451
    assert all(isinstance(r["prediction"], str) for r in rows)
    assert rows[0]["question"] == test[0]["question"] and rows[0]["answer"] == test[0]["answer"]

    capsys.readouterr()
    assert main(["eval", "--task", "vqa-rad", "--pred", str(preds), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    expected = score(rows, "strict")
    assert {k: m[k] for k in expected} == expected
    assert (m["n"], m["n_closed"], m["n_open"], m["n_choice"]) == (451, 272, 179, 21)
    chest = [r for r in rows if r["image_organ"] == "CHEST"]
    assert {k: m["breakdown"]["image_organ"]["CHEST"][k] for k in expected} == score(chest, "strict")
    pos = [r for r in rows if "POS" in [t.strip() for t in r["question_type"].split(",")]]
    assert m["breakdown"]["question_type"]["POS"]["n"] == len(pos) == 61
    e = expected
    assert (f"| all | 451 | {e['closed_accuracy']:.2f} | {e['open_recall']:.2f} | {e['open_accuracy']:.2f} | "
            f"{e['exact_match']:.2f} | {e['overall']:.2f} |") in printed
    assert "protocol: `strict`" in printed and "is by question, not by image" in printed
    assert printed.startswith((out / "report.md").read_text())
