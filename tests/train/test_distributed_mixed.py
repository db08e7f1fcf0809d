"""Two CPU ranks (gloo, torchrun) on mixed-modality data: DDP with and without gradient checkpointing, ZeRO-2 and
ZeRO-3; random and modality-grouped sampling; image + text-only, 2D + 3D + text, packed rows, and Qwen-VL image +
text-only records.

Each launch runs several trainings in one pair of processes (tests/train/dist_worker.py). A run must finish with
identical weights on both ranks, hit at least one step where one rank's batch has an image (or volume) and the
other's has none (the case that used to crash: DDP's unused-parameter error, ZeRO's collective mismatch), and log
per step the loss of a one-process run on the same global batches (within 1e-4: the Trainer averages tokens across
ranks, `average_tokens_across_devices`; ZeRO-3 against a one-process ZeRO-3 run, whose zero.Init draws the random
initial weights in its own order).

All three launches run by default: 1 to 2 minutes together on 2 shared cores (the references included).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, free_port, run_env, write_mixed

from medm.data.builders.phantoms import build_phantoms

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("dist_worker.py")
BATCH = 2  # per rank
TOL = 1e-4


def write_qwenvl_mixed(out: Path, n: int = 16) -> Path:
    """Phantom VQA records (64 px images) alternating with text-only records, in train.json."""
    paths = build_phantoms(str(out), n_train=4, n_test=0, seed=0)
    images = json.loads(Path(paths["train"]).read_text())
    records = []
    for i in range(n):
        if i % 2 == 0:
            records.append(images[i // 2])
        else:
            records.append({"id": f"text{i}", "conversations": [
                {"from": "human", "value": f"Is {i} an odd number?"}, {"from": "gpt", "value": "yes"}]})
    path = out / "train.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixed")
    # 20 records (10 image, 10 text): the grouped sampler's last step mixes the two modalities across the ranks.
    return {"mixed": write_mixed(root / "mixed", n=20),
            "mixed3d": write_mixed(root / "mixed3d", n=24, volumes=True),
            "qwenvl": write_qwenvl_mixed(root / "qwenvl")}


# name -> (data, model kind, stage, train overrides, data overrides)
RUNS = {
    "image_text_random": ("mixed", "medm", {}, {"train_sampling_strategy": "random"}, {}),
    "image_text_grouped": ("mixed", "medm", {}, {"train_sampling_strategy": "group_by_modality_length",
                                                 "max_steps": 5}, {}),
    # The 3D encoder trains too: DDP then looks for unused parameters (find_unused_parameters) every step.
    "2d_3d_text": ("mixed3d", "medm3d", {"vision3d": "full"}, {"train_sampling_strategy": "random"}, {}),
    "packed": ("mixed", "medm", {}, {"train_sampling_strategy": "random", "per_device_train_batch_size": 1},
               {"packing": True, "pack_length": 96}),
    "qwenvl": ("qwenvl", "qwenvl", {}, {"train_sampling_strategy": "random"}, {}),
}
# launch -> (its runs, train settings every run of it shares)
LAUNCHES = {
    "ddp": (["image_text_random", "image_text_grouped", "2d_3d_text", "packed", "qwenvl"],
            {"gradient_checkpointing": True}),
    "zero2": (["image_text_random", "2d_3d_text", "qwenvl"],
              {"deepspeed": str(REPO / "configs" / "deepspeed" / "zero2.json")}),
    "zero3": (["image_text_grouped", "2d_3d_text", "qwenvl"],
              {"deepspeed": str(REPO / "configs" / "deepspeed" / "zero3.json"), "gradient_checkpointing": True}),
}


def _spec(name: str, out: Path, datasets: dict, shared: dict, **extra) -> dict:
    data, kind, stage, train, data_args = RUNS[name]
    train = {"max_steps": 4, "per_device_train_batch_size": BATCH, **train, **shared}
    return {"out": str(out), "data": str(datasets[data]), "model": kind, "stage": stage, "train": train,
            "data_args": data_args, **extra}


def _launch(specs: list[dict], nproc: int) -> None:
    cmd = [sys.executable, str(WORKER), json.dumps({"runs": specs})]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                    "--master_port", str(free_port())]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _global_batches(ranks: list[dict]) -> list[int]:
    """The samples of each step, rank 0's batch then rank 1's: what one process trains on to match."""
    steps = len(ranks[0]["media"])
    size = len(ranks[0]["indices"]) // steps
    return [i for s in range(steps) for r in ranks for i in r["indices"][s * size:(s + 1) * size]]


@pytest.fixture(scope="module")
def results(datasets, tmp_path_factory) -> dict:
    """launch -> run -> {"ranks": [rank0, rank1], "reference": one-process run on the same global batches}."""
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for launch in LAUNCHES:
        names, shared = LAUNCHES[launch]
        specs = [_spec(n, root / launch / n, datasets, shared) for n in names]
        _launch(specs, 2)
        out[launch] = {n: {"ranks": [torch.load(root / launch / n / f"rank{r}.pt") for r in (0, 1)]} for n in names}
    # One-process references, one per distinct global batch order (the launches share seeds, so mostly one per run).
    # ZeRO-3's are ZeRO-3 runs too: zero.Init draws the random initial weights in another order than a plain build.
    refs, todo = {}, {False: [], True: []}
    for launch, runs in out.items():
        zero3 = launch == "zero3"
        for name, res in runs.items():
            key = (name, zero3, tuple(_global_batches(res["ranks"])))
            if key not in refs:
                refs[key] = root / "ref" / f"{name}-{len(refs)}"
                steps = len(res["ranks"][0]["media"])
                shared = {"per_device_train_batch_size": len(key[2]) // steps, "train_sampling_strategy": "random",
                          "max_steps": steps}
                if zero3:
                    shared["deepspeed"] = LAUNCHES["zero3"][1]["deepspeed"]
                todo[zero3].append(_spec(name, refs[key], datasets, shared, replay=list(key[2])))
            res["reference"] = refs[key]
    for specs in todo.values():
        _launch(specs, 1)
    for runs in out.values():
        for res in runs.values():
            res["reference"] = torch.load(res["reference"] / "rank0.pt")
    return out


def _cases():
    return [(launch, name) for launch, (names, _) in LAUNCHES.items() for name in names]


@pytest.mark.parametrize(("launch", "name"), _cases(), ids=[f"{a}-{b}" for a, b in _cases()])
def test_two_ranks_on_mixed_data_match_one_process(results, launch, name):
    ranks, ref = results[launch][name]["ranks"], results[launch][name]["reference"]
    assert [r["world_size"] for r in ranks] == [2, 2]
    expected_zero = {"ddp": None, "zero2": 2, "zero3": 3}[launch]
    assert [r["zero_stage"] for r in ranks] == [expected_zero] * 2
    # The case that used to crash: in some step one rank has media of a kind and the other has none.
    kinds = ("images", "volumes") if name == "2d_3d_text" else ("images",)
    for kind in kinds:
        assert any(bool(a[kind]) != bool(b[kind]) for a, b in zip(ranks[0]["media"], ranks[1]["media"])), \
            f"no step with {kind} on one rank only: {ranks[0]['media']} / {ranks[1]['media']}"
    # Both ranks end with the same weights, those of the one-process run.
    end0, end1 = ranks[0]["end"], ranks[1]["end"]
    assert end0.keys() == end1.keys() == ref["end"].keys()
    for k in end0:
        assert torch.equal(end0[k], end1[k]), f"{k} differs between the ranks"
        assert torch.allclose(end0[k], ref["end"][k], atol=1e-4), f"{k} differs from the one-process run"
    # Per step, the loss over both ranks' batches is the one-process loss over the same global batch.
    assert len(ranks[0]["losses"]) == len(ref["losses"]) == len(ranks[0]["media"])
    diffs = [abs(a - b) for a, b in zip(ranks[0]["losses"], ref["losses"])]
    assert max(diffs) < TOL, f"losses {ranks[0]['losses']} vs one process {ref['losses']}"
    assert ref["indices"] == _global_batches(ranks)
