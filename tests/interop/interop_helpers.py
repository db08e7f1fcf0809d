"""Helpers for interop tests: tiny exportable models (with a sharpened LLM, so greedy decoding varies) and images."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medm.models import build_model
from medm.models.tiny import tiny_model_config

QUESTION = "Is there a lesion in the upper left?"

# name -> (vision, LLM family, connector type, extra vision keys, system prompt, expected LLaVA strategy / layer)
VARIANTS = {
    "clip-mlp2x-qwen2": ("clip", "qwen2", "mlp2x_gelu", {}, "You are a careful radiology assistant.",
                         "default", -2),
    "siglip-pad-llama": ("siglip", "llama", "mlp2x_gelu", {"resize": "pad", "resample": "bilinear",
                                                          "select_layer": -1}, None, "full", -1),
    "clip-cls-linear-phi3": ("clip", "phi3", "linear", {"select_feature": "cls_patch", "select_layer": -1}, None,
                             "full", -1),
    # LLaVA's `default` drops the first token whatever the tower: on SigLIP (no CLS) a patch, as medm's skip_first.
    "siglip-skipfirst-qwen2": ("siglip", "qwen2", "mlp2x_gelu", {"select_feature": "skip_first"}, None, "default", -2),
}


def tiny_model(vision="clip", family="qwen2", connector_type="mlp2x_gelu", vision_keys=None, system_prompt=None):
    """(model, tokenizer) with random weights; the LLM's matrices are widened (std 0.3) so that greedy decoding
    does not repeat one token forever, which would make generation comparisons trivially equal."""
    cfg = tiny_model_config(vision=vision, connector={"name": "mlp", "type": connector_type}, family=family)
    cfg["vision"].update(vision_keys or {})
    cfg["system_prompt"] = system_prompt
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model.eval(), tok


def variant_model(name):
    vision, family, conn, keys, system, _, _ = VARIANTS[name]
    return tiny_model(vision, family, conn, keys, system)


def noisy_image(h=45, w=61, seed=0) -> Image.Image:
    """A non-square RGB image, so resizing (and padding) really happen."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def write_bright_dark(out: Path, n: int = 8, size: int = 32) -> Path:
    """`n` grey images, alternately bright (answer yes) and dark (no), as LLaVA records in train.json."""
    rng = np.random.default_rng(0)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        bright = i % 2 == 0
        img = np.clip((200 if bright else 50) + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(out / "images" / f"{i}.png")
        records.append({"id": f"toy{i}", "image": [f"images/{i}.png"],
                        "conversations": [{"from": "human", "value": "<image>\nIs the image bright?"},
                                          {"from": "gpt", "value": "yes" if bright else "no"}]})
    path = out / "train.json"
    path.write_text(json.dumps(records))
    return path
