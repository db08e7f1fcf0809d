"""Helpers for inference tests: a small question file with noise or black images."""

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_questions(out: Path, n: int, *, image: str = "noise", seed: int = 0) -> Path:
    """`n` LLaVA evaluation records (question + reference answer + extra fields) with 32 px images: "noise" (one
    random image per record) or "black", written under `out/images` and named by absolute path. Returns the records
    file."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = f"images/{image}{i:03d}.png"
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) if image == "noise" else \
            np.zeros((32, 32, 3), np.uint8)
        Image.fromarray(pixels).save(out / name)
        records.append({"id": f"q{i:03d}", "image": [str(out / name)],
                        "conversations": [{"from": "human", "value": f"<image>\nIs there a lesion in region {i}?"},
                                          {"from": "gpt", "value": "yes" if i % 2 else "no"}],
                        "answer_type": "CLOSED", "image_organ": "CHEST" if i % 3 else "HEAD"})
    path = out / f"questions_{image}.json"
    path.write_text(json.dumps(records))
    return path
