"""Answer metrics: VQA normalisation, token overlap, BLEU, ROUGE, yes/no P/R/F1, choice matching, boxes. Expected
values are computed by hand in the comments."""

import math

import pytest

from medm.eval.metrics import (
    bleu,
    bleu_scores,
    box_iou,
    choice_correct,
    contains_phrase,
    exact_match,
    first_clause,
    grounding_scores,
    normalize_answer,
    parse_box,
    parse_boxes,
    question_options,
    rouge,
    token_scores,
    yes_no_of,
    yes_no_prf,
)


# ---- normalisation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("The Left Lung.", "left lung"),  # lower case, article, final period
    ("Two lesions", "2 lesions"),  # number words -> digits
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),  # the map stops at ten
    ("an MRI", "mri"),  # articles a / an / the dropped
    ("a the an", ""),
    ("dont know", "don't know"),  # contractions written without apostrophe get one
    ("isnt", "isn't"),
    ("x-ray", "x ray"),  # a mark touching no space becomes a space
    ("x -ray", "x ray"),  # ... and is deleted when one of its kind touches a space
    ("left/right", "left right"),
    ("1,000 mg/dl", "1000 mgdl"),  # a digit,digit group deletes every mark instead
    ("2.5 cm.", "2.5 cm"),  # a period before a digit stays, others go
    ("Yes!\nIt is.", "yes it is"),  # newlines are spaces
    (4, "4"),  # VQA-RAD has integer answers
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_answer_is_idempotent_on_typical_answers():
    for text in ["The Left Lung.", "Two lesions", "dont know", "x-ray, left", "1,000 mg/dl", "It's a CT!"]:
        once = normalize_answer(text)
        assert normalize_answer(once) == once


@pytest.mark.parametrize("text, expected", [
    ("No, there is none.", "no"),
    ("Yes.", "yes"),
    ("There is no effusion, yes", "no"),  # the first one stated
    ("I do not know", None),  # "not" / "know" are not "no"
    ("Nope", None),
])
def test_yes_no_of(text, expected):
    assert yes_no_of(text) == expected


def test_contains_phrase_is_whole_tokens():
    words = "left upper lobe".split()
    assert contains_phrase(words, ["upper", "lobe"])
    assert not contains_phrase(words, ["left", "lobe"])  # not contiguous
    assert not contains_phrase(["lungs"], ["lung"])  # not a substring match
    assert not contains_phrase(words, [])


# ---- open-ended ----------------------------------------------------------------------------------------------
def test_token_scores_count_each_reference_token_once():
    # pred {left: 3}, ref {left: 1, lung: 1}: 1 match -> precision 1/3, recall 1/2, F1 = 2*(1/6)/(5/6) = 0.4.
    t = token_scores("left left left", "left lung")
    assert (t.precision, t.recall, t.f1) == pytest.approx((1 / 3, 1 / 2, 0.4))


def test_token_scores_normalise_first_and_handle_empty():
    assert token_scores("The left lung.", "left lung").f1 == pytest.approx(1.0)
    assert token_scores("two", "2").recall == pytest.approx(1.0)
    assert token_scores("", "left lung").recall == 0.0
    assert token_scores("right", "left").f1 == 0.0


def test_exact_match():
    assert exact_match("The CT.", "ct")
    assert exact_match("Two", 2)
    assert not exact_match("ct scan", "ct")


# ---- BLEU / ROUGE ----------------------------------------------------------------------------------------------
def test_bleu_by_hand():
    # Identical 2-word answers: p1 = p2 = 1; no 3-/4-grams, method1 gives them 0.1 / 1.
    assert bleu_scores("left lung", "left lung") == pytest.approx(
        {"bleu1": 1.0, "bleu2": 1.0, "bleu3": 0.1 ** (1 / 3), "bleu4": 0.1 ** (1 / 2)})
    # "left lower lobe" vs "left upper lobe": p1 = 2/3, p2 = 0 -> smoothed 0.1/2; BP = 1.
    assert bleu("left lower lobe", "left upper lobe", 1) == pytest.approx(2 / 3)
    assert bleu("left lower lobe", "left upper lobe", 2) == pytest.approx(math.sqrt(2 / 3 * 0.05))
    with pytest.warns(UserWarning, match="2-gram"):  # nltk's own warning for an unsmoothed zero order
        assert bleu("left lower lobe", "left upper lobe", 2, smoothing=None) == pytest.approx(0.0, abs=1e-9)
    # One word against two: p1 = 1, brevity penalty exp(1 - 2/1).
    assert bleu("lung", "left lung", 1) == pytest.approx(math.exp(-1))
    # Normalisation drops the article before counting; without it "the" is an unmatched unigram.
    assert bleu("The lung", "lung", 1) == pytest.approx(1.0)
    assert bleu("The lung", "lung", 1, normalize=False) == pytest.approx(0.5)
    assert bleu("", "lung", 1) == 0.0
    with pytest.raises(ValueError, match="1..4"):
        bleu("a", "b", 5)


def test_rouge_by_hand():
    # Without normalisation "the" counts: R1 = F(2/3, 1) = 0.8, R2 = F(1/2, 1) = 2/3, RL = LCS 2 -> 0.8.
    assert rouge("the left lung", "left lung", normalize=False) == pytest.approx(
        {"rouge1": 0.8, "rouge2": 2 / 3, "rougeL": 0.8})
    assert rouge("the left lung", "left lung") == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    # Word order: all unigrams match, no bigram does, LCS is 1 of 2.
    assert rouge("lung left", "left lung") == pytest.approx({"rouge1": 1.0, "rouge2": 0.0, "rougeL": 0.5})


# ---- closed-ended ----------------------------------------------------------------------------------------------
def test_yes_no_prf_by_hand():
    # tp = 2 (items 0, 4), fp = 1 (item 1), fn = 1 (item 2); 3 of 5 right.
    out = yes_no_prf([True, True, False, False, True], [True, False, True, False, True])
    assert out == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "accuracy": 3 / 5})


def test_yes_no_prf_undefined_is_none_not_zero():
    never_yes = yes_no_prf([False, False], [True, False])
    assert never_yes["precision"] is None and never_yes["recall"] == 0.0 and never_yes["f1"] == 0.0
    all_no = yes_no_prf([False], [False])
    assert all_no["precision"] is None and all_no["recall"] is None and all_no["f1"] is None
    with pytest.raises(ValueError):
        yes_no_prf([True], [])


@pytest.mark.parametrize("text, expected", [
    ("MRI, not CT", "MRI"),
    ("It is 2.5 cm. Large", "It is 2.5 cm"),
    ("Left but maybe right", "Left"),
    ("  \nAxial", "Axial"),
])
def test_first_clause(text, expected):
    assert first_clause(text) == expected


@pytest.mark.parametrize("question, options", [
    ("Is this an MRI or a CT scan?", ["mri", "ct"]),
    ("Are pleural opacities located on the left, right, or both sides of the lung?", ["left", "right", "both"]),
    ("Are there multiple or just 1 metastatic focus?", ["multiple", "1"]),
    ("Is this patient male or female?", ["male", "female"]),
    ("Is there an effusion?", []),
])
def test_question_options(question, options):
    assert question_options(question) == options


@pytest.mark.parametrize("prediction, expected", [
    ("MRI", True),
    ("This is an MRI scan.", True),
    ("MRI, not CT.", True),  # the other option only after the first clause
    ("CT", False),
    ("It could be an MRI or a CT.", False),  # both options named
    ("I am not sure.", False),  # neither named
    ("CT, not MRI.", False),
])
def test_choice_correct_mri_or_ct(prediction, expected):
    assert choice_correct(prediction, "MRI", "Is this an MRI or a CT scan?") is expected


def test_choice_correct_whole_words_and_option_inside_answer():
    q = "Is this image normal or abnormal?"
    assert choice_correct("Abnormal", "abnormal", q)
    assert not choice_correct("Normal", "abnormal", q)  # "normal" is not the word "abnormal"
    assert choice_correct("The image is abnormal, not normal", "abnormal", q)
    # The answer "Right side" holds one option; naming it is enough, naming both is not.
    side = "Is the gastric bubble shown on the left or right side of the patient?"
    assert choice_correct("Right.", "Right side", side)
    assert not choice_correct("Left and right", "Right side", side)
    # Number words count as digits: "one" answers "multiple or just 1".
    assert choice_correct("Just one.", "one", "Are there multiple or just 1 metastatic focus?")


def test_choice_correct_without_question_cannot_see_both_options():
    # Without the question only the answer's presence in the first clause is checked.
    assert choice_correct("MRI or CT", "MRI")
    assert not choice_correct("MRI or CT", "MRI", "Is this an MRI or a CT?")


# ---- boxes -----------------------------------------------------------------------------------------------------
def test_parse_box_0_1000_grid_scales_by_image_size():
    # (100, 200)-(300, 400) on the 0-1000 grid of a 500 x 1000 (w x h) image.
    assert parse_box("The lesion is at <box>(100,200),(300,400)</box>.", (500, 1000)) == (50.0, 200.0, 150.0, 400.0)
    assert parse_box("<|box_start|>(0,0),(1000,1000)<|box_end|>", (64, 32)) == (0.0, 0.0, 64.0, 32.0)
    with pytest.raises(ValueError, match="image_size"):
        parse_box("<box>(1,2),(3,4)</box>")


def test_parse_box_qwen_json_in_fence_and_list():
    text = 'Here:\n```json\n[\n  {"bbox_2d": [10, 20, 110, 220], "label": "lesion"}\n]\n```'
    assert parse_box(text) == (10.0, 20.0, 110.0, 220.0)
    assert parse_box('{"bbox_2d": [1.5, 2, 3, 4.25], "label": "x"}') == (1.5, 2.0, 3.0, 4.25)
    assert parse_box("no box here") is None


def test_parse_boxes_keeps_written_order_across_formats():
    text = '{"bbox_2d": [1, 2, 3, 4]} then <box>(0,0),(500,500)</box> and {"bbox_2d": [5, 6, 7, 8]}'
    assert parse_boxes(text, (100, 100)) == [(1.0, 2.0, 3.0, 4.0), (0.0, 0.0, 50.0, 50.0), (5.0, 6.0, 7.0, 8.0)]


def test_box_iou_by_hand():
    # Overlap 5 x 5 = 25; union 100 + 100 - 25 = 175.
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == pytest.approx(1.0)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 5)) == pytest.approx(0.5)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((10, 10, 0, 0), (15, 15, 5, 5)) == pytest.approx(25 / 175)  # corners in either order
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_grounding_scores_by_hand():
    preds = ["<box>(0,0),(100,100)</box>",  # (0, 0, 10, 10) on a 100 x 100 image: IoU 1
             '```json\n{"bbox_2d": [5, 5, 15, 15], "label": "nodule"}\n```',  # IoU 25/175
             "I cannot find it."]  # no box: IoU 0
    refs = [[0, 0, 10, 10], "<box>(0,0),(100,100)</box>", (0, 0, 10, 10)]
    out = grounding_scores(preds, refs, [(100, 100)] * 3)
    assert out["mean_iou"] == pytest.approx((1 + 1 / 7 + 0) / 3)
    assert out["acc_at_iou"] == pytest.approx(1 / 3)
    assert (out["n"], out["n_unparsed"], out["threshold"]) == (3, 1, 0.5)
    # A looser threshold counts the 1/7 overlap too.
    assert grounding_scores(preds, refs, [(100, 100)] * 3, threshold=0.1)["acc_at_iou"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="reference 0"):
        grounding_scores(["x"], ["no box"])
