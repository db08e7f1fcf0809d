"""Answer metrics for medical VQA: VQA answer normalisation, token overlap, BLEU, ROUGE, yes/no P/R/F1, choice
matching and box IoU for grounding answers.

Every function here scores one prediction (or one list of them) and returns fractions in [0, 1]; the protocols in
`medm.eval.protocols` decide which metric a question gets and report percentages.

Normalisation is the VQA-v2 evaluation's (GT-Vision-Lab `vqaEval.py`, `processPunctuation` + `processDigitArticle`),
which LLaVA-Med's `normalize_word` also copies after lower-casing (its punctuation list, number map, articles and
contraction map are the same as the Python 3 `vqaEval.py`). Two deliberate differences from the original code, neither
of which changes a realistic answer: the number map is read without `setdefault` (the original inserts every word it
sees into the map), and the period regex is applied without the accidental `count=re.UNICODE` (= 32) limit.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medm.eval._normalize import (  # noqa: F401 (the normalisation names stay importable from here)
    ARTICLES,
    COMMA_STRIP,
    CONTRACTIONS,
    MANUAL_MAP,
    PERIOD_STRIP,
    PUNCTUATION,
    normalize_answer,
    process_digit_article,
    process_punctuation,
)
from medm.eval.text import char_tokens, resolve_tokenizer, rouge_scores

YES, NO = "yes", "no"


def tokens(text: Any) -> list[str]:
    """Whitespace tokens of the normalised text."""
    return normalize_answer(text).split()


def yes_no_of(text: Any) -> str | None:
    """The first "yes" or "no" token of the normalised text, or None ("No, there is none." -> "no")."""
    for tok in tokens(text):
        if tok in (YES, NO):
            return tok
    return None


def contains_phrase(words: Sequence[str], phrase: Sequence[str]) -> bool:
    """True when `phrase` occurs in `words` as a contiguous run of whole tokens (an empty phrase never does)."""
    n = len(phrase)
    if n == 0:
        return False
    return any(list(words[i:i + n]) == list(phrase) for i in range(len(words) - n + 1))


# ---- open-ended token overlap ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenScores:
    """Token overlap of one prediction with one reference, each in [0, 1]."""

    precision: float
    recall: float
    f1: float


def token_scores(prediction: Any, reference: Any) -> TokenScores:
    """Token precision / recall / F1 on normalised tokens, each reference token matched at most once (clipped
    counts, as SQuAD's F1): "left left left" vs "left lung" has 1 match, recall 1/2, precision 1/3.

    An empty prediction or reference scores 0 everywhere.
    """
    pred, ref = Counter(tokens(prediction)), Counter(tokens(reference))
    overlap = sum((pred & ref).values())
    if overlap == 0:
        return TokenScores(0.0, 0.0, 0.0)
    p, r = overlap / sum(pred.values()), overlap / sum(ref.values())
    return TokenScores(p, r, 2 * p * r / (p + r))


def exact_match(prediction: Any, reference: Any) -> bool:
    """Normalised prediction equals the normalised reference."""
    return normalize_answer(prediction) == normalize_answer(reference)


# ---- BLEU and ROUGE --------------------------------------------------------------------------------------------
def bleu(prediction: Any, reference: Any, n: int = 4, smoothing: str | None = "method1",
         normalize: bool = True, tokenizer: str = "auto") -> float:
    """Cumulative sentence BLEU-n (uniform weights 1/n over 1..n-grams) from `nltk.translate.bleu_score`.

    Args:
        prediction / reference: strings. Tokenised by `tokenizer` (`medm.eval.text`): "words" splits on whitespace
            after VQA normalisation (`normalize=True`) or after lower-casing only; "chars" gives one token per
            Chinese / Japanese / Korean character; "auto" (default) is "chars" when either text has such
            characters, else "words".
        n: highest n-gram order, 1..4.
        smoothing: name of an `nltk` `SmoothingFunction` method. The default "method1" (Chen & Cherry 2014: add 0.1
            to the count of an n-gram order with no match) keeps BLEU-2..4 of short answers from collapsing to 0
            because a one- or two-word answer has no 3-grams; None is nltk's unsmoothed BLEU. BLEU-1 is the same
            either way (nltk returns 0 when no unigram matches, whatever the smoothing).
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu  # defers nltk (BLEU only)

    if not 1 <= n <= 4:
        raise ValueError(f"BLEU order n must be 1..4, got {n}")
    if resolve_tokenizer(tokenizer, prediction, reference) == "chars":
        hyp, ref = char_tokens(prediction), char_tokens(reference)
    else:
        prep = normalize_answer if normalize else (lambda t: str(t).lower())
        hyp, ref = prep(prediction).split(), prep(reference).split()
    if not hyp or not ref:
        return 0.0
    fn = getattr(SmoothingFunction(), smoothing) if smoothing else None
    return float(sentence_bleu([ref], hyp, weights=tuple([1.0 / n] * n), smoothing_function=fn))


def bleu_scores(prediction: Any, reference: Any, smoothing: str | None = "method1",
                normalize: bool = True, tokenizer: str = "auto") -> dict[str, float]:
    """`{"bleu1": ..., "bleu4": ...}`: cumulative BLEU-1..4 (see `bleu`)."""
    return {f"bleu{n}": bleu(prediction, reference, n, smoothing, normalize, tokenizer) for n in range(1, 5)}


def rouge(prediction: Any, reference: Any, normalize: bool = True, use_stemmer: bool = False,
          tokenizer: str = "auto") -> dict[str, float]:
    """ROUGE-1 / ROUGE-2 / ROUGE-L F-measures: `{"rouge1", "rouge2", "rougeL"}`.

    English ("words"): the `rouge-score` package, which lower-cases and splits on non-alphanumerics itself;
    `normalize=True` applies VQA normalisation first (so articles and number words do not count). Chinese /
    Japanese / Korean text ("chars", chosen by "auto" when either text has such characters) is scored by character
    (`medm.eval.text`), since `rouge-score` drops every non-ASCII character.
    """
    return rouge_scores(prediction, reference, tokenizer, normalize, use_stemmer)


# ---- closed-ended ----------------------------------------------------------------------------------------------
def yes_no_prf(predicted_yes: Sequence[bool], gold_yes: Sequence[bool]) -> dict[str, float | None]:
    """Precision / recall / F1 of yes/no answers with "yes" as the positive class, and accuracy.

    A prediction that states neither yes nor no counts as not-yes. Undefined ratios are None, not 0: precision
    when "yes" was never predicted, recall when "yes" was never the answer, F1 when neither.
    """
    if len(predicted_yes) != len(gold_yes):
        raise ValueError(f"{len(predicted_yes)} predictions but {len(gold_yes)} gold labels")
    tp = sum(p and g for p, g in zip(predicted_yes, gold_yes))
    fp = sum(p and not g for p, g in zip(predicted_yes, gold_yes))
    fn = sum(g and not p for p, g in zip(predicted_yes, gold_yes))
    correct = sum(p == g for p, g in zip(predicted_yes, gold_yes))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    # F1 = 2TP / (2TP + FP + FN): defined (and 0) when yes was never predicted but was the answer.
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"precision": precision, "recall": recall, "f1": f1,
            "accuracy": correct / len(gold_yes) if gold_yes else None}


# Clause ends: . ! ? ; : before a space or the end (so "2.5" stays whole), a comma before a space, a newline, or
# a contrasting "but" / "however".
_CLAUSE_END = re.compile(r"[.!?;:](?=\s|$)|,\s|\n|\bbut\b|\bhowever\b", re.IGNORECASE)
_OR = re.compile(r"\bor\b")
# Words skipped when reading an option after "or": "multiple or just 1 focus" offers "multiple" and "1".
_OPTION_FILLERS = frozenset(ARTICLES + ("just", "only"))


def first_clause(text: Any) -> str:
    """The prediction up to its first clause end (". ", ", ", ";", "!", "?", ":", a newline, "but", "however")."""
    for part in _CLAUSE_END.split(str(text)):
        if part.strip():
            return part.strip()
    return ""


def question_options(question: str) -> list[str]:
    """The normalised options a choice question offers, read around its "or"s and commas.

    "Is this an MRI or a CT scan?" -> ["mri", "ct"]; "left, right, or both sides?" -> ["left", "right", "both"].
    The word before the first option list and after the last "or" are single words (the text around them is the
    question's own); middle items are kept whole. Returns [] for a question without "or".
    """
    parts = _OR.split(str(question).lower().rstrip(" ?."))
    if len(parts) < 2:
        return []
    head, *middle = parts[0].split(",")  # "... on the left, right," -> "... on the left" + ["right", ""]
    for p in parts[1:-1]:
        middle += p.split(",")
    tail = parts[-1].split(",")[0]  # "both sides of the lung"
    tail_words = [w for w in normalize_answer(tail).split() if w not in _OPTION_FILLERS]
    options = normalize_answer(head).split()[-1:] + [normalize_answer(s) for s in middle] + tail_words[:1]
    return list(dict.fromkeys(o for o in options if o))


def choice_correct(prediction: Any, answer: Any, question: str | None = None) -> bool:
    """Strict scoring of a closed question whose answer is not yes/no ("Is this an MRI or a CT?" -> "CT").

    The answer must appear as whole words in the prediction's first clause. When `question` is given, its options
    are read (`question_options`) and a first clause that also names another option is wrong (both named); when
    the answer holds exactly one option ("right side" for "left or right side"), naming that option suffices. A
    first clause naming no option is wrong (neither named).
    """
    clause = tokens(first_clause(prediction))
    ans = normalize_answer(answer)
    options = question_options(question) if question else []
    in_answer = [o for o in options if contains_phrase(ans.split(), o.split())]
    key = in_answer[0] if len(in_answer) == 1 else ans
    if not contains_phrase(clause, key.split()):
        return False
    others = [o for o in options if o != key and not contains_phrase(ans.split(), o.split())]
    return not any(contains_phrase(clause, o.split()) for o in others)


# ---- grounding: boxes ------------------------------------------------------------------------------------------
Box = tuple[float, float, float, float]  # (x1, y1, x2, y2) in pixels

_NUM = r"[-+]?\d+(?:\.\d+)?"
# Qwen-VL / MedM-VL style: <box>(x1,y1),(x2,y2)</box>, coordinates on a 0-1000 grid over the image; Qwen-VL-Chat
# writes the same inside <|box_start|> ... <|box_end|>.
_BOX_1000 = re.compile(
    rf"(?:<box>|<\|box_start\|>)\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*"
    r"(?:</box>|<\|box_end\|>)")
# Qwen2.5-VL style: {"bbox_2d": [x1, y1, x2, y2], "label": ...} in pixels, possibly in a ```json fence or a list;
# matched directly so a truncated or slightly malformed JSON answer still yields its boxes.
_BBOX_2D = re.compile(rf"[\"']bbox_2d[\"']\s*:\s*\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")


def parse_boxes(text: str, image_size: tuple[int, int] | None = None) -> list[Box]:
    """Every box in a model answer, in the order written, in pixels.

    Args:
        text: the answer. `<box>(x1,y1),(x2,y2)</box>` coordinates are on a 0-1000 grid and are scaled by the
            image size; `"bbox_2d": [x1, y1, x2, y2]` (Qwen2.5-VL JSON) are pixels of the image the model saw and
            are returned as written.
        image_size: (width, height) in pixels; needed only for the 0-1000 format.

    Raises:
        ValueError: a 0-1000 box without `image_size`.
    """
    found: list[tuple[int, Box]] = []
    for m in _BOX_1000.finditer(text):
        if image_size is None:
            raise ValueError(f"box {m.group(0)!r} is on the 0-1000 grid: pass image_size=(width, height)")
        w, h = image_size
        x1, y1, x2, y2 = (float(v) for v in m.groups())
        found.append((m.start(), (x1 * w / 1000, y1 * h / 1000, x2 * w / 1000, y2 * h / 1000)))
    for m in _BBOX_2D.finditer(text):
        found.append((m.start(), tuple(float(v) for v in m.groups())))
    return [box for _, box in sorted(found, key=lambda t: t[0])]


def parse_box(text: str, image_size: tuple[int, int] | None = None) -> Box | None:
    """The first box of `parse_boxes`, or None when the answer holds none."""
    boxes = parse_boxes(text, image_size)
    return boxes[0] if boxes else None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes on continuous coordinates (area = width * height, no
    +1 pixel convention). Corners may come in either order. Two empty boxes give 0."""
    ax1, ax2 = sorted((float(a[0]), float(a[2])))
    ay1, ay2 = sorted((float(a[1]), float(a[3])))
    bx1, bx2 = sorted((float(b[0]), float(b[2])))
    by1, by2 = sorted((float(b[1]), float(b[3])))
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def as_box(value: Any, image_size: tuple[int, int] | None = None) -> Box | None:
    """A reference box given as 4 pixel numbers, or as text in either answer format (first box)."""
    if isinstance(value, str):
        return parse_box(value, image_size)
    if isinstance(value, Sequence) and len(value) == 4:
        return tuple(float(v) for v in value)
    raise ValueError(f"a box must be 4 numbers (x1, y1, x2, y2) or text with a box, got {value!r}")


def grounding_scores(predictions: Sequence[str], references: Sequence[Any],
                     image_sizes: Sequence[tuple[int, int] | None] | None = None,
                     threshold: float = 0.5) -> dict[str, float | int | None]:
    """Mean IoU and accuracy at an IoU threshold of the first predicted box against the reference box.

    A prediction without a box scores IoU 0 and counts in `n_unparsed`.

    Returns:
        `{"mean_iou", "acc_at_iou", "threshold", "n", "n_unparsed"}`, fractions in [0, 1] (None when n is 0).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    sizes = list(image_sizes) if image_sizes is not None else [None] * len(predictions)
    ious, unparsed = [], 0
    for i, (pred, ref, size) in enumerate(zip(predictions, references, sizes)):
        gold = as_box(ref, size)
        if gold is None:
            raise ValueError(f"reference {i} holds no box: {ref!r}")
        box = parse_box(pred, size)
        unparsed += box is None
        ious.append(box_iou(box, gold) if box is not None else 0.0)
    n = len(ious)
    return {"mean_iou": sum(ious) / n if n else None,
            "acc_at_iou": sum(v >= threshold for v in ious) / n if n else None,
            "threshold": threshold, "n": n, "n_unparsed": unparsed}
