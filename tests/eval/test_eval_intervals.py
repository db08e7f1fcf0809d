"""`medm eval --bootstrap / --compare`: intervals and the paired comparison land in metrics.json and report.md."""

import json

import pytest

from medm.cli import main
from medm.eval.bootstrap import bootstrap_ci
from medm.eval.tasks.vqa import VqaTask


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def _rows(n_right: int, n: int = 40):
    return [{"id": f"q{i}", "prediction": "yes" if i < n_right else "no", "answer": "yes", "answer_type": "CLOSED",
             "image_organ": "CHEST" if i % 2 else "HEAD"} for i in range(n)]


def test_eval_writes_intervals_and_a_paired_comparison(tmp_path, capsys):
    a, b = _write(tmp_path / "a.jsonl", _rows(30)), _write(tmp_path / "b.jsonl", _rows(20))
    assert main(["eval", "--task", "vqa", "--pred", a, "--compare", b, "--bootstrap", "300", "--seed", "3",
                 "--out", str(tmp_path / "out")]) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["bootstrap"] == {"resamples": 300, "seed": 3, "level": 95.0, "method": "percentile"}
    task = VqaTask()
    rows = task.prepare(_rows(30), "a")
    assert m["ci"] == bootstrap_ci(task.scorer(rows, "strict"), 40, 300, 3)  # the seeded draw, reproduced
    lo, hi = m["ci"]["closed_accuracy"]
    assert lo < 75.0 < hi and "n" not in m["ci"]
    assert m["breakdown"]["image_organ"]["CHEST"]["ci"]["closed_accuracy"] is not None
    c = m["comparison"]["closed_accuracy"]
    assert (c["this"], c["other"], c["diff"]) == (75.0, 50.0, 25.0) and c["ci"][0] > 0 and c["p"] < 0.05
    assert m["compare_predictions"] == b
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## 95% confidence intervals" in report and f"| all | {lo:.2f} to {hi:.2f} |" in report
    assert "## Paired comparison" in report and "| closed acc | 75.00 | 50.00 | +25.00 |" in report


def test_compare_needs_the_same_questions_and_bootstrap_can_be_off(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", _rows(30))
    assert main(["eval", "--task", "vqa", "--pred", a, "--compare", _write(tmp_path / "b.jsonl", _rows(20)[:-1])]) == 2
    assert "predictions to compare must answer the same questions" in capsys.readouterr().err
    assert main(["eval", "--task", "vqa", "--pred", a, "--bootstrap", "0"]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["bootstrap"] is None and m["ci"] is None and m["comparison"] is None
    assert "confidence intervals" not in capsys.readouterr().out


@pytest.mark.parametrize("pred,ref", [("双肺纹理增多，心影不大", "双肺纹理增多，心影正常")])
def test_report_task_scores_chinese_by_character(tmp_path, pred, ref):
    p = _write(tmp_path / "p.jsonl", [{"id": "r1", "prediction": pred, "answer": ref}])
    assert main(["eval", "--task", "report", "--pred", p, "--bootstrap", "50"]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["rouge1"] == pytest.approx(80.0) and m["rouge2"] == pytest.approx(700 / 9) and m["n_chars"] == 1
    assert m["ci"]["rouge1"] == pytest.approx([80.0, 80.0])  # one report: every resample is that report
