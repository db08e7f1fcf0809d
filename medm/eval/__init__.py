"""Evaluation: answer metrics (`medm.eval.metrics`, language-aware text overlap in `medm.eval.text`), scoring
protocols (`medm.eval.protocols`, multiple-choice rules in `medm.eval.choice`), bootstrap intervals and paired
comparisons (`medm.eval.bootstrap`, not imported here: it needs numpy); tasks in `medm.eval.tasks`, suites in
`medm.eval.bench`."""

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
from medm.eval.text import char_tokens, meteor, rouge_scores

__all__ = [
    "PROTOCOLS", "bleu", "bleu_scores", "box_iou", "breakdown", "char_tokens", "choice_correct",
    "exact_match", "get_protocol", "grounding_scores", "meteor", "normalize_answer", "parse_box",
    "parse_boxes", "rouge", "rouge_scores", "score", "score_grounding", "token_scores", "yes_no_prf",
]
