"""Grayscale (1-channel) CLIP / SigLIP towers in transformers' LLaVA format, whose image processors feed every image
as RGB (`medm export --to llava-hf` and `medm import llava-hf`).

An RGB image made from a grayscale one has R = G = B = L. A patch embedding whose three input-channel weights are
the 1-channel weights divided by 3, normalised with the same mean / std on each channel, computes
sum_c (w / 3) * (L - m) / s = w * (L - m) / s: the same features, up to float rounding. Export writes that; import
recognises it (three equal channel weights and one mean / std on all channels) and gives back the 1-channel tower
(the channels summed). Images must be grayscale for the two to agree: medm reads any image as L (luma), LLaVA's
processor keeps the colours of an RGB one.
"""

from __future__ import annotations

import torch
from torch import nn


def patch_embedding_key(vision_model: nn.Module, prefix: str) -> str:
    """State-dict name of the patch-embedding weight of a transformers vision model (its input embeddings)."""
    target = vision_model.get_input_embeddings()
    name = next(n for n, m in vision_model.named_modules() if m is target)
    return f"{prefix}{name}.weight"


def rgb_patch_weight(weight: torch.Tensor) -> torch.Tensor:
    """(D, 1, p, p) -> (D, 3, p, p): each channel the 1-channel weights divided by 3."""
    if weight.shape[1] != 1:
        raise ValueError(f"a grayscale patch embedding has 1 input channel, got shape {tuple(weight.shape)}")
    return (weight / 3).repeat(1, 3, *([1] * (weight.ndim - 2))).contiguous()


def is_grayscale_export(weight: torch.Tensor, mean, std) -> bool:
    """Three equal input-channel weights and one mean / std for all channels: a grayscale tower exported as RGB."""
    if weight.ndim < 2 or weight.shape[1] != 3 or mean is None or std is None:
        return False
    mean, std = list(mean), list(std)
    return (len(mean) == len(std) == 3 and len(set(mean)) == 1 and len(set(std)) == 1
            and torch.equal(weight[:, 0], weight[:, 1]) and torch.equal(weight[:, 0], weight[:, 2]))


def gray_patch_weight(weight: torch.Tensor) -> torch.Tensor:
    """(D, 3, p, p) of `rgb_patch_weight` -> (D, 1, p, p): the channels summed."""
    return weight.sum(dim=1, keepdim=True).contiguous()
