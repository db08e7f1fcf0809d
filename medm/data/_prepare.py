"""`medm data prepare TRAIN.yaml [overrides]`: build the record stores (medm.data.store) of a training config ahead
of training, on one machine, so that a (multi-node) job pointed at the same `data.cache_dir` opens them at once."""

from __future__ import annotations

import os
from typing import Any

from medm.config import ConfigError, from_dict
from medm.data.dataset import DataArgs
from medm.data.store import SampleStore
from medm.models import build_model
from medm.train.args import has_validation
from medm.train.trainer import build_training_inputs, build_validation_data


def _stores(dataset) -> list:
    """The `SampleStore`s behind a training or validation dataset (a mixture's, a packed dataset's, a split's)."""
    if dataset is None:
        return []
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, SampleStore):
        return [samples]
    inner = list(getattr(dataset, "datasets", None) or [])
    if getattr(dataset, "dataset", None) is not None:
        inner.append(dataset.dataset)
    return [s for d in inner for s in _stores(d)]


def prepare(cfg) -> list[dict[str, Any]]:
    """Build (or find) every record store `medm train` would open for `cfg` (training files, mixture entries,
    validation records); one line of facts per store.

    Raises:
        ConfigError: `data.store: memory` or `data.streaming`, where there is nothing to prepare.
    """
    data = from_dict(DataArgs, cfg.data or {}, "data")
    if data.store != "arrow" or getattr(data, "streaming", False):
        raise ConfigError("medm data prepare builds the record store of data.store: arrow; this config reads its "
                          f"records {'as a stream' if getattr(data, 'streaming', False) else 'into memory'}")
    # The model gives the tokenizer, template and media token counts the stores are keyed by.
    model, tokenizer = build_model(cfg.model)
    dataset, _, _ = build_training_inputs(cfg, model, tokenizer)
    stores = _stores(dataset)
    if has_validation(data):
        stores += _stores(build_validation_data(cfg, model, tokenizer))
    seen, out = set(), []
    for s in stores:
        if s.path in seen:
            continue
        seen.add(s.path)
        m = s.meta
        out.append({"path": s.path, "files": [f[0] for f in m["files"]], "records": m["num_records"],
                    "samples": m["num_samples"], "dropped": m["num_dropped"], "bad_media": m["num_bad_media"],
                    "built": s.built, "build_seconds": m["build_seconds"], "num_proc": m["num_proc"],
                    "size_mb": round(sum(os.path.getsize(os.path.join(s.path, f)) for f in os.listdir(s.path))
                                     / 2**20, 1)})
    return out
