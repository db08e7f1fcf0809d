"""Multiple-choice rules as the benchmarks' scripts apply them: prompts and answer reading, edge cases included."""

import pytest

from medm.eval.choice import (
    RULES,
    is_correct,
    most_similar,
    parse_difflib,
    parse_medxpertqa,
    parse_mmmu,
    render_m3d,
    render_medxpertqa,
    render_mmmu,
    render_omnimedvqa,
    render_pmc_vqa,
)

OPTS = {"A": "right atrium", "B": "left ventricle", "C": "aorta", "D": "pulmonary vein"}


def test_prompts_are_rendered_as_the_benchmarks_do():
    q = "Which chamber is enlarged?"
    # MMMU's multi_choice_example_format "{}\n\n{}\n\nAnswer ..." with "(A) x\n" per option.
    assert render_mmmu(q, {"A": "x", "B": "y"}) == ("Which chamber is enlarged?\n\n(A) x\n(B) y\n\n"
                                                   "Answer with the option's letter from the given choices directly.")
    # OmniMedVQA: no space before "Here", the options as a Python list.
    assert render_omnimedvqa(q, {"A": "x", "B": "y"}) == (
        "Which chamber is enlarged?Here are 2 candidate answers:['x', 'y'] Only return what you think is the correct "
        "answer from the candidate answers, do not return any other irrelevant text!")
    assert render_pmc_vqa(q, {"A": "x", "B": "y"}) == \
        "Question: Which chamber is enlarged?Choices: A:x B:yThe Answer is:"
    assert render_m3d(q, {"A": "x", "B": "y", "C": "z", "D": "w"}) == (
        "Which chamber is enlarged? Choices: A. x B. y C. z D. w")
    assert render_medxpertqa("Q text\nAnswer Choices: (A) x (B) y", {"A": "x", "B": "y"}) == (
        "Q: Q text\nAnswer Choices: (A) x (B) y\nA: Among A through B, the answer is")


@pytest.mark.parametrize("response,letter,guessed", [
    ("(B) because the wall is thick", "B", False),
    ("B", "B", False),
    ("The answer is B.", "B", False),          # trailing period stripped, then " B " found
    ("(A) or (B)? I would say (B)", "B", False),  # several in brackets: the one written last
    ("C or D, probably D", "D", False),           # " D " rfind beats " C "... the last written
    ("I think the correct structure here is the left ventricle", "B", False),  # > 5 words: option text
    ("A mass is seen", "A", False),               # the article "A" is read as a letter, as MMMU does
])
def test_mmmu_parse_multi_choice_response(response, letter, guessed):
    assert parse_mmmu(response, OPTS, "q1") == parse_mmmu(response, OPTS, "q1")
    c = parse_mmmu(response, OPTS, "q1")
    assert (c.letter, c.guessed) == (letter, guessed)


def test_mmmu_guesses_reproducibly_when_nothing_is_found():
    c = parse_mmmu("left ventricle", OPTS, "q7")  # 2 words: the option texts are not searched
    assert c.guessed and c.letter in OPTS and parse_mmmu("left ventricle", OPTS, "q7") == c
    right, choice = is_correct("mmmu", "no idea", OPTS, "A", "q8")
    assert choice.guessed


def test_difflib_rules_pick_the_most_similar_option():
    assert parse_difflib("Left ventricle.", OPTS).letter == "B"
    assert parse_difflib("", OPTS).letter is None  # every ratio 0: no option, counted wrong
    assert most_similar(["ab", "ab"], "ab") == 0  # first of equals
    assert is_correct("omnimedvqa", "aorta", OPTS, "C")[0] and not is_correct("omnimedvqa", "", OPTS, "C")[0]
    assert is_correct("pmc-vqa", "C:aorta", OPTS, "C")[0]


@pytest.mark.parametrize("response,letter", [
    ("Among A through D, the answer is C.", "C"),
    ("Let me think. The answer is (B).", "B"),
    ("A patient with D", "A"),   # no trigger: the first standalone letter, the article included (their regex)
    ("none of these", None),
])
def test_medxpertqa_answer_cleansing(response, letter):
    assert parse_medxpertqa(response, OPTS).letter == letter


def test_m3d_needs_the_letter_with_its_period():
    assert is_correct("m3d", "C. aorta", OPTS, "C")[0]
    assert not is_correct("m3d", "The answer is C", OPTS, "C")[0]
    assert set(RULES) == {"mmmu", "omnimedvqa", "pmc-vqa", "medxpertqa", "m3d"}
