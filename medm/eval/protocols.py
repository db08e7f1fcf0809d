"""Scoring protocols for closed / open medical VQA: `score(predictions, protocol)` and `breakdown(...)`.

Two protocols, chosen by name:

- `strict` (default, what medm reports): a closed yes/no question is right when the first "yes" / "no" the
  prediction states equals the answer; a closed question with another answer ("Is this an MRI or a CT?" -> "CT") is
  right when the answer appears as whole words in the prediction's first clause and no other option the question
  offers does (`metrics.choice_correct`; the options are read from `question` when the prediction dict has it). Open
  questions get token recall with each reference token matched once (`metrics.token_scores`), open accuracy = the
  normalised answer appears as whole words in the prediction, and exact match = normalised strings equal.
- `llava-med`: LLaVA-Med v1.0's batch scorer (`llava/eval/run_eval_batch.py` + `eval_metrics/evaluate_metrics.py`),
  so numbers line up with papers that used it. Both strings are lower-cased and VQA-normalised. Closed: right when
  the answer string is a substring of the prediction ("no" is inside "i do not know"). Open recall: word counts of
  both; tp = sum over words in both of the word's count in the prediction, fn = sum over answer words missing from
  the prediction of their count in the answer, recall = tp / (tp + fn), 0 for an empty prediction or tp = 0 ("left
  left left" vs "left lung" -> 0.75). Open accuracy = the answer is a substring of the prediction. Exact match =
  distinct answer words found in the prediction / number of prediction words.

Every result is a flat dict of percentages (x100, per-question averages) and counts, with `protocol` naming the
protocol. Metrics without questions to average over (no open questions in a group, ...) are None.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from medm.eval.metrics import (
    NO,
    YES,
    choice_correct,
    contains_phrase,
    grounding_scores,
    normalize_answer,
    token_scores,
    yes_no_of,
    yes_no_prf,
)

CLOSED, OPEN = "CLOSED", "OPEN"


@dataclass(frozen=True)
class OpenScore:
    """One open question's scores, each in [0, 1]."""

    recall: float
    precision: float
    f1: float
    hit: float  # counts towards open_accuracy
    exact: float  # counts towards exact_match


class Protocol:
    """How one question is scored. Subclasses set `name` and implement the three methods."""

    name: str = ""

    def closed_correct(self, prediction: str, answer: str, question: str | None) -> bool:
        raise NotImplementedError

    def says_yes(self, prediction: str) -> bool:
        """Whether the prediction counts as a "yes" (the positive class of closed precision / recall / F1)."""
        raise NotImplementedError

    def open_score(self, prediction: str, answer: str) -> OpenScore:
        raise NotImplementedError


class StrictProtocol(Protocol):
    """medm's protocol: the stated yes/no, whole-word choice matching, clipped token recall, exact match."""

    name = "strict"

    def closed_correct(self, prediction: str, answer: str, question: str | None) -> bool:
        gold = normalize_answer(answer)
        if gold in (YES, NO):
            return yes_no_of(prediction) == gold
        return choice_correct(prediction, answer, question)

    def says_yes(self, prediction: str) -> bool:
        return yes_no_of(prediction) == YES

    def open_score(self, prediction: str, answer: str) -> OpenScore:
        t = token_scores(prediction, answer)
        pred, gold = normalize_answer(prediction), normalize_answer(answer)
        return OpenScore(t.recall, t.precision, t.f1, float(contains_phrase(pred.split(), gold.split())),
                         float(pred == gold))


class LlavaMedProtocol(Protocol):
    """LLaVA-Med v1.0's batch scorer, reproduced quirks included (substring matching, count-weighted recall)."""

    name = "llava-med"

    def closed_correct(self, prediction: str, answer: str, question: str | None) -> bool:
        return normalize_answer(answer) in normalize_answer(prediction)

    def says_yes(self, prediction: str) -> bool:
        return YES in normalize_answer(prediction)

    def open_score(self, prediction: str, answer: str) -> OpenScore:
        pred_s, gold_s = normalize_answer(prediction), normalize_answer(answer)
        pred, gold = Counter(pred_s.split()), Counter(gold_s.split())
        # calculate_f1score: tp counts the shared words as often as the prediction has them.
        tp = sum(c for w, c in pred.items() if w in gold)
        fp = sum(c for w, c in pred.items() if w not in gold)
        fn = sum(c for w, c in gold.items() if w not in pred)
        if not pred or not gold or tp == 0:
            recall = precision = f1 = 0.0
        else:
            precision, recall = tp / (tp + fp), tp / (tp + fn)
            f1 = 2 * precision * recall / (precision + recall)
        # calculate_exactmatch: distinct answer words present, over all prediction words.
        exact = sum(1 for w in gold if w in pred) / sum(pred.values()) if pred else 0.0
        return OpenScore(recall, precision, f1, float(gold_s in pred_s), exact)


PROTOCOLS: dict[str, type[Protocol]] = {p.name: p for p in (StrictProtocol, LlavaMedProtocol)}


def get_protocol(name: str) -> Protocol:
    """The protocol registered under `name` ("strict" or "llava-med")."""
    if name not in PROTOCOLS:
        raise KeyError(f"unknown evaluation protocol {name!r}; known: {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]()


@dataclass(frozen=True)
class _Item:
    prediction: str
    answer: str
    answer_type: str
    question: str | None


def _as_text(value: Any) -> str:
    # VQA-RAD has integer answers (4, 12); a float answer 2.0 should read "2", not "2.0".
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _item(p: dict[str, Any], index: int) -> _Item:
    name = f"prediction {index}" + (f" (id {p['id']!r})" if isinstance(p, dict) and "id" in p else "")
    if not isinstance(p, dict):
        raise TypeError(f"{name}: expected a dict, got {type(p).__name__}")
    for key in ("prediction", "answer"):
        if p.get(key) is None:
            raise ValueError(f"{name}: missing {key!r}")
    prediction, answer = _as_text(p["prediction"]), _as_text(p["answer"])
    raw_type = p.get("answer_type")
    if raw_type is None:
        # Unlabelled questions are closed exactly when the answer is yes / no.
        answer_type = CLOSED if normalize_answer(answer) in (YES, NO) else OPEN
    else:
        answer_type = str(raw_type).strip().upper()
        if answer_type not in (CLOSED, OPEN):
            raise ValueError(f"{name}: answer_type must be CLOSED or OPEN, got {raw_type!r}")
    question = p.get("question")
    return _Item(prediction, answer, answer_type, None if question is None else str(question))


def _pct(values: list[float]) -> float | None:
    return 100.0 * sum(values) / len(values) if values else None


def _pct_or_none(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


@dataclass(frozen=True)
class ItemScore:
    """One question's scores under a protocol; `aggregate` turns a list of them into the reported figures."""

    closed_hit: float | None  # closed questions: 1.0 right, 0.0 wrong; None for open ones
    yes_no: tuple[bool, bool] | None  # closed yes/no questions: (prediction says yes, answer is yes)
    open: OpenScore | None  # open questions


def item_scores(predictions: Iterable[dict[str, Any]], protocol: str = "strict") -> list[ItemScore]:
    """Each prediction's `ItemScore` (fields as `score` reads them); `aggregate` of the list is `score`."""
    proto = get_protocol(protocol)
    out = []
    for it in (_item(p, i) for i, p in enumerate(predictions)):
        if it.answer_type == CLOSED:
            hit = float(proto.closed_correct(it.prediction, it.answer, it.question))
            gold = normalize_answer(it.answer)
            yes_no = (proto.says_yes(it.prediction), gold == YES) if gold in (YES, NO) else None
            out.append(ItemScore(hit, yes_no, None))
        else:
            out.append(ItemScore(None, None, proto.open_score(it.prediction, it.answer)))
    return out


def aggregate(items: list[ItemScore], protocol: str) -> dict[str, Any]:
    """The figures of `score` from per-question scores (the bootstrap re-aggregates resampled lists)."""
    closed_hits = [it.closed_hit for it in items if it.closed_hit is not None]
    yes_no = [it.yes_no for it in items if it.yes_no is not None]
    choice_hits = [it.closed_hit for it in items if it.closed_hit is not None and it.yes_no is None]
    opens = [it.open for it in items if it.open is not None]
    prf = yes_no_prf([p for p, _ in yes_no], [g for _, g in yes_no])
    return {
        "protocol": protocol,
        "n": len(items), "n_closed": len(closed_hits), "n_open": len(opens),
        "n_yes_no": len(yes_no), "n_choice": len(choice_hits),
        "overall": _pct(closed_hits + [o.recall for o in opens]),
        "closed_accuracy": _pct(closed_hits),
        "closed_precision": _pct_or_none(prf["precision"]),
        "closed_recall": _pct_or_none(prf["recall"]),
        "closed_f1": _pct_or_none(prf["f1"]),
        "closed_choice_accuracy": _pct(choice_hits),
        "open_recall": _pct([o.recall for o in opens]),
        "open_precision": _pct([o.precision for o in opens]),
        "open_f1": _pct([o.f1 for o in opens]),
        "open_accuracy": _pct([o.hit for o in opens]),
        "exact_match": _pct([o.exact for o in opens]),
    }


def score(predictions: Iterable[dict[str, Any]], protocol: str = "strict") -> dict[str, Any]:
    """Score closed and open VQA predictions under one protocol.

    Args:
        predictions: dicts with `prediction` (model text) and `answer`; `answer_type` "CLOSED" / "OPEN" (case and
            surrounding spaces ignored; when missing, CLOSED iff the answer is yes / no); optional `question`
            (lets `strict` catch choice answers that name both options), `id` (named in errors) and any other keys
            (`question_type`, `image_organ`, ... for `breakdown`).
        protocol: "strict" or "llava-med".

    Returns:
        Flat dict. Percentages (0-100): `closed_accuracy`; `closed_precision` / `closed_recall` / `closed_f1`
        ("yes" positive, over closed questions answered yes / no); `closed_choice_accuracy` (closed questions with
        another answer); `open_recall`, `open_precision`, `open_f1`, `open_accuracy`, `exact_match` (over open
        questions); `overall` = mean over all questions of the per-question score (closed: 0 / 100, open: recall).
        Counts: `n`, `n_closed`, `n_open`, `n_yes_no`, `n_choice`. And `protocol`. A percentage with nothing to
        average is None.
    """
    return aggregate(item_scores(predictions, protocol), get_protocol(protocol).name)


def breakdown(predictions: Iterable[dict[str, Any]], by: str = "question_type", protocol: str = "strict",
              sep: str | None = None) -> dict[str, dict[str, Any]]:
    """`score` per group of predictions sharing the value of key `by` (e.g. "question_type", "image_organ").

    Args:
        by: the grouping key; a prediction without it goes to group "(none)".
        sep: when given, a value holding several labels ("PRES, POS" with sep=",") counts in each label's group
            (labels stripped); otherwise the value is one group as written.

    Returns:
        `{group: score dict}` in sorted group order; each score dict also has `group_by` and `group`.
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in predictions:
        value = p.get(by) if isinstance(p, dict) else None
        labels = ["(none)"] if value is None else [str(value)]
        if sep is not None and value is not None:
            labels = [s.strip() for s in str(value).split(sep) if s.strip()] or ["(none)"]
        for label in dict.fromkeys(labels):
            groups[label].append(p)
    return {g: {**score(groups[g], protocol), "group_by": by, "group": g} for g in sorted(groups)}


def score_grounding(predictions: Iterable[dict[str, Any]], threshold: float = 0.5) -> dict[str, Any]:
    """Box grounding: mean IoU and accuracy at IoU >= `threshold` (Acc@0.5 by default), as percentages.

    Args:
        predictions: dicts with `prediction` (text holding `<box>(x1,y1),(x2,y2)</box>` on the 0-1000 grid or
            Qwen2.5-VL `{"bbox_2d": [x1, y1, x2, y2]}` pixels), `answer` (4 pixel numbers, or text in either
            format) and `image_size` [width, height] (needed for the 0-1000 format).

    Returns:
        `{"protocol": "box-iou", "mean_iou", "acc_at_iou", "threshold", "n", "n_unparsed"}`; a prediction
        without a box scores IoU 0.
    """
    preds, refs, sizes = [], [], []
    for i, p in enumerate(predictions):
        if not isinstance(p, dict) or p.get("prediction") is None or p.get("answer") is None:
            raise ValueError(f"prediction {i}: expected a dict with 'prediction' and 'answer', got {p!r}")
        preds.append(str(p["prediction"]))
        refs.append(p["answer"])
        size = p.get("image_size")
        sizes.append(None if size is None else (int(size[0]), int(size[1])))
    out = grounding_scores(preds, refs, sizes, threshold)
    return {"protocol": "box-iou", "mean_iou": _pct_or_none(out["mean_iou"]),
            "acc_at_iou": _pct_or_none(out["acc_at_iou"]), "threshold": threshold,
            "n": out["n"], "n_unparsed": out["n_unparsed"]}
