"""`medm bench` with tiny random models over a three-task fixture suite: the table, resuming after a kill, and the
paired comparison of a second model."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medm.cli import main
from medm.eval.bench import SUITE_DIR, load_suite

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_setup(tmp_path_factory):
    from medm.models import build_model, save_model
    from medm.models.tiny import tiny_model_config

    root = tmp_path_factory.mktemp("bench")
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, tok = build_model(tiny_model_config())
        save_model(model, tok, str(root / f"model{seed}"))
        ckpts.append(str(root / f"model{seed}"))
    images = root / "data" / "images"
    images.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((16, 16), 50 * i, np.uint8)).save(images / f"{i}.png")
    vqa = [{"id": f"v{i}", "image": f"{i}.png", "answer": a, "conversations": [{"from": "human", "value": q}]}
           for i, (q, a) in enumerate([("<image>\nIs there a mass?", "yes"), ("<image>\nWhich lobe?", "left lobe"),
                                       ("<image>\nIs it a CT?", "no"), ("<image>\nAny effusion?", "no")])]
    vqa.append({"id": "v4", "image": ["0.png", "1.png"], "answer": "no",  # two views: multi-image records run too
                "conversations": [{"from": "human", "value": "<image>\n<image>\nHas the lesion grown?"}]})
    (root / "data" / "vqa.json").write_text(json.dumps(vqa))
    # OmniMedVQA in its published layout, read with --layout.
    qa = root / "data" / "OmniMedVQA" / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    (root / "data" / "OmniMedVQA" / "Images").symlink_to(images)
    (qa / "Fix.json").write_text(json.dumps([
        {"question_id": f"Fix_{i}", "question": "What modality is this?", "gt_answer": "CT",
         "image_path": f"Images/{i}.png", "option_A": "CT", "option_B": "MRI", "modality_type": "CT",
         "question_type": "Modality Recognition"} for i in range(3)]))
    ask = [{"from": "human", "value": "<image>\n通过这张胸部X光影像可以诊断出什么？"}]
    zh = [{"id": f"z{i}", "image": f"{i}.png", "answer": "双肺纹理增多，心影不大。", "conversations": ask}
          for i in range(3)]
    (root / "data" / "zh.json").write_text(json.dumps(zh, ensure_ascii=False))
    suite = root / "fixture.yaml"
    suite.write_text("""# medm bench --suite fixture.yaml --model M
name: fixture
max_new_tokens: 4
batch_size: 2
tasks:
  - {name: vqa, task: vqa, data: vqa.json, image_dir: images, metric: closed_accuracy}
  - {name: omni, task: omnimedvqa, data: OmniMedVQA/QA_information/Open-access/Fix.json, layout: omnimedvqa,
     image_dir: OmniMedVQA}
  - {name: zh, task: report-zh, data: zh.json, image_dir: images, metric: rouge1}
""")
    return root, ckpts, str(suite)


def _bench(suite, model, out, root, *extra):
    return main(["bench", "--suite", suite, "--model", model, "--out", str(out), "--data-root", str(root / "data"),
                 "--bootstrap", "200", "--device", "cpu", "--no-progress", *extra])


def _table(out):
    with open(out / "bench.csv") as f:
        return list(csv.DictReader(f))


def _ids(path):
    return [json.loads(line)["id"] for line in Path(path).read_text().splitlines()]


def test_bench_writes_the_table_resumes_and_compares(bench_setup, capsys):
    root, (model_a, model_b), suite = bench_setup
    out_a, out_b = root / "run_a", root / "run_b"
    assert _bench(suite, model_a, out_a, root) == 0
    rows = _table(out_a)
    assert [(r["task"], r["benchmark"], r["figure"], r["n"]) for r in rows] == [
        ("vqa", "vqa", "closed_accuracy", "5"), ("omni", "omnimedvqa", "accuracy", "3"),
        ("zh", "report-zh", "rouge1", "3")]
    for r in rows:  # each row is its task's metrics.json
        m = json.loads((out_a / r["task"] / "metrics.json").read_text())
        assert r["value"] == f"{m[r['figure']]:.2f}" and m["bootstrap"]["resamples"] == 200
        lo, hi = m["ci"][r["figure"]]
        assert r["95% CI"] == f"{lo:.2f} to {hi:.2f}" and lo <= m[r["figure"]] <= hi
    md = (out_a / "bench.md").read_text()
    assert "| task | benchmark | figure | n | value | 95% CI |" in md and md in capsys.readouterr().out
    assert _ids(out_a / "omni" / "preds.jsonl") == ["omnimedvqa-Fix_0", "omnimedvqa-Fix_1", "omnimedvqa-Fix_2"]

    # As after a kill: one task half written (a kept row marked, a half-written line), another never started.
    preds = out_a / "vqa" / "preds.jsonl"
    first = dict(json.loads(preds.read_text().splitlines()[0]), prediction="yes (kept from the first run)")
    preds.write_text(json.dumps(first) + "\n" + '{"id": "v1", "predic')
    for f in (out_a / "zh").iterdir():
        f.unlink()
    (out_a / "zh").rmdir()
    assert _bench(suite, model_a, out_a, root) == 0
    assert _ids(preds) == ["v0", "v1", "v2", "v3", "v4"]
    assert json.loads(preds.read_text().splitlines()[4])["image"] == ["0.png", "1.png"]
    assert json.loads(preds.read_text().splitlines()[0])["prediction"] == "yes (kept from the first run)"
    assert _ids(out_a / "zh" / "preds.jsonl") == ["z0", "z1", "z2"] and len(_table(out_a)) == 3

    # A second model, then the comparison.
    assert _bench(suite, model_b, out_b, root) == 0
    assert _bench(suite, model_a, out_a, root, "--compare", str(out_b)) == 0
    rows = _table(out_a)
    assert list(rows[0]) == ["task", "benchmark", "figure", "n", "value", "95% CI", "other", "difference",
                             "difference 95% CI", "p"]
    for r in rows:
        a = json.loads((out_a / r["task"] / "metrics.json").read_text())
        b = json.loads((out_b / r["task"] / "metrics.json").read_text())
        c = a["comparison"][r["figure"]]
        assert r["other"] == f"{b[r['figure']]:.2f}" and c["other"] == b[r["figure"]]
        assert float(r["difference"]) == pytest.approx(a[r["figure"]] - b[r["figure"]], abs=0.01)
        assert 0.0 <= float(r["p"]) <= 1.0 and a["compare_predictions"].endswith(f"run_b/{r['task']}/preds.jsonl")

    # --tasks reruns some tasks; the others keep their line, read from their metrics.json.
    assert _bench(suite, model_a, out_a, root, "--compare", str(out_b), "--tasks", "omni") == 0
    assert _table(out_a) == rows
    assert _bench(suite, model_a, out_a, root, "--tasks", "nosuch") == 2
    assert "suite 'fixture' has no task 'nosuch'; its tasks: vqa, omni, zh" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_resumes_after_a_real_kill(bench_setup, tmp_path):
    root, (model_a, _), suite = bench_setup
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "medm.cli", "bench", "--suite", suite, "--model", model_a, "--out", str(out),
           "--data-root", str(root / "data"), "--bootstrap", "50", "--device", "cpu", "--no-progress",
           "--batch-size", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    first = out / "vqa" / "preds.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (first.is_file() and first.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: some questions answered, no table yet (or, if it already ended,
    proc.wait()                       # nothing to resume: the rerun must then change nothing)
    answered = first.read_text().splitlines() if first.is_file() else []
    assert answered, "the bench was killed before answering any question"
    kept = json.loads(answered[0])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _ids(first) == ["v0", "v1", "v2", "v3", "v4"] and json.loads(first.read_text().splitlines()[0]) == kept
    assert len(_table(out)) == 3


def test_shipped_suites_load_and_name_known_tasks():
    names = sorted(p[:-5] for p in os.listdir(SUITE_DIR) if p.endswith(".yaml"))
    assert names == ["m3d", "medical-mc", "radiology-vqa", "reports"]
    for name in names:
        suite = load_suite(name)
        text = (Path(SUITE_DIR) / f"{name}.yaml").read_text()
        assert text.startswith(f"# medm bench --suite {name} ") and suite.tasks


def test_suite_errors_name_the_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  - {name: a, task: nosuch, data: x.json}\n")
    assert main(["bench", "--suite", str(bad), "--model", "m"]) == 2
    assert "bad.yaml: task 'a': unknown eval task 'nosuch'" in capsys.readouterr().err
    bad.write_text("tasks:\n  - {name: a, task: vqa, data: x.json, split: test}\n")
    assert main(["bench", "--suite", str(bad), "--model", "m"]) == 2
    assert "tasks[0].split: unknown key; did you mean limit?" in capsys.readouterr().err
    assert main(["bench", "--suite", "nosuch", "--model", "m"]) == 2
    assert "no bench suite 'nosuch'" in (err := capsys.readouterr().err) and "radiology-vqa" in err


def test_bench_script_passes_its_variables():
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "COMPARE", "DATA_ROOT", "LIMIT", "DTYPE")}
    script = REPO / "scripts" / "eval" / "bench.sh"
    assert script.read_text().splitlines()[1] == "# SUITE=radiology-vqa MODEL=runs/finetune bash scripts/eval/bench.sh"
    proc = subprocess.run(["bash", str(script), "--no-progress"], capture_output=True, text=True, timeout=30,
                          env={**env, "DRY_RUN": "1", "SUITE": "reports", "MODEL": "/m", "COMPARE": "/runs/b",
                               "LIMIT": "5", "PYTHON": "py"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("py -m medm.cli bench --suite reports --model /m --bootstrap 1000 --seed 0 ")
    assert "--compare /runs/b" in proc.stdout and "--limit 5" in proc.stdout and "--no-progress" in proc.stdout
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30, env={**env, "MODEL": "m"})
    assert proc.returncode != 0 and "set SUITE" in proc.stderr
