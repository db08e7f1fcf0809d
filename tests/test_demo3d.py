"""`medm demo --3d`: phantom volumes -> pretrain -> finetune -> held-out table, and the Predictor's 3D inputs."""

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from medm.cli import build_parser
from medm.cli import main as medm_main
from medm.data.annotations import load_records
from medm.data.builders.phantoms3d import KINDS, build_phantoms3d
from medm.infer import GenerationSettings, Predictor
from medm.models import build_model
from medm.models.tiny import tiny_model_config, tiny_vision
from medm.train.checkpoint import load_trained

# The 2D demo's results.json keys.
RESULT_KEYS = {"accuracy", "majority_baseline", "blanked_accuracy", "per_kind", "n_test", "train_seconds",
               "checkpoint", "threads", "threads_choice"}


def test_3d_flag_selects_the_3d_demo():
    parser = build_parser()
    assert parser.parse_args(["demo", "--3d"]).kind == "3d"
    assert parser.parse_args(["demo", "--kind", "3d"]).kind == "3d"
    assert parser.parse_args(["demo"]).kind == "medm"


def test_demo3d_smoke(tmp_path, monkeypatch, capsys):
    """A few steps of each stage write the 2D demo's results.json keys, the table and a reopenable 3D checkpoint."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this process's thread count
    out = tmp_path / "demo3d"
    assert medm_main(["demo", "--3d", "--out", str(out), "--pretrain-steps", "2", "--finetune-steps", "2",
                      "--n-train", "12", "--n-test", "4"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == RESULT_KEYS
    test = load_records(str(out / "data" / "test.json"))
    assert all(r.image3d and not r.image for r in test)
    counts = Counter(r.extra["question_type"] for r in test)
    assert {k: v["n"] for k, v in results["per_kind"].items()} == {k: counts[k] for k in KINDS if counts[k]}
    assert results["n_test"] == len(test)
    # The majority baseline: the most common training answer of each kind, scored on the test questions.
    train = load_records(str(out / "data" / "train.json"))
    top = {k: Counter(r.answer for r in train if r.extra["question_type"] == k).most_common(1)[0][0] for k in counts}
    expected = sum(r.answer == top[r.extra["question_type"]] for r in test) / len(test)
    assert results["majority_baseline"] == pytest.approx(expected)
    for v in results["per_kind"].values():
        assert 0 <= v["accuracy"] <= 1 and 0 <= v["blanked_accuracy"] <= 1
    printed = capsys.readouterr().out
    assert "majority" in printed and "blank img" in printed
    assert f"stage 1/2: pretrain (configs/demo/pretrain3d.yaml -> {out}/pretrain)" in printed  # over each bar
    assert f"stage 2/2: finetune (configs/demo/finetune3d.yaml -> {out}/finetune)" in printed
    for kind in [*results["per_kind"], "overall"]:
        assert any(line.split()[:1] == [kind] for line in printed.splitlines()), kind
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(test) and {"prediction", "prediction_blank_image"} <= set(rows[0])
    model, _ = load_trained(results["checkpoint"])
    assert model.vision is None and model.config.vision3d["name"] == "vit3d"
    assert model.num_image3d_tokens == 12 and os.path.isdir(out / "pretrain")


def _capture_generate(model, monkeypatch) -> list[dict]:
    calls = []
    original = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def test_predictor_feeds_volumes_and_blanks_them(tmp_path, monkeypatch):
    """Records with `image3d` reach the model as `pixel_values_3d`; `blank_images` swaps them for black volumes."""
    paths = build_phantoms3d(str(tmp_path), n_train=0, n_test=3, shape=(16, 32, 32), seed=1)
    cfg = tiny_model_config(vision=None)
    cfg["vision3d"] = {"name": "vit3d", **tiny_vision("vit3d"), "volume": {"intensity": "uint8"}}
    cfg["connector3d"] = {"name": "spatial_pool", "stride": 2}
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    predictor = Predictor(model, tok, image_dir=str(tmp_path))
    records = load_records(paths["test"])[:4]
    calls = _capture_generate(model, monkeypatch)
    settings = GenerationSettings(max_new_tokens=2)
    assert len(list(predictor.predict(records, batch_size=4, settings=settings))) == 4
    assert len(list(predictor.predict(records, batch_size=4, settings=settings, blank_images=True))) == 4
    real, blank = calls[0]["pixel_values_3d"], calls[1]["pixel_values_3d"]
    assert real.shape == blank.shape == (4, 1, 16, 32, 32)
    expected = [np.load(tmp_path / r.image3d[0]).astype(np.float32) / 255 for r in records]
    assert torch.allclose(real[:, 0], torch.from_numpy(np.stack(expected)), atol=1e-6)
    assert torch.equal(blank, torch.stack([predictor.volume_preprocess.blank()] * 4)) and not blank.any()
    # A model without a 3D tower says so rather than answering without the volume.
    plain = Predictor(*build_model(tiny_model_config()), image_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no encoder for it"):
        list(plain.predict(records[:1], settings=settings))
