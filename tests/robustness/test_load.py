"""Load: a 10,000-record file is validated (every image decoded) and built into a training dataset without errors and
within a stated memory bound, and reading items does not grow memory.

(8 playground users at once: tests/playground/test_app.py::test_eight_users_at_once_all_get_answers.)
"""

import gc
import json

import numpy as np
import psutil
import pytest
from PIL import Image

from medm.cli import main
from medm.data.dataset import DataArgs, build_dataset

N_RECORDS = 10_000
# Bounds on resident memory growth (stated in docs/reliability.md). Measured on the tiny model: about 50 MB for
# validating and building 10,000 records (token ids are kept as compact arrays, images are read per item).
MAX_BUILD_GROWTH_MB = 150
MAX_READ_GROWTH_MB = 10  # between two passes over the same 1,000 items: no leak per item


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """10,000 records over 10 small PNGs, a third of them with two turns, as JSONL."""
    root = tmp_path_factory.mktemp("big")
    (root / "images").mkdir()
    for k in range(10):
        Image.fromarray(np.full((16, 16), 20 * k, np.uint8)).save(root / "images" / f"{k}.png")
    with open(root / "train.jsonl", "w") as f:
        for i in range(N_RECORDS):
            turns = [{"from": "human", "value": f"<image>\nIs there a lesion in region {i}?"},
                     {"from": "gpt", "value": "yes" if i % 2 else "no"}]
            if i % 3 == 0:
                turns += [{"from": "human", "value": "Which side?"}, {"from": "gpt", "value": "left"}]
            f.write(json.dumps({"id": f"r{i:05d}", "image": [f"images/{i % 10}.png"], "conversations": turns}) + "\n")
    return root / "train.jsonl"


def test_ten_thousand_records_validate_and_build_within_the_memory_bound(big_file, tiny_model, capsys):
    model, tok = tiny_model
    start = _rss_mb()
    assert main(["data", "validate", str(big_file), "--image-dir", str(big_file.parent)]) == 0
    assert f"checked {N_RECORDS} record(s) in {big_file}: {N_RECORDS} good, 0 bad" in capsys.readouterr().out
    ds = build_dataset(DataArgs(path=str(big_file), image_dir=str(big_file.parent)), model, tok)
    built = _rss_mb()
    assert len(ds) == N_RECORDS and ds.num_dropped == 0
    assert built - start < MAX_BUILD_GROWTH_MB, f"validate + build grew RSS by {built - start:.0f} MB"

    every_tenth = range(0, N_RECORDS, 10)
    for i in every_tenth:
        ds[i]
    first = _rss_mb()
    for i in every_tenth:
        item = ds[i]
    second = _rss_mb()
    assert item["pixel_values"].shape[0] == 1 and ds.bad_samples.count == 0
    assert second - first < MAX_READ_GROWTH_MB, f"a second pass over 1,000 items grew RSS by {second - first:.1f} MB"
