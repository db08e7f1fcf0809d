"""Scoring protocols: `strict` and `llava-med` on hand-scored predictions, including the LLaVA-Med quirks."""

import pytest

from medm.eval.protocols import PROTOCOLS, breakdown, get_protocol, score, score_grounding

MRI_OR_CT = "Is this an MRI or a CT?"

# Five questions scored by hand under both protocols (see test_score_*_by_hand).
ITEMS = [
    {"id": "q1", "prediction": "Yes, it is.", "answer": "Yes", "answer_type": "CLOSED", "question_type": "PRES"},
    {"id": "q2", "prediction": "I do not know", "answer": "no", "answer_type": "CLOSED", "question_type": "PRES"},
    {"id": "q3", "prediction": "It is an MRI or a CT.", "answer": "CT", "answer_type": "CLOSED ",
     "question": MRI_OR_CT, "question_type": "MODALITY"},
    {"id": "q4", "prediction": "left left left", "answer": "left lung", "answer_type": "OPEN", "question_type": "POS"},
    {"id": "q5", "prediction": "The liver.", "answer": "liver", "answer_type": " open", "question_type": "ORGAN"},
]


def test_strict_yes_no_is_the_stated_answer():
    p = get_protocol("strict")
    assert p.closed_correct("No, there is no effusion.", "no", None)
    assert p.closed_correct("Yes, but there is no mass.", "yes", None)  # the first yes/no word
    assert not p.closed_correct("I do not know", "no", None)
    assert not p.closed_correct("Yes", "no", None)


def test_llava_med_closed_is_substring():
    p = get_protocol("llava-med")
    assert p.closed_correct("I do not know", "no", None)  # "no" inside "not" / "know"
    assert p.closed_correct("It is an MRI or a CT.", "CT", MRI_OR_CT)  # both options named still counts
    assert p.says_yes("eyes are visible")  # "yes" inside "eyes"
    assert not get_protocol("strict").says_yes("eyes are visible")


def test_strict_choice_question_uses_the_options():
    p = get_protocol("strict")
    assert p.closed_correct("This is a CT scan.", "CT", MRI_OR_CT)
    assert not p.closed_correct("It is an MRI or a CT.", "CT", MRI_OR_CT)  # both named
    assert not p.closed_correct("Yes", "CT", MRI_OR_CT)  # neither named


def test_open_left_left_left_vs_left_lung():
    # LLaVA-Med: tp = count of "left" in the prediction = 3, fn = 1 ("lung") -> recall 0.75; precision 3/3;
    # exact = 1 distinct answer word found / 3 prediction words; "left lung" is no substring of "left left left".
    lm = get_protocol("llava-med").open_score("left left left", "left lung")
    assert (lm.recall, lm.precision, lm.f1, lm.hit, lm.exact) == pytest.approx((0.75, 1.0, 1.5 / 1.75, 0.0, 1 / 3))
    # Strict: "left" matched once -> recall 1/2, precision 1/3, F1 0.4; no whole-word answer, not equal.
    st = get_protocol("strict").open_score("left left left", "left lung")
    assert (st.recall, st.precision, st.f1, st.hit, st.exact) == pytest.approx((0.5, 1 / 3, 0.4, 0.0, 0.0))


def test_open_accuracy_substring_vs_whole_words():
    assert get_protocol("llava-med").open_score("lungs are clear", "lung").hit == 1.0
    assert get_protocol("strict").open_score("lungs are clear", "lung").hit == 0.0
    assert get_protocol("strict").open_score("in the left lung", "left lung").hit == 1.0


def test_open_number_words_articles_and_empty_prediction():
    for name in PROTOCOLS:
        p = get_protocol(name)
        assert p.open_score("There are two kidneys.", "2").recall == 1.0  # "two" -> "2"
        assert p.open_score("The liver", "liver").exact == 1.0  # article dropped
        assert p.open_score("", "liver").recall == 0.0
    # LLaVA-Med's exact match divides by the prediction's length: 1 answer word of 4.
    assert get_protocol("llava-med").open_score("There are two kidneys.", "2").exact == pytest.approx(1 / 4)
    assert get_protocol("strict").open_score("There are two kidneys.", "2").exact == 0.0


def test_score_strict_by_hand():
    out = score(ITEMS)
    assert out["protocol"] == "strict"
    assert {k: out[k] for k in ("n", "n_closed", "n_open", "n_yes_no", "n_choice")} == {
        "n": 5, "n_closed": 3, "n_open": 2, "n_yes_no": 2, "n_choice": 1}
    # closed: q1 right, q2 wrong (no yes/no stated), q3 wrong (both options) -> 1/3.
    # yes class: q1 predicted yes & gold yes, q2 not-yes & gold no -> P = R = F1 = 1.
    # open: recall (1/2 + 1)/2, precision (1/3 + 1)/2, F1 (0.4 + 1)/2, accuracy and exact 1 of 2.
    # overall: (1 + 0 + 0 + 0.5 + 1) / 5.
    assert out == pytest.approx({
        **out, "closed_accuracy": 100 / 3, "closed_precision": 100.0, "closed_recall": 100.0, "closed_f1": 100.0,
        "closed_choice_accuracy": 0.0, "open_recall": 75.0, "open_precision": 200 / 3, "open_f1": 70.0,
        "open_accuracy": 50.0, "exact_match": 50.0, "overall": 50.0})


def test_score_llava_med_by_hand():
    out = score(ITEMS, protocol="llava-med")
    assert out["protocol"] == "llava-med"
    # closed: all three by substring. open: recall (0.75 + 1)/2, precision 1, F1 (6/7 + 1)/2, accuracy 1 of 2
    # (substring), exact (1/3 + 1)/2. overall: (1 + 1 + 1 + 0.75 + 1) / 5.
    assert out == pytest.approx({
        **out, "closed_accuracy": 100.0, "closed_precision": 100.0, "closed_recall": 100.0, "closed_f1": 100.0,
        "closed_choice_accuracy": 100.0, "open_recall": 87.5, "open_precision": 100.0, "open_f1": 50 * (6 / 7 + 1),
        "open_accuracy": 50.0, "exact_match": 200 / 3, "overall": 95.0})


def test_answer_type_inferred_when_missing_and_numbers_accepted():
    out = score([{"prediction": "yes", "answer": "Yes"}, {"prediction": "4", "answer": 4},
                 {"prediction": "left lung", "answer": "left lung"}])
    assert (out["n_closed"], out["n_open"]) == (1, 2)
    assert out["exact_match"] == 100.0


def test_metrics_without_questions_are_none():
    out = score([{"prediction": "liver", "answer": "liver", "answer_type": "OPEN"}])
    assert out["closed_accuracy"] is None and out["closed_f1"] is None and out["closed_choice_accuracy"] is None
    assert out["open_recall"] == 100.0 and out["overall"] == 100.0
    empty = score([])
    assert empty["n"] == 0 and empty["overall"] is None and empty["protocol"] == "strict"


def test_bad_input_errors_name_the_prediction():
    with pytest.raises(ValueError, match=r"prediction 0 \(id 'x1'\).*'MAYBE'"):
        score([{"id": "x1", "prediction": "a", "answer": "b", "answer_type": "MAYBE"}])
    with pytest.raises(ValueError, match="prediction 1.*missing 'prediction'"):
        score([{"prediction": "a", "answer": "b"}, {"answer": "b"}])
    with pytest.raises(KeyError, match="llava-med, strict"):
        score(ITEMS, protocol="vqa")


def test_breakdown_groups_and_matches_score_on_each_group():
    groups = breakdown(ITEMS, by="question_type")
    assert list(groups) == ["MODALITY", "ORGAN", "POS", "PRES"]
    pres = groups["PRES"]
    assert (pres["group_by"], pres["group"], pres["protocol"], pres["n"]) == ("question_type", "PRES", "strict", 2)
    assert pres["closed_accuracy"] == 50.0
    assert groups["POS"]["open_recall"] == score([ITEMS[3]])["open_recall"] == 50.0
    assert breakdown(ITEMS, by="question_type", protocol="llava-med")["PRES"]["closed_accuracy"] == 100.0
    # A missing key goes to "(none)"; with a separator a multi-label value counts in each label's group.
    multi = [{"prediction": "yes", "answer": "yes", "question_type": "PRES, POS"}, {"prediction": "no", "answer": "no"}]
    assert list(breakdown(multi)) == ["(none)", "PRES, POS"]
    split = breakdown(multi, sep=",")
    assert list(split) == ["(none)", "POS", "PRES"] and split["POS"]["n"] == split["PRES"]["n"] == 1


def test_score_grounding_names_its_protocol():
    out = score_grounding([
        {"prediction": "<box>(0,0),(500,500)</box>", "answer": [0, 0, 50, 50], "image_size": [100, 100]},
        {"prediction": '[{"bbox_2d": [0, 0, 10, 40], "label": "x"}]', "answer": [0, 0, 10, 10]},  # IoU 1/4
    ])
    assert out == pytest.approx({"protocol": "box-iou", "mean_iou": 62.5, "acc_at_iou": 50.0, "threshold": 0.5,
                                 "n": 2, "n_unparsed": 0})
