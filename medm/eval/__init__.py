"""Evaluation: answer metrics (`medm.eval.metrics`) and scoring protocols (`medm.eval.protocols`)."""

from medm.eval.metrics import (
    bleu,
    bleu_scores,
    box_iou,
    choice_correct,
    exact_match,
    grounding_scores,
    normalize_answer,
    parse_box,
    parse_boxes,
    rouge,
    token_scores,
    yes_no_prf,
)
from medm.eval.protocols import PROTOCOLS, breakdown, get_protocol, score, score_grounding

__all__ = [
    "PROTOCOLS", "bleu", "bleu_scores", "box_iou", "breakdown", "choice_correct", "exact_match", "get_protocol",
    "grounding_scores", "normalize_answer", "parse_box", "parse_boxes", "rouge", "score", "score_grounding",
    "token_scores", "yes_no_prf",
]
