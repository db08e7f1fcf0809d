"""`medm export --merge SRC OUT`: a components or LoRA checkpoint becomes one standalone full medm checkpoint."""

from __future__ import annotations

from medm.interop.model_card import write_model_card
from medm.models.checkpoint import FULL, load_trained, save_model


def export_merged(src: str, out: str, base: str | None = None) -> str:
    """Write `src` (any checkpoint format) as a full checkpoint in `out` that `load_model` opens; returns `out`."""
    model, tokenizer = load_trained(src, base=base, merge=True)
    save_model(model, tokenizer, out)
    write_model_card(out, config=model.config, fmt=FULL, source=src)
    return out
