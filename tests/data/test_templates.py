"""medm.data.templates: native and registered chat formats render like the real models, labels cover exactly the
assistant turns and their end token, and every way the split could go wrong is an error naming the record."""

from __future__ import annotations

import functools

import pytest

from medm.data.annotations import parse_record
from medm.data.templates import IGNORE_INDEX, ChatFormat, TemplateError, expand_media, render_prompt
from medm.models.builder import add_media_tokens
from medm.models.tiny import tiny_tokenizer
from medm.registry import TEMPLATE


@functools.cache
def _tokenizer(fmt: str):
    tok = tiny_tokenizer(fmt)
    add_media_tokens(tok)
    return tok


def tokenizer(fmt: str):
    """A tiny tokenizer with the real chat format `fmt` and the media tokens (cached: training takes ~10 ms)."""
    return _tokenizer(fmt)


# (tiny tokenizer format, registered template or None for the native one, text before each answer, end token)
FAMILIES = {
    "qwen2.5": ("chatml", None, "", "<|im_end|>"),
    "llama3": ("llama3", None, "", "<|eot_id|>"),
    "phi3": ("phi3", None, "", "<|end|>"),
    "phi2": ("none", "phi2", " ", "</s>"),
    "vicuna": ("none", "vicuna", " ", "</s>"),
    "pretrain": ("none", "pretrain", "", "</s>"),
}

RECORDS = {
    "multi_turn_two_images": {"id": "mt", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\nIs there a lesion?"},
        {"from": "gpt", "value": "Yes. There is one lesion."},
        {"from": "human", "value": "Compare with the prior scan.\n<image>"},
        {"from": "gpt", "value": "The lesion is large."}]},
    "text_only": {"id": "txt", "conversations": [
        {"from": "human", "value": "Is the heart enlarged?"}, {"from": "gpt", "value": "No."}]},
    "placeholder_at_end": {"id": "end", "image": ["a.png"], "conversations": [
        {"from": "human", "value": "Which organ is shown?\n<image>"}, {"from": "gpt", "value": "liver"}]},
    "placeholder_missing": {"id": "miss", "image": ["a.png"], "conversations": [
        {"from": "human", "value": "Is this an MRI or a CT?"}, {"from": "gpt", "value": "CT."}]},
    "stray_spaces": {"id": "sp", "image": ["a.png"], "conversations": [
        {"from": "human", "value": " Where is the lesion?  <image>"}, {"from": "gpt", "value": "upper left"}]},
}


def supervised(ids, labels):
    assert len(ids) == len(labels)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels)), "a label differs from its input id"
    return [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]


def runs(labels):
    """Number of contiguous supervised stretches."""
    return sum(1 for k, lab in enumerate(labels) if lab != IGNORE_INDEX and (k == 0 or labels[k - 1] == IGNORE_INDEX))


# Caption pretraining records are single-turn.
CASES = [(f, c) for f in FAMILIES for c in RECORDS if not (f == "pretrain" and c == "multi_turn_two_images")]


@pytest.mark.parametrize("family, case", CASES)
def test_labels_are_exactly_the_assistant_turns(family, case):
    fmt_name, template, before, end = FAMILIES[family]
    tok = tokenizer(fmt_name)
    rec = parse_record(RECORDS[case], "x")
    fmt = ChatFormat(tok, template)
    ids, labels = fmt.encode(rec)

    # Same ids as the tokenizer's own rendering of the same messages.
    jinja = TEMPLATE.get(template).jinja if template else None
    assert ids == tok.apply_chat_template(rec.messages(), chat_template=jinja, tokenize=True)["input_ids"]
    # Supervised tokens decode to the answers and their end tokens, nothing else.
    answers = [t["value"] for t in rec.conversations if t["from"] == "gpt"]
    assert tok.decode(supervised(ids, labels)) == "".join(before + a + end for a in answers)
    assert runs(labels) == len(answers)
    # One id per image placeholder, never supervised.
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == len(rec.image)
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == image_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_end_of_turn_id_is_what_generation_stops_on(family):
    fmt_name, template, _, end = FAMILIES[family]
    tok = tokenizer(fmt_name)
    assert ChatFormat(tok, template).end_of_turn_id == tok.convert_tokens_to_ids(end)


@pytest.mark.parametrize("family", ["qwen2.5", "llama3", "phi3"])
def test_system_prompt_is_rendered_and_not_supervised(family):
    fmt_name, _, _, end = FAMILIES[family]
    tok = tokenizer(fmt_name)
    rec = parse_record(RECORDS["text_only"], "x")
    ids, labels = ChatFormat(tok, system_prompt="You are a helpful medical imaging assistant.").encode(rec)
    assert "You are a helpful medical imaging assistant." in tok.decode(ids)
    assert tok.decode(supervised(ids, labels)) == "No." + end


# The documented formats of the real models (model cards / tokenizer_config.json), written out by hand, so the
# jinja strings in medm.models._chat_templates cannot drift unnoticed.
LITERAL = {
    "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nQ?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nA.<|eot_id|>",
    "phi3": "<|user|>\n<image>\nQ?<|end|>\n<|assistant|>\nA.<|end|>\n{eos}",
    "phi2": "Instruct: <image>\nQ?\nOutput: A.</s>\n",
    "vicuna": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions. USER: <image>\nQ? ASSISTANT: A.</s>",
    "pretrain": "<image>A.</s>",
}
GEN_PROMPT = {"qwen2.5": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
              "phi3": "<|assistant|>\n", "phi2": "Output:", "vicuna": "ASSISTANT:", "pretrain": ""}


@pytest.mark.parametrize("family", FAMILIES)
def test_renderings_match_the_real_formats(family):
    fmt_name, template, _, _ = FAMILIES[family]
    tok = tokenizer(fmt_name)
    fmt = ChatFormat(tok, template)
    msgs = [{"role": "user", "content": "<image>\nQ?"}, {"role": "assistant", "content": "A."}]
    assert fmt.render(msgs) == LITERAL[family].format(eos=tok.eos_token)
    prompt = fmt.render(msgs[:1], add_generation_prompt=True)
    assert prompt.endswith(GEN_PROMPT[family])
    assert LITERAL[family].startswith(prompt)


@pytest.mark.parametrize("family", FAMILIES)
def test_render_prompt_is_the_training_prefix_with_images_expanded(family):
    fmt_name, template, _, _ = FAMILIES[family]
    tok = tokenizer(fmt_name)
    rec = parse_record(RECORDS["placeholder_at_end"], "x")  # an eval record: its gpt answer is left out
    ids = render_prompt(rec, tok, template=template, num_image_tokens=5)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == 5
    train_ids, labels = ChatFormat(tok, template).encode(rec)
    first_label = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    expanded, _, _ = expand_media(train_ids[:first_label], None, {image_id: 5})
    assert ids == expanded  # inference sees exactly the ids training conditioned on
    inference = parse_record({"id": "q", "image": ["a.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhich organ is shown?"}]}, "x")
    jinja = TEMPLATE.get(template).jinja if template else None
    plain = tok.apply_chat_template(inference.messages(), chat_template=jinja, add_generation_prompt=True)
    assert render_prompt(inference, tok, template=template, num_image_tokens=1) == plain["input_ids"]


def test_expand_media_truncation_never_splits_an_image():
    IMG = 99
    ids, labels = [1, IMG, 2, IMG, 3], [-100, -100, 2, -100, 3]
    full, lab, kept = expand_media(ids, labels, {IMG: 4})
    assert full == [1] + [IMG] * 4 + [2] + [IMG] * 4 + [3] and kept == {IMG: 2}
    assert lab == [-100] * 5 + [2] + [-100] * 4 + [3]
    for max_length, length, n_kept in [(11, 11, 2), (10, 10, 2), (9, 6, 1), (7, 6, 1), (6, 6, 1), (5, 5, 1),
                                       (4, 1, 0)]:
        cut, cut_labels, kept = expand_media(ids, labels, {IMG: 4}, max_length)
        assert len(cut) == length and kept[IMG] == n_kept, max_length
        assert cut.count(IMG) == 4 * n_kept  # whole runs only
        assert cut == full[:length] and cut_labels == lab[:length]
    with pytest.raises(TemplateError, match="expands to 0"):
        expand_media(ids, None, {IMG: 0})


def _expand_one_by_one(ids, labels, sizes, max_length=None):
    """expand_media's definition, one id at a time."""
    out, out_labels, kept = [], [] if labels is not None else None, dict.fromkeys(sizes, 0)
    for i, tok in enumerate(ids):
        n = sizes.get(tok, 1)
        if n < 1:
            raise TemplateError(f"media token id {tok} expands to {n} ids")
        if max_length is not None and len(out) + n > max_length:
            break
        out += [tok] * n
        if out_labels is not None:
            out_labels += [IGNORE_INDEX] * n if tok in sizes else [labels[i]]
        kept[tok] = kept.get(tok, 0) + (tok in sizes)
    return out, out_labels, {k: v for k, v in kept.items() if k in sizes}


@pytest.mark.parametrize("as_array", [False, True])
def test_expand_media_equals_its_one_id_at_a_time_definition(as_array):
    from array import array

    IMG, VOL, OFF = 99, 98, 97  # OFF: a placeholder of an encoder the model lacks (expands to 0 ids)
    cases = [[], [1, 2, 3], [IMG], [1, IMG, 2, VOL, 3, IMG, 4, 5], [IMG, IMG, 7, VOL], [1, 2, 3, 4, 5, 6, VOL, OFF],
             [VOL, 1, OFF]]
    for ids in cases:
        labels = [i if i < 10 and i % 2 else IGNORE_INDEX for i in ids]
        seq, lab = (array("l", ids), array("l", labels)) if as_array else (ids, labels)
        for max_length in [None, 0, 1, 2, 3, 4, 5, 6, 8, 9, 12, 100]:
            for with_labels in (True, False):
                want = got = None
                try:
                    want = _expand_one_by_one(ids, labels if with_labels else None, {IMG: 3, VOL: 2, OFF: 0},
                                              max_length)
                except TemplateError:
                    with pytest.raises(TemplateError, match="expands to 0"):
                        expand_media(seq, lab if with_labels else None, {IMG: 3, VOL: 2, OFF: 0}, max_length)
                    continue
                got = expand_media(seq, lab if with_labels else None, {IMG: 3, VOL: 2, OFF: 0}, max_length)
                assert got == want and type(got[0]) is list, (ids, max_length)


def _conversation():
    return [{"role": "system", "content": "You are a radiologist."},
            {"role": "user", "content": "<image>\nIs there a lesion? <|im_end|>"},  # control-token text stays text
            {"role": "assistant", "content": " Yes. There is one lesion."},
            {"role": "user", "content": "Where is the lesion?"},
            {"role": "assistant", "content": "upper left\n"}]


@pytest.mark.parametrize("case", [("chatml", None), ("llama3", None), ("phi3", None)]
                         + [("none", name) for name in TEMPLATE.names()])
def test_render_is_apply_chat_template(case):
    fmt_name, template = case
    tok = tokenizer(fmt_name)
    fmt = ChatFormat(tok, template, system_prompt="Be brief.")
    msgs = _conversation()
    for k in range(1, len(msgs) + 1):
        for generation in (False, True):
            want = tok.apply_chat_template(msgs[:k], chat_template=fmt.jinja, tokenize=False,
                                           add_generation_prompt=generation)
            assert fmt.render(msgs[:k], add_generation_prompt=generation) == want


def test_tokenize_batch_is_the_tokenizer_call():
    texts = ["<|im_start|>user\n<image>\nIs there a lesion?<|im_end|>\n", "  é 肺 <|im_end|><|im_start|>x\n\n", ""]
    tok = tiny_tokenizer("chatml")
    add_media_tokens(tok)
    typed = ChatFormat(tok).typed

    def wrapper():
        out = []
        for t in texts:
            enc = tok(t, add_special_tokens=False, return_offsets_mapping=True)
            out.append((t, enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]))
        return out

    def batch():  # offsets read one by one, as labelling reads them
        return [(t, list(ids), [offsets[i] for i in range(len(offsets))]) for t, ids, offsets in
                typed.tokenize_batch(texts)]

    assert batch() == wrapper()
    tok.split_special_tokens = True  # the wrapper splits special tokens as text then
    assert batch() == wrapper()
    tok.split_special_tokens = False
    tok.backend_tokenizer.enable_truncation(3)  # left on the Rust tokenizer: the wrapper switches it off
    full = batch()
    assert full == wrapper() and len(full[0][1]) > 3
    offsets = typed.tokenize_batch(texts[:1])[0][2]
    assert offsets[-1] == full[0][2][-1]
    with pytest.raises(IndexError):
        offsets[len(full[0][1])]


def test_tokenizer_without_template_needs_a_registered_one():
    with pytest.raises(TemplateError, match="no chat template.*phi2.*pretrain.*vicuna"):
        ChatFormat(tokenizer("none"))


def _bad_format(jinja: str) -> ChatFormat:
    tok = tiny_tokenizer("chatml")
    add_media_tokens(tok)
    tok.chat_template = jinja
    return ChatFormat(tok)


_USER = "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
BAD_TEMPLATES = {
    # The generation prompt announces "assistant" but assistant turns are written as "bot".
    "prompt_not_prefix": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{{ '<|im_start|>bot\\n' + m.content + '<|im_end|>\\n' }}"
        "{% else %}" + _USER + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "not a prefix of the full rendering"),
    # A header that depends on the whole conversation.
    "depends_on_length": (
        "{{ messages | length }} turns\n{% for m in messages %}" + _USER + "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "not a prefix of the full rendering"),
    # No special token ends an assistant turn.
    "no_end_token": (
        "{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}",
        "no end-of-turn special token"),
    # The answer is rewritten by the template.
    "content_rewritten": (
        "{% for m in messages %}{% if m.role == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' + m.content | upper + '<|im_end|>\\n' }}{% else %}" + _USER + "{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "renders as 'NO.'"),
    # The generation prompt ends with a space that BPE merges into the answer's first word.
    "bpe_merge_across_boundary": (
        "{% for m in messages %}{% if m.role == 'assistant' %}"
        "{{ '<|im_start|>assistant\\nAnswer: ' + m.content + '<|im_end|>\\n' }}{% else %}" + _USER + "{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\nAnswer: ' }}{% endif %}",
        "merges text across the prompt / answer boundary"),
    # User turns are dropped, and their image placeholders with them.
    "drops_images": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content + '<|im_end|>' }}{% endif %}{% endfor %}",
        "holds 0 <image> token"),
}


@pytest.mark.parametrize("name", BAD_TEMPLATES)
def test_inconsistent_templates_raise_naming_the_record(name):
    jinja, message = BAD_TEMPLATES[name]
    raw = RECORDS["placeholder_missing"] if name == "drops_images" else RECORDS["text_only"]
    rec = parse_record({**raw, "id": "case-42"}, "x")
    with pytest.raises(TemplateError, match=message) as e:
        _bad_format(jinja).encode(rec)
    assert "'case-42'" in str(e.value)


@pytest.mark.parametrize("name", ["bpe_merge_across_boundary", None])
def test_prompt_cache_and_pickling_change_no_ids_or_errors(name):
    """Prompts are cached by their messages: a record whose prompt comes from the cache encodes (or fails) exactly as
    with a fresh format, and so does a format sent to a worker (pickled)."""
    import pickle

    fmt = _bad_format(BAD_TEMPLATES[name][0]) if name else ChatFormat(tokenizer("chatml"))
    question = {"role": "user", "content": "<image>\nIs there a lesion?"}
    convs = [[question, {"role": "assistant", "content": a}] for a in ("\nYes.", "No.", "\nNo.", "\nYes.")]
    convs.append([question, {"role": "assistant", "content": "\nYes."}, {"role": "user", "content": "Where?"},
                  {"role": "assistant", "content": "\nupper left"}])

    def run(f, conversations=None):
        out = []
        for conv in conversations or convs:
            try:
                out.append(f.encode(conv, record_id="rec"))
            except TemplateError as e:
                out.append(str(e))
        return out

    first = run(fmt)
    assert fmt._prompts  # the shared question's prompt is cached
    assert any(isinstance(r, str) for r in first) == (name is not None)
    assert run(fmt) == first
    assert run(pickle.loads(pickle.dumps(fmt))) == first
    for conv, want in zip(convs, first):  # each with an empty cache
        fresh = _bad_format(BAD_TEMPLATES[name][0]) if name else ChatFormat(tokenizer("chatml"))
        assert run(fresh, [conv]) == [want]


def test_media_token_missing_from_tokenizer_is_named():
    tok = tiny_tokenizer("chatml")  # no add_media_tokens
    rec = parse_record(RECORDS["placeholder_at_end"], "x")
    with pytest.raises(TemplateError, match="no <image> token.*add_media_tokens"):
        ChatFormat(tok).encode(rec)
