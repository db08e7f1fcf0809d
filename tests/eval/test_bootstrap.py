"""Bootstrap intervals and the paired comparison: a known binomial, and two systems on the same questions."""

import math

import pytest

from medm.eval.bootstrap import bootstrap_ci, paired_comparison
from medm.eval.tasks.vqa import VqaTask


def _rows(correct: list[bool]) -> list[dict]:
    return [{"id": str(i), "prediction": "yes" if c else "no", "answer": "yes", "answer_type": "CLOSED"}
            for i, c in enumerate(correct)]


def _stat(rows):
    task = VqaTask()
    return task.scorer(task.prepare(rows, "test"), "strict")


@pytest.mark.parametrize("seed", [0, 1])
def test_interval_of_a_binomial_lies_within_the_analytic_one(seed):
    n, k = 400, 240  # accuracy 60%
    ci = bootstrap_ci(_stat(_rows([i < k for i in range(n)])), n, resamples=1000, seed=seed)
    lo, hi = ci["closed_accuracy"]
    half = 1.96 * math.sqrt(0.6 * 0.4 / n) * 100  # normal-approximation interval: 60 +- 4.80
    # The percentile interval estimates the same range, up to the resampling's own noise (~0.3 points).
    assert 60 - half - 0.5 <= lo < 60 < hi <= 60 + half + 0.5
    assert 0.85 * 2 * half <= hi - lo <= 1.1 * 2 * half
    assert "n" not in ci and ci["closed_accuracy"] == bootstrap_ci(
        _stat(_rows([i < k for i in range(n)])), n, resamples=1000, seed=seed)["closed_accuracy"]  # seeded


def test_paired_comparison_of_a_better_and_an_identical_system():
    n = 200
    a = _rows([i % 10 < 8 for i in range(n)])  # 80%
    b = _rows([i % 10 < 6 for i in range(n)])  # 60%, wrong wherever a is wrong
    out = paired_comparison(_stat(a), _stat(b), n, resamples=1000, seed=0)["closed_accuracy"]
    assert out["this"] == 80.0 and out["other"] == 60.0 and out["diff"] == pytest.approx(20.0)
    assert 0 < out["ci"][0] < 20 < out["ci"][1] and out["p"] < 0.01
    back = paired_comparison(_stat(b), _stat(a), n, resamples=1000, seed=0)["closed_accuracy"]
    assert back["diff"] == pytest.approx(-20.0) and back["ci"] == pytest.approx([-out["ci"][1], -out["ci"][0]])
    same = paired_comparison(_stat(a), _stat(a), n, resamples=200, seed=0)["closed_accuracy"]
    assert same["diff"] == 0.0 and same["ci"] == [0.0, 0.0] and same["p"] == 1.0


def _score_rows(task_name):
    vqa = [{"id": "a", "prediction": "Yes.", "answer": "yes", "answer_type": "CLOSED"},
           {"id": "b", "prediction": "no", "answer": "yes", "answer_type": "CLOSED"},
           {"id": "c", "prediction": "left lung", "answer": "left lower lobe", "answer_type": "OPEN"},
           {"id": "d", "prediction": "CT", "answer": "CT", "question": "Is this an MRI or a CT?",
            "answer_type": "CLOSED"}]
    rows = {
        "vqa": vqa,
        "report-zh": [{"id": "r1", "prediction": "双肺纹理增多，心影不大", "answer": "双肺纹理增多，心影正常"},
                      {"id": "r2", "prediction": "心影正常", "answer": "双肺纹理清晰，心影正常"},
                      {"id": "r3", "prediction": "", "answer": "未见异常"}],
        "omnimedvqa": [{"id": str(i), "prediction": p, "answer": "B", "options": {"A": "CT", "B": "MRI"}}
                       for i, p in enumerate(["MRI", "CT scan", "", "magnetic resonance"])],
        "grounding": [{"id": "g1", "prediction": '{"bbox_2d": [0, 0, 10, 10]}', "answer": [0, 0, 10, 20]},
                      {"id": "g2", "prediction": "no box", "answer": [0, 0, 10, 20]}],
    }
    return rows[task_name]


@pytest.mark.parametrize("name", ["vqa", "report-zh", "omnimedvqa", "grounding"])
def test_fast_scorers_equal_rescoring_the_resampled_rows(name):
    import random

    from medm.registry import TASK

    task = TASK.build(name)
    rows = task.prepare(_score_rows(name), "test")
    protocol = task.check_protocol(None)
    stat = task.scorer(rows, protocol)
    rng = random.Random(0)
    for _ in range(20):
        idx = [rng.randrange(len(rows)) for _ in rows]
        fast, slow = stat(idx), task.score([rows[i] for i in idx], protocol)
        assert set(fast) == set(slow)
        for k, v in slow.items():
            assert fast[k] == (pytest.approx(v) if isinstance(v, float) else v), k
