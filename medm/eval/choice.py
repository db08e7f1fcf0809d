"""Multiple-choice questions as the benchmarks' own scripts prompt and score them: one rule per benchmark.

A rule renders the options into the prompt exactly as the benchmark's evaluation code does, and reads the option
a model chose from its answer the same way. Each is a port of the named function; quirks are kept (and tested), so
medm's accuracy is the number the benchmark's script would print on the same answers.

- `mmmu`: MMMU `mmmu/utils/data_utils.py::construct_prompt` (prompt) and `mmmu/utils/eval_utils.py::
  parse_multi_choice_response` (answer): strip , . ! ? ; : ' from the ends, pad with spaces; letters in
  parentheses "(B)" first, else letters between spaces " B "; else, for answers longer than 5 words, option texts
  found in the answer (case-insensitive); several candidates: the one written last; none: a random letter. MMMU
  draws that letter from one `random` stream seeded 42 in question order; medm seeds it per question (CRC32 of the
  id) so a score never depends on order, and counts such answers in `n_unparsed`.
- `omnimedvqa`: OmniMedVQA (OpenGVLab Multi-Modality-Arena `MedicalEval/Question-answering_Score`): prompt
  `task_datasets/medical_datasets.py::MedicalDataset`, answer `utils/medicalqa.py::MedicalEval`: the option with the
  highest `difflib.SequenceMatcher` ratio to the answer (first of equals; no option with ratio > 0 is wrong).
- `pmc-vqa`: PMC-VQA's MedVInT `src/MedVInT_TD/test.py`: prompt "Question: {q}Choices:{A:..B:..}The Answer is:"
  (as `Dataset/PMC_QA_Dataset.py` builds it) and the same difflib rule over the choices as written ("A:...").
- `medxpertqa`: MedXpertQA `eval/utils.py::answer_cleansing` (zero-shot, answer-only prompt of
  `eval/config/prompt_templates.py`): the text after "Among A through E, the answer is" (else after " answer is ",
  else all of it), then the first standalone capital letter among the options (`\\b(A|B|...)\\b`; so a bare article
  "A" counts, as in their script).
- `m3d`: M3D-Bench closed VQA, `Bench/eval/eval_vqa.py`: prompt "{q} Choices: A. {a} B. {b} C. {c} D. {d}", right
  when "{letter}." occurs in the answer.
"""

from __future__ import annotations

import difflib
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

Options = dict[str, str]  # letter -> option text, in order


@dataclass(frozen=True)
class Choice:
    """The option a model's answer picks under a rule: `letter` (None when the rule finds none) and whether the
    rule had to guess it (`guessed`, MMMU's random fallback)."""

    letter: str | None
    guessed: bool = False


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


# ---- MMMU ------------------------------------------------------------------------------------------------------
MMMU_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def render_mmmu(question: str, options: Options) -> str:
    example = "".join(f"({k}) {v}\n" for k, v in options.items())
    return f"{question}\n\n{example}\n{MMMU_INSTRUCTION}"


def parse_mmmu(response: str, options: Options, seed_key: str = "") -> Choice:
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    all_choices = list(options)
    candidates, index_ans, with_brackets = [], True, False
    for c in all_choices:
        if f"({c})" in response:
            candidates.append(c)
            with_brackets = True
    if not candidates:
        candidates = [c for c in all_choices if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in options.items() if text.lower() in response.lower()]
        index_ans = False
    if not candidates:
        return Choice(random.Random(zlib.crc32(seed_key.encode())).choice(all_choices), guessed=True)
    if len(candidates) == 1:
        return Choice(candidates[0])
    if index_ans:
        starts = [response.rfind(f"({c})" if with_brackets else f" {c} ") for c in candidates]
    else:
        starts = [response.lower().rfind(options[c].lower()) for c in candidates]
    return Choice(candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))])


# ---- difflib rules (OmniMedVQA, PMC-VQA) -----------------------------------------------------------------------
def most_similar(texts: list[str], target: str) -> int | None:
    """Index of the text with the highest `SequenceMatcher` ratio to `target`, the first of equals; None when every
    ratio is 0 (the original then leaves the index None)."""
    best, best_i = 0.0, None
    for i, t in enumerate(texts):
        r = difflib.SequenceMatcher(None, t, target).ratio()
        if r > best:
            best, best_i = r, i
    return best_i


def render_omnimedvqa(question: str, options: Options) -> str:
    answers = list(options.values())
    return (question + f"Here are {len(answers)} candidate answers:" + str(answers) +
            " Only return what you think is the correct answer from the candidate answers, do not return any other "
            "irrelevant text!")


def parse_difflib(response: str, options: Options, seed_key: str = "") -> Choice:
    i = most_similar(list(options.values()), response)
    return Choice(None if i is None else list(options)[i])


def render_pmc_vqa(question: str, options: Options) -> str:
    return "Question: " + question + "Choices:" + "".join(f" {k}:{v}" for k, v in options.items()) + \
        "The Answer is:"


def parse_pmc_vqa(response: str, options: Options, seed_key: str = "") -> Choice:
    i = most_similar([f" {k}:{v}" for k, v in options.items()], response)
    return Choice(None if i is None else list(options)[i])


# ---- MedXpertQA ------------------------------------------------------------------------------------------------
def medxpertqa_trigger(options: Options) -> str:
    return f"Among A through {letters(len(options))[-1]}, the answer is"


def render_medxpertqa(question: str, options: Options) -> str:
    # The question text already lists "Answer Choices: (A) ... (E) ..." in the released files.
    return f"Q: {question}\nA: {medxpertqa_trigger(options)}"


def parse_medxpertqa(response: str, options: Options, seed_key: str = "") -> Choice:
    parts = response.split(medxpertqa_trigger(options))
    if len(parts) > 1:
        response = parts[1].strip()
    elif len(response.split(" answer is ")) > 1:
        response = response.split(" answer is ")[1].strip()
    for phrase in ("I understand", "A through J", "A through E", "A through D"):
        response = response.replace(phrase, "")
    found = re.findall(r"\b(" + "|".join(options) + r")\b", response)
    return Choice(found[0] if found else None)


# ---- M3D -------------------------------------------------------------------------------------------------------
def render_m3d(question: str, options: Options) -> str:
    return question + " Choices: " + " ".join(f"{k}. {v}" for k, v in options.items())


def m3d_correct(response: str, answer: str) -> bool:
    return f"{answer}." in response


def parse_m3d(response: str, options: Options, seed_key: str = "") -> Choice:
    """The first option letter written as "X." in the answer (M3D scores `"{answer}." in answer`, see
    `m3d_correct`, which can hold for several letters; accuracy uses that test, not this pick)."""
    found = [(response.find(f"{k}."), k) for k in options if f"{k}." in response]
    return Choice(min(found)[1] if found else None)


@dataclass(frozen=True)
class Rule:
    """A benchmark's prompt rendering and answer reading."""

    render: Callable[[str, Options], str]
    parse: Callable[[str, Options, str], Choice]
    source: str


RULES: dict[str, Rule] = {
    "mmmu": Rule(render_mmmu, parse_mmmu, "MMMU eval_utils.parse_multi_choice_response"),
    "omnimedvqa": Rule(render_omnimedvqa, parse_difflib, "OmniMedVQA MedicalEval (difflib)"),
    "pmc-vqa": Rule(render_pmc_vqa, parse_pmc_vqa, "PMC-VQA MedVInT test.py (difflib)"),
    "medxpertqa": Rule(render_medxpertqa, parse_medxpertqa, "MedXpertQA answer_cleansing (zero-shot)"),
    "m3d": Rule(render_m3d, parse_m3d, "M3D-Bench eval_vqa.py (\"X.\" in answer)"),
}


def get_rule(name: str) -> Rule:
    if name not in RULES:
        raise KeyError(f"unknown multiple-choice rule {name!r}; known: {', '.join(RULES)}")
    return RULES[name]


def is_correct(rule: str, response: str, options: Options, answer: str, seed_key: str = "") -> tuple[bool, Choice]:
    """(right?, the choice read) of one answer under `rule`; `answer` is the right option's letter."""
    choice = get_rule(rule).parse(response, options, seed_key)
    if rule == "m3d":
        return m3d_correct(response, answer), choice
    return choice.letter == answer, choice
