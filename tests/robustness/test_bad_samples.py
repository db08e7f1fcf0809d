"""A sample whose image fails to decode *during* training is skipped, logged with its file and id, replaced by the
next good sample and counted (`bad_samples` in the logs); more than `data.max_bad_samples` is an error naming the
last files. Across DataLoader workers the count is of distinct samples."""

import logging
import pickle
import shutil

import pytest
import torch
from train_helpers import make_cfg

from medm.data._bad_samples import BadSamples, TooManyBadSamples, bad_sample_count, resolve_limit
from medm.data.dataset import DataArgs, build_dataset
from medm.train.metrics import read_metrics
from medm.train.trainer import run_training


def _spoil(data_dir, indices, how="garble"):
    """Spoil some of the toy images after the records were written (as a disk or a copy job might)."""
    for i in indices:
        path = data_dir / "images" / f"{i:03d}.png"
        if how == "garble":
            path.write_bytes(path.read_bytes()[:40] + bytes(200))
        elif how == "delete":
            path.unlink()


@pytest.fixture
def spoilt(tmp_path, toy_data):
    """A copy of the 16-sample toy data with images 3 and 8 garbled and 11 deleted."""
    data = tmp_path / "data"
    shutil.copytree(toy_data.parent, data)
    _spoil(data, [3, 8])
    _spoil(data, [11], "delete")
    return data / "train.json"


def _dataset(model, tok, path, **kw):
    return build_dataset(DataArgs(path=str(path), image_dir=str(path.parent), **kw), model, tok)


def test_bad_sample_is_replaced_by_the_next_good_one_and_counted_once(tiny_model, spoilt, caplog):
    model, tok = tiny_model
    ds = _dataset(model, tok, spoilt)
    assert len(ds) == 16 and ds.bad_samples.count == 0
    with caplog.at_level(logging.WARNING, logger="medm.data.dataset"):
        item = ds[3]
    assert "skipping sample 'toy3': cannot load image" in caplog.text and "003.png" in caplog.text
    # The replacement is deterministic: the next sample with an image that is no longer than sample 3.
    j = next(j for j in range(4, 16) if ds.lengths[j] <= ds.lengths[3])
    expected = ds[j]
    torch.testing.assert_close(item["input_ids"], expected["input_ids"])
    torch.testing.assert_close(item["pixel_values"], expected["pixel_values"])
    assert ds.bad_samples.count == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medm.data.dataset"):
        again = ds[3]  # known bad: not read again, not logged again, not counted again
    assert caplog.text == "" and ds.bad_samples.count == 1
    torch.testing.assert_close(again["input_ids"], expected["input_ids"])
    # A missing file is a bad sample too; the deleted image names its path.
    with caplog.at_level(logging.WARNING, logger="medm.data.dataset"):
        ds[11]
    assert "011.png" in caplog.text and "file not found" in caplog.text and ds.bad_samples.count == 2
    assert [ds[i]["length"] for i in range(16)]  # every index still yields an item


@pytest.mark.parametrize("limit, allowed", [(0, 0), (1, 1), (0.1, 1), (None, None)])
def test_limit_as_count_or_fraction(limit, allowed, tiny_model, spoilt):
    model, tok = tiny_model
    ds = _dataset(model, tok, spoilt, max_bad_samples=limit)
    assert ds.bad_samples.limit == allowed
    if allowed is None:
        for i in (3, 8, 11):
            ds[i]
        assert ds.bad_samples.count == 3
        return
    for i in [3, 8, 11][:allowed]:
        ds[i]
    with pytest.raises(TooManyBadSamples) as err:
        for i in [3, 8, 11][allowed:]:
            ds[i]
    msg = str(err.value)
    assert f"more than data.max_bad_samples={limit} allows" in msg
    assert "record 'toy" in msg and ".png" in msg and "medm data validate" in msg


def test_negative_limit_is_refused():
    with pytest.raises(ValueError, match="data.max_bad_samples: -1 must be >= 0"):
        resolve_limit(-1, 10)


def test_workers_share_one_count_of_distinct_bad_samples(tiny_model, spoilt):
    """Two DataLoader worker processes, two epochs: 3 distinct bad samples, counted once each, seen from the main
    process; every batch still holds all its samples."""
    model, tok = tiny_model
    ds = _dataset(model, tok, spoilt)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=lambda items: len(items),
                                         persistent_workers=True)
    for _ in range(2):
        assert sum(loader) == 16
    assert ds.bad_samples.count == 3 == bad_sample_count(ds)
    del loader


def test_a_copy_of_the_tracker_is_independent():
    tracker = BadSamples(4, 10)
    tracker.add(1, "r1", ValueError("x"))
    copy = pickle.loads(pickle.dumps(tracker))  # not a worker start: a plain copy, sharing nothing
    copy.add(2, "r2", ValueError("y"))
    assert (tracker.count, copy.count) == (1, 2) and copy.is_bad(1) and not tracker.is_bad(2)


def test_training_skips_and_logs_bad_samples(tmp_path, spoilt):
    cfg = make_cfg(tmp_path / "run", spoilt, max_steps=5, train_sampling_strategy="sequential")
    trainer = run_training(cfg)
    assert trainer.state.global_step == 5
    logged = [h["bad_samples"] for h in trainer.state.log_history if "loss" in h]
    # Batches of 4 in order (read one batch ahead): toy3 in step 1, toy8 and toy11 in step 3, toy3 again in step 5
    # (second epoch), counted once.
    assert logged[0] >= 1 and logged == sorted(logged) and logged[-1] == 3
    assert read_metrics(str(tmp_path / "run"))[-1]["bad_samples"] == 3
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_training_stops_past_the_limit_naming_the_files(tmp_path, spoilt):
    cfg = make_cfg(tmp_path / "run", spoilt, max_steps=8, train_sampling_strategy="sequential")
    cfg.data["max_bad_samples"] = 0
    with pytest.raises(TooManyBadSamples, match=r"(?s)1 of 16 samples failed to load.*record 'toy3'.*003\.png"):
        run_training(cfg)
