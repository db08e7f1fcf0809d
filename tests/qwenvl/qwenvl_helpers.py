"""Helpers for qwen-vl tests: the shipped tiny YAMLs as configs, seeded builds."""

from pathlib import Path

import torch

from medm.config import load_yaml
from medm.models import build_model

REPO = Path(__file__).resolve().parents[2]
TINY_YAML = {"qwen2_vl": REPO / "configs/model/tiny-qwen2-vl.yaml",
             "qwen2_5_vl": REPO / "configs/model/tiny-qwen2.5-vl.yaml"}


def tiny_cfg(model_type: str = "qwen2_5_vl", **qwenvl) -> dict:
    """The shipped tiny YAML of `model_type` as a dict, with `qwenvl` keys overridden."""
    cfg = load_yaml(str(TINY_YAML[model_type]))
    cfg["qwenvl"].update(qwenvl)
    return cfg


def build_tiny(model_type: str = "qwen2_5_vl", seed: int = 0, **qwenvl):
    """(model, processor) of the tiny preset, weights seeded."""
    torch.manual_seed(seed)
    return build_model(tiny_cfg(model_type, **qwenvl))
