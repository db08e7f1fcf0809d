"""What the playground says about its model, and the example cases it offers.

The model panel reads the checkpoint directory only: `config.json` (the parts), `medm_checkpoint.json` (format and
base weights) and the model card's `medm:` metadata (stage plan, data, training figures, evaluation), so it works
for either model kind and any checkpoint format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig

from medm.data.annotations import load_records, resolve_path
from medm.infer.predictions import question_text
from medm.interop.model_card import components, read_card_metadata
from medm.models.checkpoint import checkpoint_kind, read_meta
from medm.models.modeling_medm import register_auto_classes

__all__ = ["Example", "load_examples", "model_markdown", "model_rows", "takes_volumes"]


def _config(ckpt_dir: str):
    register_auto_classes()
    return AutoConfig.from_pretrained(ckpt_dir, trust_remote_code=False)  # shown, never run


def takes_volumes(ckpt_dir: str) -> bool:
    """Whether the model has a 3D encoder (config `vision3d`), so volumes go to it whole."""
    return getattr(_config(ckpt_dir), "vision3d", None) is not None


def _stage_text(stage: dict[str, Any]) -> str:
    parts = [f"{c} {stage[c]}" for c in ("vision", "connector", "llm", "vision3d", "connector3d") if stage.get(c)]
    text = ", ".join(parts) or "not recorded"
    if stage.get("init_from"):
        text += f"; started from `{stage['init_from']}`"
    return text


def _figures_text(fig: dict[str, Any]) -> str:
    parts = []
    if "steps" in fig:
        parts.append(f"{fig['steps']} steps")
    if isinstance(fig.get("final_loss"), float):
        parts.append(f"final loss {fig['final_loss']:.4f}")
    if "runtime_s" in fig:
        parts.append(f"{fig['runtime_s']:.0f} s")
    return ", ".join(parts)


def model_rows(ckpt_dir: str) -> list[tuple[str, str]]:
    """(label, value) rows describing a checkpoint: kind, format, parts, stage, data, training, evaluation, source."""
    config = _config(ckpt_dir)
    meta = read_meta(ckpt_dir)
    card = read_card_metadata(ckpt_dir)
    rows = [("Checkpoint", f"`{ckpt_dir}`"), ("Kind", checkpoint_kind(ckpt_dir))]
    fmt = meta["format"]
    if meta.get("base"):
        fmt += f" over base weights `{os.path.normpath(os.path.join(ckpt_dir, meta['base']))}`"
    rows.append(("Format", fmt))
    comp = components(config)
    if "llm" in comp:  # a medm model: encoder -> connector -> LLM
        for slot, label in (("vision", "2D encoder"), ("connector", "2D connector"), ("vision3d", "3D encoder"),
                            ("connector3d", "3D connector")):
            if comp.get(slot):
                rows.append((label, comp[slot]))
        llm = comp["llm"]
        rows.append(("LLM", f"{llm['family']} family, {llm['model_type']} (hidden {llm['hidden_size']}, "
                            f"{llm['num_hidden_layers']} layers), weights from "
                            f"{llm['weights_from'] or 'random initialisation'}, {llm['dtype']}"))
        rows.append(("Chat template", str(comp["template"])))
    else:  # a transformers model with its own tower and merger (the qwen-vl kind)
        arch = ", ".join(comp.get("architectures") or []) or comp["model_type"]
        vision = getattr(config, "vision_config", None)
        if vision is not None:
            depth = getattr(vision, "depth", None) or getattr(vision, "num_hidden_layers", None)
            rows.append(("2D encoder", f"the model's own vision tower ({getattr(vision, 'model_type', '?')}, "
                                       f"hidden {getattr(vision, 'hidden_size', '?')}, {depth} blocks)"))
            rows.append(("2D connector", "the model's own merger"))
        settings = dict(getattr(config, "medm", None) or {})
        rows.append(("LLM", f"{comp['model_type']} ({arch}: hidden {comp['hidden_size']}, "
                            f"{comp['num_hidden_layers']} layers), weights from "
                            f"{settings.get('path') or 'random initialisation'}"))
    if card.get("stage"):
        rows.append(("Training stage", _stage_text(card["stage"])))
    data = (card.get("data") or {}).get("path")
    if data:
        rows.append(("Training data", ", ".join(f"`{p}`" for p in (data if isinstance(data, list) else [data]))))
    figures = _figures_text(card.get("training") or {})
    if figures:
        rows.append(("Training", figures))
    for label, metrics in (card.get("evaluation") or {}).items():
        shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in list(metrics.items())[:4])
        rows.append((f"Evaluation: {label}", shown))
    if card.get("source"):
        rows.append(("Made from", f"`{card['source']}`"))
    return rows


def model_markdown(ckpt_dir: str) -> str:
    """The model panel: `model_rows` as a Markdown list."""
    return "\n".join(f"- **{label}**: {' '.join(str(value).split())}" for label, value in model_rows(ckpt_dir))


@dataclass
class Example:
    """One example case: an image file and a question about it."""

    image: str
    question: str


def load_examples(path: str, image_dir: str | None = None, limit: int = 6) -> list[Example]:
    """Example cases from a records file (LLaVA / medm records with a 2D image), as varied as it allows: each
    `question_type` once (records without one count as one type), on different images where possible, then further
    images, up to `limit`.

    Args:
        image_dir: base of relative image paths; default: the records file's directory.
    """
    base = image_dir if image_dir is not None else os.path.dirname(os.path.abspath(path))
    records = [r for r in load_records(path) if r.image]
    chosen, kinds, images = [], set(), set()
    # Passes: a new kind on a new image; a new kind; a new image.
    for new_kind, new_image in ((True, True), (True, False), (False, True)):
        for r in records:
            kind, image = r.extra.get("question_type"), r.image[0]
            if len(chosen) < limit and (not new_kind or kind not in kinds) and (not new_image or image not in images):
                chosen.append(r)
                kinds.add(kind)
                images.add(image)
    return [Example(resolve_path(r.image[0], base), question_text(r)) for r in chosen]
