"""python benchmarks/bench_data.py [--quick] [--samples 64] [--image-size 224] [--volume-size D H W] [--memory-only]

Samples per second through `ConversationDataset` (what one DataLoader worker delivers) against the samples per
second one training step consumes:

- 2D: the real VQA-RAD JPEGs (../shared/data/vqa_rad, 256 px to 2321x1384) decoded and preprocessed to
  `--image-size` (CLIP-style resize + normalise), first pass and second pass (page cache warm). medm keeps no 2D
  cache: decoding is the whole cost, and this figure says whether one would pay.
- 3D: the real CT / MR NIfTI volumes (../shared/data/nifti) read, reoriented, intensity-scaled and resized to
  `--volume-size` by `medm.data.volumes.VolumePreprocess`: cold (no cache) and cached (`volume.cache_dir`, the
  preprocessed array read back).
- 3D peak memory per volume size: a synthetic int16 CT (.nii.gz; 128^3, 256^3, 512^2 x 300, 512^2 x 600, and a
  512^2 x 120 DICOM series) read and preprocessed to `--volume-size` with `intensity: auto` in a fresh process;
  `peak_mb` is the highest anonymous resident memory (sampled every 2 ms from /proc, Linux) above the same process
  after a warm-up, `copies` that rise in float32 copies of the volume (the loader aims at two at most).
- the step: forward + backward + AdamW of a 2D model (`small` on the CPU, `base` on a GPU; see bench_step.py)
  and of a 3D model (a ViT3D over `--volume-size` + the same LLM) at `--batch-size`, on random pixels.

Loaders and steps run interleaved (`--repeats` rounds, default 5; the 2D first pass once, before them); each
figure is the median with min and max, the ratios taken round by round.
`workers_needed` = step samples/s / one worker's samples/s; the goal is that the default worker count
(train.dataloader_num_workers: null -> 0 on the CPU, min(8, cores - 1) on a GPU) covers it. On the CPU, with no
workers, `loader_share` is the share of each step spent loading.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    Bench,
    Skip,
    data_dir,
    interleaved,
    model_config,
    ratio_stats,
    spread_stats,
    timed,
    vqa_rad_records,
)

VOLUMES = ["example_ct.nii.gz", "example_ct_sm.nii.gz", "example_mr_sm.nii.gz", "aorta_ct_cropped.nii.gz",
           "anatomical.nii"]


def rate(ds, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    return n / (time.perf_counter() - t)


def step_timer(model, batch: dict, device: str, steps: int):
    """fn() -> seconds of `steps` training steps (forward + backward + AdamW) of `model` on `batch`."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def run():
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return lambda: steps * timed(run, device, repeat=steps, warmup=0)


def batch_for(model, n_tokens: int, batch_size: int, key: str, shape: tuple, device: str) -> dict:
    """A batch of `n_tokens`-long samples, each with one image (or volume) of `shape`."""
    token = model.config.image_token_id if key == "pixel_values" else model.config.image3d_token_id
    n_media = model.num_image_tokens if key == "pixel_values" else model.num_image3d_tokens
    ids = torch.randint(3, 500, (batch_size, n_tokens))
    ids[:, 4:4 + n_media] = token
    labels = ids.clone()
    labels[:, :4 + n_media] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            key: torch.randn(batch_size, *shape).to(device)}


# A fresh process per volume: memory after a warm-up (imports, MONAI's first call), then its peak over one volume.
_PEAK = """
import json, sys, threading, time, warnings
import numpy as np, nibabel as nib, torch
from medm.data.volumes import VolumePreprocess
torch.set_num_threads(1)
path, warm, size = sys.argv[1], sys.argv[2], tuple(int(v) for v in sys.argv[3:6])
args = {"orientation": "LPS", "intensity": "auto", "modality": "CT"}
warnings.simplefilter("ignore")

def anon_kb():  # anonymous resident memory: what arrays and tensors take (library code pages excluded)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

VolumePreprocess(args, size)(warm)
base, peak, done = anon_kb(), [0], False

def sample():
    while not done:
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.002)

thread = threading.Thread(target=sample)
thread.start()
VolumePreprocess(args, size)(path)
done = True
thread.join()
print(json.dumps({"peak_kb": max(peak[0], anon_kb()) - base}))
"""


def _synthetic_ct(shape: tuple[int, int, int]) -> np.ndarray:
    """(X, Y, Z) int16 HU: air around a soft-tissue cylinder, as a CT's values are laid out."""
    x, y, _ = shape
    vol = np.full(shape, -1000, np.int16)
    yy, xx = np.ogrid[:y, :x]
    vol[((xx - x / 2) ** 2 + (yy - y / 2) ** 2 < (0.4 * x) ** 2).T] = 40
    return vol


def _dicom_series(folder: Path, shape: tuple[int, int, int]) -> Path:
    import copy

    import pydicom
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    plane = (_synthetic_ct((shape[0], shape[1], 1))[:, :, 0].T + 1024).astype(np.int16)  # stored = HU + 1024
    for k in range(shape[2]):
        ds = copy.deepcopy(base)
        ds.Rows, ds.Columns = shape[1], shape[0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = plane.tobytes()
        ds.save_as(folder / f"s{k:04d}.dcm")
    return folder


def volume_peak_memory(quick: bool, out_size: tuple[int, int, int]) -> list[dict[str, Any]]:
    """Peak memory of loading one volume of each size (see the module docstring)."""
    import subprocess
    import sys

    import nibabel as nib

    sizes = [("nifti", (32, 32, 32))] if quick else [("nifti", (128, 128, 128)), ("nifti", (256, 256, 256)),
                                                    ("nifti", (512, 512, 300)), ("nifti", (512, 512, 600)),
                                                    ("dicom", (512, 512, 120))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm.nii.gz"
        nib.save(nib.Nifti1Image(_synthetic_ct((16, 16, 16)), np.eye(4)), warm)
        for kind, shape in sizes:
            name = "x".join(str(s) for s in shape)
            if kind == "nifti":
                path = Path(tmp) / f"{name}.nii.gz"
                nib.save(nib.Nifti1Image(_synthetic_ct(shape), np.diag([0.7, 0.7, 1.0, 1.0])), path)
            else:
                path = _dicom_series(Path(tmp) / name, shape)
            t = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", _PEAK, str(path), str(warm), *map(str, out_size)],
                                  capture_output=True, text=True, check=True)
            seconds = time.perf_counter() - t
            peak_mb = json.loads(done.stdout.strip().splitlines()[-1])["peak_kb"] / 1024
            float32_mb = float(np.prod(shape)) * 4 / 2**20
            rows.append({"source": kind, "shape": list(shape), "float32_mb": round(float32_mb),
                         "peak_mb": round(peak_mb), "copies": round(peak_mb / float32_mb, 2),
                         "seconds_with_startup": round(seconds, 1)})
    return rows


class DataBench(Bench):
    name = "data"

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--samples", type=int, default=64, help="samples read per measurement")
        parser.add_argument("--image-size", type=int, default=224)
        parser.add_argument("--volume-size", type=int, nargs=3, default=[32, 256, 256], help="D H W (M3D's size)")
        parser.add_argument("--batch-size", type=int, default=8)
        parser.add_argument("--memory-only", action="store_true", help="only the 3D peak-memory figures (no shared "
                                                                        "data needed)")

    def run(self, args: argparse.Namespace) -> dict[str, Any]:
        from medm.data.annotations import parse_record
        from medm.data.dataset import ConversationDataset
        from medm.data.volumes import VolumePreprocess
        from medm.models import build_model
        from medm.models.builder import add_media_tokens
        from medm.models.tiny import tiny_tokenizer
        from medm.models.vision._base import ImagePreprocess
        from medm.train.trainer import default_num_workers

        if args.memory_only:
            return {"3d_peak_memory": volume_peak_memory(args.quick, tuple(args.volume_size))}
        shared = data_dir(args.data_dir)
        if shared is None:
            raise Skip("../shared/data not found (set MEDM_DATA_DIR or --data-dir): the loader figures need the real "
                       "VQA-RAD images and CT volumes")
        n = 6 if args.quick else args.samples
        image_size = 64 if args.quick else args.image_size
        vol_size = (8, 32, 32) if args.quick else tuple(args.volume_size)
        tok = tiny_tokenizer("chatml")
        add_media_tokens(tok)
        workers = default_num_workers(args.device)
        out: dict[str, Any] = {"samples": n, "image_size": image_size, "volume_size": list(vol_size),
                               "default_workers": workers}

        # ---- 2D ------------------------------------------------------------------------------------------------
        with tempfile.TemporaryDirectory() as tmp:
            records, image_dir = vqa_rad_records(shared, Path(tmp) / "v")
        seen, unique = set(), []
        for r in records:  # distinct images, so the first pass really decodes each one once
            if r.image[0] not in seen:
                seen.add(r.image[0])
                unique.append(r)
        pre = ImagePreprocess((image_size, image_size), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        ds2 = ConversationDataset(unique[:n], tok, num_image_tokens=16, image_preprocess=pre, image_dir=image_dir)
        # Once: the only pass that may find the files outside the page cache (the rounds below re-read them).
        out["2d_first_pass_per_s"] = round(rate(ds2, len(ds2)), 1)

        # ---- 3D ------------------------------------------------------------------------------------------------
        vol_records = [parse_record({"id": f"v{i}", "image3d": [VOLUMES[i % len(VOLUMES)]], "conversations": [
            {"from": "human", "value": "<image3d>\nDescribe the scan."}, {"from": "gpt", "value": "A CT scan."}]},
            f"v{i}", for_training=True) for i in range(len(VOLUMES))]
        volume_args = {"orientation": "LPS", "intensity": "minmax"}

        def ds3(cache_dir):
            vp = VolumePreprocess({**volume_args, "cache_dir": cache_dir}, vol_size)
            return ConversationDataset(vol_records, tok, num_image_tokens=0, num_image3d_tokens=8,
                                       volume_preprocess=vp, image_dir=str(shared / "nifti"))

        n3 = len(VOLUMES) if args.quick else max(len(VOLUMES), n // 4)
        cold = ds3(None)
        cold[0]  # the first volume imports MONAI's transforms (seconds, once per process): not a per-sample cost
        cache = tempfile.TemporaryDirectory()
        cached = ds3(cache.name)
        rate(cached, len(VOLUMES))  # fills the cache

        # ---- what a step consumes ------------------------------------------------------------------------------
        size = "tiny" if args.quick else "base" if args.device == "cuda" else "small"
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        torch.manual_seed(0)
        cfg = model_config(size)
        cfg["vision"]["config"]["image_size"] = image_size
        m2, _ = build_model(cfg)
        m2.to(args.device, dtype)
        m2.vision.requires_grad_(False)
        shape2 = (cfg["vision"]["config"].get("num_channels", 3), image_size, image_size)
        b2 = batch_for(m2, m2.num_image_tokens + 64, args.batch_size, "pixel_values", shape2, args.device)
        b2["pixel_values"] = b2["pixel_values"].to(dtype)
        cfg3 = {k: v for k, v in model_config(size).items() if k not in ("vision", "connector")}
        patch = [max(1, vol_size[0] // 8), max(1, vol_size[1] // 16), max(1, vol_size[2] // 16)]
        hidden = 768 if size == "base" else 64
        cfg3["vision3d"] = {"name": "vit3d", "image_size": list(vol_size), "patch_size": patch,
                            "hidden_size": hidden, "num_layers": 12 if size == "base" else 2,
                            "num_heads": 12 if size == "base" else 2, "mlp_dim": 4 * hidden}
        cfg3["connector3d"] = {"name": "spatial_pool", "stride": 2}
        m3, _ = build_model(cfg3)
        m3.to(args.device, dtype)
        m3.vision3d.requires_grad_(False)
        b3 = batch_for(m3, 64 + m3.num_image3d_tokens, args.batch_size, "pixel_values_3d", (1, *vol_size),
                       args.device)
        b3["pixel_values_3d"] = b3["pixel_values_3d"].to(dtype)

        # ---- interleaved rounds: loaders and steps side by side, each arm's samples per second ----------------------
        steps = 1 if args.quick else 2
        per_arm = {"2d_load": len(ds2), "3d_cold": n3, "3d_cached": n3, "2d_step": steps * args.batch_size,
                   "3d_step": steps * args.batch_size}
        secs = interleaved({
            "2d_load": lambda: per_arm["2d_load"] / rate(ds2, per_arm["2d_load"]),
            "3d_cold": lambda: n3 / rate(cold, n3),
            "3d_cached": lambda: n3 / rate(cached, n3),
            "2d_step": step_timer(m2, b2, args.device, steps),
            "3d_step": step_timer(m3, b3, args.device, steps),
        }, args.repeats)
        cache.cleanup()
        rates = {k: [per_arm[k] / t for t in v] for k, v in secs.items()}
        for key, label in (("2d_load", "2d_second_pass"), ("3d_cold", "3d_cold"), ("3d_cached", "3d_cached"),
                           ("2d_step", "2d_step"), ("3d_step", "3d_step")):
            out[f"{label}_per_s"] = spread_stats(rates[key], 2)
        for kind, loads in (("2d", ("2d_load",)), ("3d", ("3d_cold", "3d_cached"))):
            step = rates[f"{kind}_step"]
            for key in loads:
                label = "2d_second_pass" if key == "2d_load" else key
                # Round by round: the step and the loader of one round ran next to each other.
                out[f"{label}_workers_needed"] = ratio_stats(step, rates[key], 2)
                # No workers: loading and the step alternate in one process.
                out[f"{label}_loader_share"] = spread_stats(
                    [(1 / ld) / (1 / ld + 1 / st) for ld, st in zip(rates[key], step)])
        # The first pass ran once, before the rounds: against the median step.
        first_needed = out["2d_step_per_s"]["median"] / out["2d_first_pass_per_s"]
        out["2d_first_pass_workers_needed"] = round(first_needed, 2)
        out["3d_peak_memory"] = volume_peak_memory(args.quick, vol_size)
        cover = max(workers, 1)
        out["goal_met_with_default_workers"] = all(out[k]["max"] <= cover for k in out
                                                   if k.endswith("_workers_needed") and "cold" not in k
                                                   and "first" not in k)
        return out


if __name__ == "__main__":
    import sys

    sys.exit(DataBench().main())
