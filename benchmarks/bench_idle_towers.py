"""python benchmarks/bench_idle_towers.py [--quick] [--device cuda] [--size small] [--batch-size 4]

What running every tower on every rank costs (medm.models.modeling_medm.idle_tower_zero), against what a
modality-synchronised sampler would save.

- `step_s`: median seconds of one training step (forward + backward + AdamW; vision encoder frozen, connector and
  LLM trained) on a text-only batch: with the idle tower (a blank image through encoder + connector, times 0) and
  without it (what the code did before, and what a sampler that keeps every rank on one modality per step buys);
  `overhead` is their ratio minus 1. An image batch of the same size gives the scale.
- `idle_steps`: with 8 ranks of per-device batch 4 or 16, on LLaVA-665K's mix (about 6% text-only records) and on a
  2D + 3D + text mix (40% / 20% / 40%, the 3D tower), for random sampling and medm's default modality-grouped
  sampler: the share of rank batches that run the blank (they pay the overhead) and the share of steps that mix
  ranks with and without that modality (the steps that crashed before; a synchronised sampler must avoid them).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from _common import Bench, model_config, timed


def _idle_share(modalities: np.ndarray, batch: int, world: int, grouped: bool, needs: str,
                seed: int = 0) -> dict[str, float]:
    """`blank_batches`: share of rank batches with no sample of modality `needs` (each runs the blank);
    `mixed_steps`: share of steps where some rank has such a sample and another has none (the steps that crashed
    before)."""
    from medm.data.sampler import grouped_order

    n = len(modalities)
    rng = np.random.default_rng(seed)
    if grouped:
        order = np.asarray(grouped_order(np.full(n, 100), batch, modalities=list(modalities), world_size=world,
                                         seed=seed))
    else:
        order = rng.permutation(n)
    step = batch * world
    usable = n // step * step
    steps = modalities[order[:usable]].reshape(-1, world, batch) == needs
    has = steps.any(axis=2)
    return {"blank_batches": round(float((~has).mean()), 4),
            "mixed_steps": round(float((has.any(axis=1) & ~has.all(axis=1)).mean()), 4)}


class IdleTowers(Bench):
    name = "idle_towers"

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--size", default=None, help="tiny, small (CPU default) or base (GPU default)")
        parser.add_argument("--batch-size", type=int, default=4)
        parser.add_argument("--seq-len", type=int, default=256)
        parser.add_argument("--repeat", type=int, default=5)

    def run(self, args: argparse.Namespace) -> dict[str, Any]:
        import medm.models.modeling_medm as modeling
        from medm.models import build_model

        size = "tiny" if args.quick else args.size or ("base" if args.device == "cuda" else "small")
        torch.manual_seed(0)
        model, _ = build_model(model_config(size))
        model.to(args.device).train()
        model.vision.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        vocab = model.config.text_config.vocab_size
        b, t = args.batch_size, args.seq_len
        text = torch.randint(10, vocab - 10, (b, t), device=args.device)
        with_image = text.clone()
        with_image[:, :model.num_image_tokens] = model.config.image_token_id
        pixels = torch.randn(b, 3, *model._blank("vision", "cpu").shape[-2:], device=args.device)

        def step(ids, pix=None):
            def run():
                model(input_ids=ids, labels=ids, pixel_values=pix).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return run

        real = modeling.idle_tower_zero

        def skip(encoder, connector, blank):
            return blank.new_zeros(())

        # Interleaved, so that load from other work on the machine falls on both settings alike.
        times: dict[str, list[float]] = {"with": [], "without": [], "image": []}
        for _ in range(2 if args.quick else args.repeat):
            times["with"].append(timed(step(text), args.device, 1))
            modeling.idle_tower_zero = skip
            try:
                times["without"].append(timed(step(text), args.device, 1))
            finally:
                modeling.idle_tower_zero = real
            times["image"].append(timed(step(with_image, pixels), args.device, 1))
        with_idle, without, image_batch = (float(np.median(times[k])) for k in ("with", "without", "image"))

        rng = np.random.default_rng(0)
        n = 20_000 if args.quick else 665_000
        llava = np.where(rng.random(n) < 0.06, "text", "image")
        mixed = rng.choice(["image", "image3d", "text"], size=n, p=[0.4, 0.2, 0.4])
        shares = {}
        for label, mods, needs in (("llava665k_image", llava, "image"), ("2d_3d_text_volume", mixed, "image3d")):
            for grouped in (False, True):
                for per_device in (4, 16):
                    key = f"{label}_{'grouped' if grouped else 'random'}_batch{per_device}"
                    shares[key] = _idle_share(mods, per_device, 8, grouped, needs)
        return {"size": size, "batch_size": b, "seq_len": t,
                "step_s": {"text_with_idle_tower": round(with_idle, 4), "text_without": round(without, 4),
                           "image_batch": round(image_batch, 4)},
                "overhead": round(with_idle / without - 1, 4), "idle_steps": shares}


if __name__ == "__main__":
    import sys

    sys.exit(IdleTowers().main())
