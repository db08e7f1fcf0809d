"""Mixtures and curricula: entry parsing, per-file sample counts, repetition vs replacement, curriculum blocks,
determinism per seed and epoch, and the sampler over a ConcatDataset."""

from collections import Counter

import pytest
import torch

from medm.data.mixture import (
    MixtureArgs,
    MixtureEntry,
    MixtureError,
    MixtureSampler,
    build_mixture,
    parse_mixture,
    plan_epoch,
    sample_counts,
)


def test_parse_entries_and_defaults():
    assert parse_mixture("a.json", image_dir="imgs") == [MixtureEntry("a.json", "imgs")]
    entries = parse_mixture([{"path": "a.json", "ratio": 2, "order": 1},
                             {"path": "b.jsonl", "image_dir": "b_imgs", "ratio": 0.5, "order": 2}], image_dir="d")
    assert entries == [MixtureEntry("a.json", "d", 2.0, 1), MixtureEntry("b.jsonl", "b_imgs", 0.5, 2)]


@pytest.mark.parametrize("spec,message", [
    ([{"path": "a.json", "weight": 1}], r"entry 0.weight: unknown key; valid keys: image_dir, order, path, ratio"),
    ([{"image_dir": "x"}], "entry 0: needs a `path`"),
    ([{"path": "a.json", "ratio": -1}], r"entry 0 \(a.json\): ratio must be a number >= 0"),
    ([{"path": "a.json", "ratio": 1}, "b.json"], "b.json has none: give every entry a ratio or none"),
    ([{"path": "a.json", "ratio": 0}, {"path": "b.json", "ratio": 0}], "every ratio is 0"),
    ([{"path": "a.json", "order": 1}, "b.json"], "b.json has none: give every entry an order or none"),
    ([{"path": "a.json", "order": "first"}], "order must be an integer stage"),
    ([], "empty"),
])
def test_parse_errors_name_the_entry(spec, message):
    with pytest.raises(MixtureError, match=message):
        parse_mixture(spec)


def test_counts_follow_ratios_and_add_up():
    e = [MixtureEntry("a", ratio=1), MixtureEntry("b", ratio=1), MixtureEntry("c", ratio=1)]
    assert sample_counts([5, 5, 5], e, num_samples=10) == [4, 3, 3]  # largest remainder, ties to the first
    assert sample_counts([10, 30], [MixtureEntry("a", ratio=0.5), MixtureEntry("b", ratio=0.5)]) == [20, 20]
    assert sample_counts([10, 30], [MixtureEntry("a"), MixtureEntry("b")]) == [10, 30]  # no ratio: sizes
    with pytest.raises(MixtureError, match="b: asked for 5 sample.* dataset is empty"):
        sample_counts([10, 0], [MixtureEntry("a", ratio=1), MixtureEntry("b", ratio=1)])


def test_plain_epoch_is_a_permutation():
    plan = plan_epoch([4, 6], [MixtureEntry("a"), MixtureEntry("b")], seed=0)
    assert sorted(plan) == list(range(10)) and plan != list(range(10))


def test_small_file_is_repeated_evenly_and_big_file_subsampled():
    entries = [MixtureEntry("small", ratio=0.5), MixtureEntry("big", ratio=0.5)]
    plan = plan_epoch([3, 100], entries, num_samples=40, seed=1)
    small = Counter(i for i in plan if i < 3)
    big = [i for i in plan if i >= 3]
    assert sum(small.values()) == 20 and set(small.values()) <= {6, 7}  # 20 / 3 -> floor or ceil
    assert len(big) == 20 and len(set(big)) == 20 and all(3 <= i < 103 for i in big)
    with_replacement = plan_epoch([3, 100], entries, num_samples=40, seed=1, replacement=True)
    assert sum(i < 3 for i in with_replacement) == 20 and all(0 <= i < 103 for i in with_replacement)


def test_deterministic_per_seed_and_epoch():
    entries = [MixtureEntry("a", ratio=1), MixtureEntry("b", ratio=3)]
    a = plan_epoch([50, 50], entries, seed=7, epoch=2)
    assert a == plan_epoch([50, 50], entries, seed=7, epoch=2)
    assert a != plan_epoch([50, 50], entries, seed=7, epoch=3)
    assert a != plan_epoch([50, 50], entries, seed=8, epoch=2)
    assert plan_epoch([3, 3], [MixtureEntry("a"), MixtureEntry("b")], shuffle=False) == [0, 1, 2, 3, 4, 5]


def test_curriculum_blocks_in_stage_order():
    # Stage 1: open-ended + descriptive files; stage 2: closed-ended. Listed out of order on purpose.
    entries = [MixtureEntry("closed", order=2), MixtureEntry("open", order=1), MixtureEntry("describe", order=1)]
    sizes = [30, 20, 10]
    plan = plan_epoch(sizes, entries, seed=0)
    stage1, stage2 = plan[:30], plan[30:]
    assert all(i >= 30 for i in stage1) and sorted(stage2) == list(range(30))
    assert sorted(stage1) == list(range(30, 60))
    # The stage-1 block mixes its two files rather than running them one after the other.
    first_ten = {"open" if i < 50 else "describe" for i in stage1[:10]}
    assert first_ten == {"open", "describe"}
    # Ratios and orders together: counts from ratios, arranged by stage.
    mixed = [MixtureEntry("a", ratio=3, order=2), MixtureEntry("b", ratio=1, order=1)]
    plan = plan_epoch([10, 10], mixed, num_samples=20)
    assert all(i >= 10 for i in plan[:5]) and all(i < 10 for i in plan[5:]) and len(plan) == 20


def test_sampler_over_concat_dataset():
    entries = parse_mixture([{"path": "a", "ratio": 0.25}, {"path": "b", "ratio": 0.75}])
    sets = {"a": torch.zeros(8), "b": torch.ones(4)}
    dataset, sampler = build_mixture(entries, lambda e: torch.utils.data.TensorDataset(sets[e.path]),
                                     MixtureArgs(num_samples=16, seed=0))
    assert len(dataset) == 12 and len(sampler) == 16
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
    values = torch.cat([b[0] for b in loader])
    assert values.numel() == 16 and int(values.sum()) == 12  # 12 of 16 samples from "b" (4 samples, 3 times each)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(Counter(list(sampler)).values()) == [1, 1, 1, 1, 3, 3, 3, 3]
    assert isinstance(MixtureSampler([1], [MixtureEntry("x")]), torch.utils.data.Sampler)
