"""`medm demo` (2D, medm kind) at reduced steps learns to read the image: CI's guard on the whole demo path
(phantom builder, caption pretraining, finetuning, checkpoint, Predictor, table).

A broken image path (images not loaded, features not placed, a tower that sees noise) leaves the model answering
from the question alone: at the blanked-image accuracy and near the majority baseline. Presence and count are
learnt first, so they carry the check; location and size need the full run (docs/getting_started.md).
Settings: 30 pretrain + 200 finetune steps on 1,000 training images, one thread (about 40 s on an idle core);
over seeds 0, 1, 2 they gave presence 0.96 to 1.0 and count 0.85 to 0.89 with blanked images at 0.46 to 0.57.
"""

import pytest
import torch

from medm.demo import run_demo

MARGIN = {"presence": 0.3, "count": 0.2}  # over both the blanked-image accuracy and the majority baseline


@pytest.fixture
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_demo_learns_to_see(tmp_path, _one_thread, capsys):
    results = run_demo(str(tmp_path / "demo"), pretrain_steps=30, finetune_steps=200, n_train=1000, n_test=100,
                       seed=0, threads=1)
    for kind, margin in MARGIN.items():
        row = results["per_kind"][kind]
        assert row["n"] >= 50, row
        assert row["accuracy"] >= row["blanked_accuracy"] + margin, (kind, row)
        assert row["accuracy"] >= row["majority_baseline"] + margin, (kind, row)
    assert results["accuracy"] >= results["blanked_accuracy"] + 0.15, results
    assert results["threads"] == 1 and "threads:    1 (--threads)" in capsys.readouterr().out
