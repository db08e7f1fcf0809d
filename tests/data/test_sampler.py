"""medm.data.sampler and its trainer wiring: grouped batches cover every sample exactly once per epoch, hold one
modality and similar lengths, repeat for a seed and epoch, deal similar batches to the ranks of one step, and cut
padding; `train_sampling_strategy: auto` picks them, and a data mixture's sampler replaces them."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from PIL import Image

from medm.config import ConfigError
from medm.data.mixture import MixtureSampler
from medm.data.sampler import GroupedSampler, ModalityCodes, grouped_order, grouped_order_array


def synthetic(n=203, seed=0):
    """Lengths and modalities like a VQA mix: image QA ~70-90 tokens, text QA ~20-40, volumes ~140."""
    rng = np.random.default_rng(seed)
    mods = rng.choice(["image", "text", "image3d"], size=n, p=[0.6, 0.3, 0.1]).tolist()
    base = {"image": 70, "text": 20, "image3d": 140}
    lengths = [base[m] + int(rng.integers(0, 60)) for m in mods]
    return lengths, mods


def batches(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


@pytest.mark.parametrize("batch_size,world_size,window", [(4, 1, 64), (8, 2, 4), (3, 4, 1), (16, 1, 2)])
def test_every_sample_exactly_once_and_batches_pure(batch_size, world_size, window):
    lengths, mods = synthetic()
    order = grouped_order(lengths, batch_size, modalities=mods, world_size=world_size, window=window, seed=3)
    assert sorted(order) == list(range(len(lengths)))
    bs = batches(order, batch_size)
    mixed = [b for b in bs if len({mods[i] for i in b}) > 1]
    # Only the epoch's tail (what is left of each modality, < one step each) may mix modalities.
    tail_steps = -(-(3 * (batch_size * world_size - 1)) // (batch_size * world_size))
    assert len(mixed) <= tail_steps * world_size
    assert all(bs.index(b) >= len(bs) - tail_steps * world_size for b in mixed)


def test_deterministic_per_seed_and_epoch_and_sampler_follows_set_epoch():
    lengths, mods = synthetic()
    a = grouped_order(lengths, 4, modalities=mods, seed=1, epoch=0)
    assert a == grouped_order(lengths, 4, modalities=mods, seed=1, epoch=0)
    assert a != grouped_order(lengths, 4, modalities=mods, seed=1, epoch=1)
    assert a != grouped_order(lengths, 4, modalities=mods, seed=2, epoch=0)
    sampler = GroupedSampler(lengths, 4, modalities=mods, seed=1)
    assert list(sampler) == a and len(sampler) == len(lengths)
    sampler.set_epoch(1)
    assert list(sampler) == grouped_order(lengths, 4, modalities=mods, seed=1, epoch=1)


def test_sampler_keeps_no_python_object_per_sample(tmp_path):
    """A store's memory-mapped lengths stay an array, and an epoch's order is an int64 array yielding Python ints
    one at a time (a list of ints costs 36 bytes a sample: ~36 MB per million on every rank)."""
    lengths, mods = synthetic()
    mapped = np.lib.format.open_memmap(tmp_path / "lengths.npy", mode="w+", dtype=np.int32, shape=(len(lengths),))
    mapped[:] = lengths
    sampler = GroupedSampler(mapped, 4, modalities=mods, seed=3)
    assert isinstance(sampler.lengths, np.ndarray) and np.shares_memory(sampler.lengths, mapped)
    order = iter(sampler)
    assert not isinstance(order, list) and type(next(order)) is int
    assert list(sampler) == grouped_order(lengths, 4, modalities=mods, seed=3)
    array = grouped_order_array(lengths, 4, modalities=mods, seed=3)
    assert array.dtype == np.int64 and array.tolist() == list(sampler)
    # Modalities are kept as one byte a sample (a list of names: an 8-byte pointer each), same order either way.
    codes = sampler.modalities
    assert isinstance(codes, ModalityCodes) and codes.codes.itemsize == 1 and codes == mods and list(codes) == mods
    assert codes[:3] == mods[:3] and codes[len(mods) - 1] == mods[-1]
    order = list(GroupedSampler(lengths, 4, modalities=ModalityCodes.of(mods), seed=3))
    assert order == list(sampler)
    # A name that no sample has changes nothing.
    names = ("zzz", *codes.names)
    padded = ModalityCodes(codes.codes.astype(np.int32) + 1, names)
    assert grouped_order(lengths, 4, modalities=padded, seed=3) == order


def test_grouping_cuts_padding_and_longest_batch_comes_first():
    lengths, mods = synthetic(n=512)

    def real_share(order, size=8):
        bs = batches(order, size)
        return sum(lengths[i] for i in order) / sum(max(lengths[i] for i in b) * len(b) for b in bs)

    random_order = np.random.default_rng(0).permutation(len(lengths)).tolist()
    grouped = grouped_order(lengths, 8, modalities=mods, seed=0)
    assert real_share(random_order) < 0.75 and real_share(grouped) > 0.95
    assert max(lengths[i] for i in grouped[:8]) == max(lengths)
    # Length only (no modalities): still near padding-free, batches may mix modalities.
    assert real_share(grouped_order(lengths, 8, seed=0)) > 0.95


def test_ranks_of_one_step_get_batches_of_one_modality_and_similar_length():
    """Through Accelerate's batch sharding (what the HF Trainer does): each rank its share, all samples once."""
    lengths, mods = synthetic(n=300)
    B, W = 4, 2
    sampler = GroupedSampler(lengths, B, modalities=mods, world_size=W, seed=0)
    per_rank = []
    for rank in range(W):
        base = torch.utils.data.BatchSampler(sampler, B, drop_last=False)
        per_rank.append(list(BatchSamplerShard(base, num_processes=W, process_index=rank, even_batches=False)))
    seen = Counter(i for rank_batches in per_rank for b in rank_batches for i in b)
    assert sorted(seen) == list(range(len(lengths))) and set(seen.values()) == {1}
    steps = list(zip(*per_rank))
    pure = steps[:-3]  # the tail may mix
    for step in pure:
        kinds = {mods[i] for b in step for i in b}
        assert len(kinds) == 1
        step_lengths = [lengths[i] for b in step for i in b]
        # Sorted together: neighbouring length buckets of 8 tokens (a modality spans 60): two buckets where a
        # modality has many samples, three for the rare volumes.
        assert max(step_lengths) - min(step_lengths) <= (23 if kinds == {"image3d"} else 15)


def test_lengths_within_a_bucket_keep_a_random_order():
    """A "yes" and a "no" answer differ by a token: batches must not be sorted into all-yes and all-no."""
    lengths = [16 + i % 2 for i in range(64)]  # one bucket of 8 tokens (16..23)
    mixed = sum(len({lengths[i] for i in b}) == 2 for b in batches(grouped_order(lengths, 8, seed=0), 8))
    exact = sum(len({lengths[i] for i in b}) == 2 for b in batches(grouped_order(lengths, 8, bucket=1, seed=0), 8))
    assert mixed >= 6 and exact == 0


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="batch_size"):
        GroupedSampler([1, 2], 0)
    with pytest.raises(ValueError, match="3 modalities for 2 lengths"):
        grouped_order([1, 2], 1, modalities=["a", "b", "c"])


# ---- trainer wiring -------------------------------------------------------------------------------------------
def write_records(tmp_path, name, n, with_images):
    Image.new("RGB", (20, 20), (120, 60, 30)).save(tmp_path / "img.png")
    recs = []
    for i in range(n):
        rec = {"id": f"{name}{i}", "conversations": [{"from": "human", "value": "Is there a lesion?" + " Look." * i},
                                                     {"from": "gpt", "value": "Yes." if i % 2 else "No."}]}
        if with_images:
            rec["image"] = ["img.png"]
        recs.append(rec)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(recs))
    return str(path)


def config(tmp_path, data, **train):
    from medm.models.tiny import tiny_model_config
    from medm.train.args import parse_train_config

    t = {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 2, "report_to": [],
         "disable_tqdm": True, "device": "cpu", "save_strategy": "no", **train}
    return parse_train_config({"model": tiny_model_config(), "data": data, "train": t})


def trainer_for(cfg, model, tok, dataset, collator, sampler=None):
    from medm.train.trainer import MedMTrainer, training_arguments

    return MedMTrainer(model=model, args=training_arguments(cfg.train, "cpu"), train_dataset=dataset,
                       data_collator=collator, processing_class=tok, sampling=cfg.train.train_sampling_strategy,
                       group_window=cfg.train.group_window, train_sampler=sampler)


def test_auto_strategy_groups_by_modality_and_length(tiny_model, tmp_path):
    from medm.train.trainer import build_training_inputs

    model, tok = tiny_model
    path = write_records(tmp_path, "a", 6, with_images=True)
    text = write_records(tmp_path, "t", 6, with_images=False)
    cfg = config(tmp_path, {"path": [path, text], "image_dir": str(tmp_path)})
    assert cfg.train.train_sampling_strategy == "auto"
    dataset, collator, sampler = build_training_inputs(cfg, model, tok)
    assert sampler is None
    trainer = trainer_for(cfg, model, tok, dataset, collator)
    got = trainer._get_train_sampler()
    assert isinstance(got, GroupedSampler) and got.modalities == dataset.modalities and got.batch_size == 2
    assert sorted(got) == list(range(12))
    # The DataLoader the Trainer builds yields modality-pure batches.
    loader_batches = [b for b in trainer.get_train_dataloader()]
    assert sum("pixel_values" in b for b in loader_batches) == 3
    assert all("pixel_values" not in b or len(b["pixel_values"]) == 2 for b in loader_batches)
    cfg_len = config(tmp_path, {"path": path, "image_dir": str(tmp_path)}, train_sampling_strategy="group_by_length")
    assert trainer_for(cfg_len, model, tok, dataset, collator)._get_train_sampler().modalities is None
    cfg_rand = config(tmp_path, {"path": path, "image_dir": str(tmp_path)}, train_sampling_strategy="random")
    assert not isinstance(trainer_for(cfg_rand, model, tok, dataset, collator)._get_train_sampler(), GroupedSampler)


def test_data_mixture_builds_concat_dataset_and_its_sampler(tiny_model, tmp_path):
    from medm.train.trainer import build_training_inputs

    model, tok = tiny_model
    a = write_records(tmp_path, "a", 4, with_images=True)
    b = write_records(tmp_path, "b", 8, with_images=False)
    data = {"path": [{"path": a, "ratio": 0.5, "order": 1}, {"path": b, "ratio": 0.5, "order": 2}],
            "image_dir": str(tmp_path), "mixture": {"num_samples": 10, "seed": 3}}
    cfg = config(tmp_path, data)
    dataset, collator, sampler = build_training_inputs(cfg, model, tok)
    assert isinstance(dataset, torch.utils.data.ConcatDataset) and len(dataset) == 12
    assert isinstance(sampler, MixtureSampler) and len(sampler) == 10 and sampler.args.seed == 3
    plan = list(sampler)
    # Curriculum: the 5 samples of order 1 (file a: indices 0-3, one repeated) come before file b's.
    assert all(i < 4 for i in plan[:5]) and all(i >= 4 for i in plan[5:])
    trainer = trainer_for(cfg, model, tok, dataset, collator, sampler)
    assert trainer._get_train_sampler() is sampler
    with pytest.raises(ConfigError, match="mixture plans each epoch itself"):
        trainer_for(config(tmp_path, data, train_sampling_strategy="group_by_length"), model, tok, dataset,
                    collator, sampler)
    with pytest.raises(ConfigError, match="data.packing: a data mixture"):
        build_training_inputs(config(tmp_path, {**data, "packing": True}), model, tok)


def test_unknown_strategy_is_a_config_error(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="train.train_sampling_strategy: 'by_modality' is not allowed"):
        config(tmp_path, None, train_sampling_strategy="by_modality")  # when the config is read
    model, tok = tiny_model
    cfg = config(tmp_path, None)
    cfg.train.train_sampling_strategy = "by_modality"  # set in code: the trainer refuses it too
    with pytest.raises(ConfigError, match="'by_modality'; valid: auto, random"):
        trainer_for(cfg, model, tok, [], None)
