"""`medm data split`: a train / dev split by group (study, patient, image), deterministic for a seed.

    medm data split labels.json --out data/spine --dev-ratio 0.2 --seed 0            # spine label file, by study
    medm data split records.json --out data/split --by image                          # records, by image

Items sharing the `--by` value (a spine label file's `study_id`, a record's `image` list, ...) always land in the
same split, so no study or image is in both. Groups are sorted, shuffled with `random.Random(seed)`, and the first
`round(dev_ratio * groups)` (at least one when the ratio is above 0 and there are two groups or more) go to dev;
items keep their order within each output. The output files have the input's shape: a JSON list (or JSONL) stays
one, and an object holding the list under `--list-key` (a spine label file's `studies`) keeps its other keys.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from medm.data.annotations import read_json_records, read_text, write_json_records


class SplitError(ValueError):
    """An input that cannot be split; the message names the file, the item and the field."""


def _group_key(value: Any) -> str:
    # Lists (a record's image list) and other JSON values group by their JSON text.
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def split_items(items: list[Any], by: str, dev_ratio: float, seed: int, where: str = "input"
                ) -> tuple[list[Any], list[Any]]:
    """(train, dev) items; every item with the same `by` value goes to the same side (rules in the module doc)."""
    if not 0.0 <= dev_ratio < 1.0:
        raise ValueError(f"dev ratio must be in [0, 1), got {dev_ratio}")
    keys = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get(by) is None:
            raise SplitError(f"{where}, item {i}: has no field {by!r} to group by")
        keys.append(_group_key(item[by]))
    groups = sorted(set(keys))
    random.Random(seed).shuffle(groups)
    n_dev = round(dev_ratio * len(groups))
    if dev_ratio > 0 and n_dev == 0 and len(groups) > 1:
        n_dev = 1
    dev_groups = set(groups[:n_dev])
    train = [item for item, k in zip(items, keys) if k not in dev_groups]
    dev = [item for item, k in zip(items, keys) if k in dev_groups]
    return train, dev


def split_file(path: str, out: str, dev_ratio: float = 0.1, seed: int = 0, by: str = "study_id",
               list_key: str | None = "studies", names: tuple[str, str] = ("train", "dev")) -> dict[str, Any]:
    """Split the items of `path` into `out/{train,dev}.json` (`.jsonl` for a JSONL input).

    Args:
        path: a JSON list, a JSONL file, or a JSON object holding the list under `list_key`.
        out: output directory (created).
        dev_ratio: share of the groups that go to dev.
        seed: shuffling seed (same input and seed, same split).
        by: the item field whose value forms the groups.
        list_key: key of the list when the input is an object; ignored for a list input.
        names: output file stems.

    Returns:
        Paths by split name and the counts: `{"train": path, "dev": path, "counts": {...}}`.
    """
    text = read_text(path)  # UTF-8 with or without a byte-order mark, UTF-16 / 32; else an error naming the line
    container: dict[str, Any] | None = None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        data = read_json_records(path)  # JSONL (its errors name the line)
    if isinstance(data, dict):
        container = data
        if not list_key or not isinstance(container.get(list_key), list):
            raise SplitError(f"{path}: a JSON object needs its items as a list under --list-key (got "
                             f"{list_key!r}; keys: {', '.join(container)})")
        items = container[list_key]
    elif isinstance(data, list):
        items = data
    else:
        raise SplitError(f"{path}: expected a JSON list, JSONL, or an object holding the list, got "
                         f"{type(data).__name__}")
    train, dev = split_items(items, by, dev_ratio, seed, path)
    ext = ".jsonl" if path.endswith(".jsonl") and container is None else ".json"
    os.makedirs(out, exist_ok=True)
    result: dict[str, Any] = {}
    for name, part in zip(names, (train, dev)):
        target = os.path.join(out, name + ext)
        if container is None:
            write_json_records(target, part)
        else:
            with open(target, "w", encoding="utf-8") as f:
                json.dump({**container, list_key: part}, f, ensure_ascii=False, indent=1)
                f.write("\n")
        result[name] = target
    n_groups = {name: len({_group_key(i[by]) for i in part}) for name, part in zip(names, (train, dev))}
    result["counts"] = {name: {"items": len(part), "groups": n_groups[name]} for name, part in zip(names, (train, dev))}
    return result
