"""Language-aware text overlap: ROUGE-1/2/L, BLEU-1..4 and METEOR that work on Chinese and Japanese as on English.

`rouge-score`'s tokenizer keeps only ASCII letters and digits, so ROUGE of two Chinese reports is 0 whatever they
say, and whitespace BLEU sees a Chinese sentence as one word. Text in a CJK script (Han, Hiragana, Katakana,
Hangul) has no spaces between words, so it is scored **by character**, the usual choice for Chinese report
generation (and what a character-level segmenter gives): each CJK character is one token, each run of other letters
or digits ("ct", "t2", "3cm") is one token, punctuation and spaces are dropped.

Tokenizers, chosen by name (a task sets one; `auto` is the default everywhere):

- `words`: the English behaviour medm always had: VQA normalisation (`metrics.normalize_answer`), then
  `rouge-score`'s own tokenizer for ROUGE and whitespace tokens for BLEU / METEOR.
- `chars`: lower-cased, tokens as above (one per CJK character, one per other alphanumeric run).
- `auto`: `chars` when either text holds a CJK character, else `words`.

ROUGE on `chars` tokens is computed here with `rouge-score`'s definitions (clipped n-gram counts, LCS for ROUGE-L,
F-measure = 2PR / (P + R)); on `words` it is `rouge-score` itself. BLEU is `nltk`'s sentence BLEU (smoothing
method1). METEOR is `nltk`'s `single_meteor_score` (alpha 0.9, beta 3, gamma 0.5) with exact and Porter-stem
matches only: WordNet synonyms need a corpus download, so they are left out (and stems do not apply to CJK).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from medm.eval._normalize import normalize_answer

TOKENIZERS = ("auto", "words", "chars")
# Hiragana + Katakana, CJK extension A, CJK unified ideographs, compatibility ideographs, Hangul syllables,
# half-width Katakana.
_CJK_CLASS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\uff66-\uff9f"
_CJK = re.compile(f"[{_CJK_CLASS}]")
# One CJK character, or a run of letters / digits that are not CJK (\w would swallow "ct示" whole).
_CHAR_TOKEN = re.compile(f"[{_CJK_CLASS}]|(?:(?![{_CJK_CLASS}])[^\\W_])+")


def has_cjk(text: Any) -> bool:
    """True when `text` holds a Chinese, Japanese or Korean character."""
    return _CJK.search(str(text)) is not None


def resolve_tokenizer(tokenizer: str, *texts: Any) -> str:
    """`words` or `chars`: `tokenizer` itself, or for `auto` what the texts need (chars when any has CJK)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; known: {', '.join(TOKENIZERS)}")
    if tokenizer != "auto":
        return tokenizer
    return "chars" if any(has_cjk(t) for t in texts) else "words"


def char_tokens(text: Any) -> list[str]:
    """Lower-cased tokens: one per CJK character, one per run of other letters / digits; punctuation dropped.

    Example:
        >>> char_tokens("CT示右肺结节，3cm。")
        ['ct', '示', '右', '肺', '结', '节', '3cm']
    """
    return _CHAR_TOKEN.findall(str(text).lower())


def text_tokens(text: Any, tokenizer: str) -> list[str]:
    """Tokens for BLEU / METEOR: VQA-normalised whitespace tokens (`words`) or `char_tokens` (`chars`)."""
    return char_tokens(text) if tokenizer == "chars" else normalize_answer(text).split()


# ---- ROUGE -----------------------------------------------------------------------------------------------------
def _f(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_tokens(pred: Sequence[str], ref: Sequence[str]) -> dict[str, float]:
    """ROUGE-1 / ROUGE-2 / ROUGE-L F-measures of two token lists, as `rouge-score` defines them."""
    out = {}
    for n in (1, 2):
        p, r = _ngrams(pred, n), _ngrams(ref, n)
        out[f"rouge{n}"] = _f(sum((p & r).values()), sum(p.values()), sum(r.values()))
    out["rougeL"] = _f(_lcs(pred, ref), len(pred), len(ref)) if pred and ref else 0.0
    return out


@functools.lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer  # defers rouge_score (ROUGE only)

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)


def rouge_scores(prediction: Any, reference: Any, tokenizer: str = "auto", normalize: bool = True,
                 use_stemmer: bool = False) -> dict[str, float]:
    """`{"rouge1", "rouge2", "rougeL"}` F-measures in [0, 1] under a tokenizer (module docstring).

    `normalize` (words only) applies VQA normalisation before `rouge-score`'s tokenizer.
    """
    if resolve_tokenizer(tokenizer, prediction, reference) == "chars":
        return rouge_tokens(char_tokens(prediction), char_tokens(reference))
    prep = normalize_answer if normalize else str
    scores = _rouge_scorer(use_stemmer).score(prep(reference), prep(prediction))  # score(target, prediction)
    return {k: float(v.fmeasure) for k, v in scores.items()}


# ---- METEOR ----------------------------------------------------------------------------------------------------
class _NoSynonyms:
    """Stands in for nltk's WordNet reader: no synonyms, so no corpus download."""

    def synsets(self, *args: Any, **kwargs: Any) -> list:
        return []


def meteor(prediction: Any, reference: Any, tokenizer: str = "auto") -> float:
    """METEOR in [0, 1] (nltk, exact + Porter-stem matches, no WordNet synonyms); 0 when either text is empty."""
    from nltk.translate.meteor_score import single_meteor_score  # defers nltk (METEOR only)

    tok = resolve_tokenizer(tokenizer, prediction, reference)
    hyp, ref = text_tokens(prediction, tok), text_tokens(reference, tok)
    if not hyp or not ref:
        return 0.0
    return float(single_meteor_score(ref, hyp, wordnet=_NoSynonyms()))
