"""Language-aware text metrics: Chinese and Japanese pairs scored by character, against values computed by hand."""

import pytest
from rouge_score import rouge_scorer

from medm.eval.metrics import bleu, bleu_scores, rouge
from medm.eval.text import char_tokens, has_cjk, meteor, resolve_tokenizer, rouge_tokens

ZH_PRED, ZH_REF = "双肺纹理增多，心影不大", "双肺纹理增多，心影正常"
JA_PRED, JA_REF = "右肺に結節を認める。", "左肺に結節を認める。"


def test_chinese_pair_by_hand():
    # 10 characters each once the comma goes; 8 shared (双肺纹理增多心影), in order; 9 bigrams each, 7 shared
    # (双肺 肺纹 纹理 理增 增多 多心 心影).
    r = rouge(ZH_PRED, ZH_REF)
    assert r["rouge1"] == pytest.approx(0.8) and r["rougeL"] == pytest.approx(0.8)
    assert r["rouge2"] == pytest.approx(7 / 9)
    b = bleu_scores(ZH_PRED, ZH_REF)
    assert b["bleu1"] == pytest.approx(0.8)  # same length: no brevity penalty
    assert b["bleu2"] == pytest.approx((0.8 * 7 / 9) ** 0.5)
    # METEOR: P = R = 0.8, Fmean = PR / (0.9 P + 0.1 R) = 0.8; one chunk of 8 matches:
    # penalty = 0.5 * (1 / 8) ** 3.
    assert meteor(ZH_PRED, ZH_REF) == pytest.approx(0.8 * (1 - 0.5 / 512))


def test_japanese_pair_by_hand():
    # 右肺に結節を認める vs 左肺に結節を認める: 9 characters, 8 shared; 8 bigrams, 7 shared (肺に ... める).
    r = rouge(JA_PRED, JA_REF)
    assert r["rouge1"] == pytest.approx(8 / 9) and r["rougeL"] == pytest.approx(8 / 9)
    assert r["rouge2"] == pytest.approx(7 / 8)
    assert bleu(JA_PRED, JA_REF, n=1) == pytest.approx(8 / 9)
    # Hiragana and Katakana are characters too.
    assert char_tokens("カテーテルあり") == ["カ", "テ", "ー", "テ", "ル", "あ", "り"]


def test_latin_runs_inside_cjk_text_stay_whole():
    assert char_tokens("CT示右肺结节，3cm。T2WI高信号") == ["ct", "示", "右", "肺", "结", "节", "3cm", "t2wi", "高",
                                                          "信", "号"]
    r = rouge("CT示右肺结节", "MRI示右肺结节")
    assert r["rouge1"] == pytest.approx(5 / 6)  # ct vs mri differ, 示右肺结节 shared


def test_english_is_scored_as_before():
    pred, ref = "Small left effusion.", "Small left pleural effusion."
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    expected = {k: v.fmeasure for k, v in scorer.score("small left pleural effusion", "small left effusion").items()}
    assert rouge(pred, ref) == pytest.approx(expected)
    assert resolve_tokenizer("auto", pred, ref) == "words" and not has_cjk(pred)
    # Our ROUGE on the same tokens equals rouge-score's.
    assert rouge_tokens("small left effusion".split(), "small left pleural effusion".split()) == pytest.approx(expected)
    # The old failure: rouge-score alone drops every CJK character.
    assert scorer.score(ZH_REF, ZH_PRED)["rouge1"].fmeasure == 0.0


def test_tokenizer_can_be_forced_and_unknown_ones_are_refused():
    assert rouge(ZH_PRED, ZH_REF, tokenizer="words")["rouge1"] == 0.0  # what the words tokenizer gives
    assert rouge("left lung", "left lung", tokenizer="chars")["rouge1"] == 1.0
    assert resolve_tokenizer("auto", "left lung", ZH_REF) == "chars"
    with pytest.raises(ValueError, match="unknown tokenizer 'jieba'"):
        rouge(ZH_PRED, ZH_REF, tokenizer="jieba")
    assert meteor("", ZH_REF) == 0.0 and rouge("", ZH_REF)["rougeL"] == 0.0
