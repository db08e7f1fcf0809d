"""Chat formats: render conversations with the LLM's own chat template (or a registered one) and encode them into
input ids with exact assistant-only labels.

Rendering. With `template=None` the tokenizer's own `chat_template` renders (ChatML for Qwen2.5, Llama-3 headers,
Phi-3 tags), exactly as `tokenizer.apply_chat_template` does. Registered templates (`TEMPLATE` registry) cover
tokenizers without one: `phi2` ("Instruct: ...\\nOutput: ..."), `vicuna` (LLaVA v1: system, "USER: q ASSISTANT: a</s>")
and `pretrain` (the images' placeholders, the caption, EOS; human text dropped); `medm-vl` and `tinyllava` render
the prompts of checkpoints brought in by `medm import` byte for byte. They are jinja strings too, so every format goes
through the same code.

Labels (`ChatFormat.encode`). The full conversation is rendered once and tokenized once with offsets, with
`add_special_tokens=False` like `apply_chat_template(tokenize=True)`, so input ids equal the tokenizer's own
rendering. For assistant message k, the prompt `render(messages[:k], add_generation_prompt=True)` must be a prefix
of the full rendering; the answer starts right after it. Its end-of-turn token is the first special token after
that point (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, `</s>`, EOS). Supervised: the answer's tokens and that end-of-turn
token. Not supervised: everything else, including the "\\n" that ChatML and Phi-3 write after the end token (as in
LLaMA-Factory; generation stops at the end token) and Phi-3's final EOS. Checked, else `TemplateError` naming the
record: the prompt is a prefix of the full text; the prompt tokenized alone gives the first ids of the full
rendering and ends where the answer starts (a BPE merge across the boundary would make training ids differ from
the inference prompt's); the text between the boundary and the end token is the message content (up to
surrounding whitespace, which e.g. Llama-3 trims); the rendering holds one `<image>` / `<image3d>` id per image /
volume. No sample is ever masked silently.

Images. `<image>` and `<image3d>` are special tokens (`medm.models.builder.add_media_tokens`), so each stays one
isolated id through BPE; `expand_media` then repeats each into the connector's token count (labels -100) and can
truncate to `max_length` without cutting a run of image tokens: the cut moves before that image, and the images
after the cut are reported as dropped so their pixel values can be dropped too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from medm.data._template_strings import (
    _LLAVA_SYSTEM,
    _LLAVA_V1_SYSTEM,
    MEDM_VL,
    MISTRAL_INSTRUCT,
    PHI2,
    PRETRAIN,
    TINYLLAVA,
    VICUNA,
    _llava_two,
)
from medm.data._typed_text import TypedText
from medm.data.annotations import IMAGE3D_TOKEN, IMAGE_TOKEN, Record
from medm.registry import TEMPLATE

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """A conversation whose rendering cannot be split exactly into prompt and supervised answer tokens."""


@dataclass
class ChatTemplate:
    """A registered chat template: a jinja string rendered like a tokenizer's own `chat_template`.

    Args:
        jinja: the template; it sees `messages` (role / content), `add_generation_prompt`, `bos_token`, `eos_token`.
        description: one line for `medm list` readers and docs.
    """

    jinja: str
    description: str = ""


TEMPLATE.register("phi2")(ChatTemplate(PHI2, "Phi-2 QA format: 'Instruct: q\\nOutput: a<eos>'"))
TEMPLATE.register("medm-vl")(ChatTemplate(MEDM_VL, "MedM-VL: '{system} USER: q ASSISTANT: a<eos>USER: ...'"))
TEMPLATE.register("tinyllava")(ChatTemplate(TINYLLAVA, "TinyLLaVA_Factory: '{system} USER: <image>\\nq ASSISTANT: "
                                                       "a<eos>USER: ...' (image moved to the front)"))
TEMPLATE.register("vicuna")(ChatTemplate(VICUNA, "LLaVA v1 / Vicuna: '{system} USER: q ASSISTANT: a</s>'"))
TEMPLATE.register("llava_v1")(ChatTemplate(_llava_two(_LLAVA_V1_SYSTEM), "LLaVA conv llava_v1: '{system} USER: q "
                                                                       "ASSISTANT: a</s>USER: ...'"))
TEMPLATE.register("vicuna_v1")(ChatTemplate(_llava_two(_LLAVA_SYSTEM), "LLaVA conv vicuna_v1: as llava_v1, Vicuna's "
                                                                       "system text"))
TEMPLATE.register("mistral_instruct")(ChatTemplate(MISTRAL_INSTRUCT, "LLaVA / LLaVA-Med conv mistral_instruct: "
                                                                     "'[INST] q [/INST] a </s>[INST] ...'"))
TEMPLATE.register("pretrain")(ChatTemplate(PRETRAIN, "caption pretraining: '<image>caption<eos>', human text dropped"))


class ChatFormat:
    """How one tokenizer renders and encodes conversations; build once, use for every sample.

    Args:
        tokenizer: a fast tokenizer with `<image>` / `<image3d>` added (`medm.models.builder.add_media_tokens`).
        template: registered template name; None: the tokenizer's own `chat_template`.
        system_prompt: system turn for conversations that have none; None: the template's default.

    Message contents are text: a special token typed in one (`<|im_end|>`) is tokenized split, as transformers'
    `split_special_tokens` does, so it cannot end a turn (medm.data._typed_text). Only `content_tokens` stay tokens.
    """

    # Tokens a message's content may hold as tokens; any other special token written there is text.
    content_tokens: tuple[str, ...] = (IMAGE_TOKEN, IMAGE3D_TOKEN)

    def __init__(self, tokenizer, template: str | None = None, system_prompt: str | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError("exact label masks need a fast tokenizer (character offsets); got "
                                f"{type(tokenizer).__name__}")
        if template is not None:
            if template not in TEMPLATE:
                raise TemplateError(f"unknown chat template {template!r} (data.template or model.template; --template "
                                    f"in medm infer / chat / serve); known: {', '.join(TEMPLATE.names())}; or leave "
                                    "it unset to use the tokenizer's own chat template")
            self.jinja = TEMPLATE.get(template).jinja
        elif getattr(tokenizer, "chat_template", None):
            self.jinja = tokenizer.get_chat_template()
        else:
            raise TemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has "
                                f"no chat template; set a registered `template` ({', '.join(TEMPLATE.names())})")
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.typed = TypedText(tokenizer, self.content_tokens)
        # Candidates for an end-of-turn token: special tokens, and added tokens the template writes literally.
        added = tokenizer.added_tokens_decoder
        self.special_ids = set(tokenizer.all_special_ids) | {
            i for i, t in added.items() if t.special or t.content in self.jinja}
        self.image_id = self._token_id(IMAGE_TOKEN)
        self.image3d_id = self._token_id(IMAGE3D_TOKEN)

    # Per-process state, rebuilt on first use: the compiled template (not picklable) and the prompt cache.
    _CACHES = ("_direct", "_direct_jinja", "_prompts")

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader and `datasets` workers receive the format pickled.
        return {k: v for k, v in self.__dict__.items() if k not in self._CACHES}

    def _token_id(self, token: str) -> int | None:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        return tid if tid is not None and self.tokenizer.convert_ids_to_tokens(tid) == token else None

    def media_sizes(self, num_image_tokens: int, num_image3d_tokens: int = 0) -> dict[int, int]:
        """{token id: ids per placeholder} for `expand_media`."""
        sizes = {}
        if self.image_id is not None:
            sizes[self.image_id] = num_image_tokens
        if self.image3d_id is not None:
            sizes[self.image3d_id] = num_image3d_tokens
        return sizes

    @functools.cached_property
    def end_of_turn_id(self) -> int:
        """The id that closes an assistant turn (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, EOS): generation stops on it.

        Read from a probe conversation, so it holds even where the tokenizer's `eos_token` differs (Phi-3).
        """
        ids, labels = self.encode([{"role": "user", "content": "?"}, {"role": "assistant", "content": "ok"}],
                                  record_id="<end-of-turn probe>")
        return [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX][-1]

    # ---- rendering -----------------------------------------------------------------------------------------------
    def messages(self, conversation: Record | list[dict[str, str]]) -> list[dict[str, str]]:
        """`{"role", "content"}` messages, with the system prompt prepended where the conversation has none."""
        if isinstance(conversation, Record):
            return conversation.messages(self.system_prompt)
        msgs = [{"role": m["role"], "content": m["content"]} for m in conversation]
        if self.system_prompt is not None and msgs and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def _compiled(self) -> tuple[Any, dict[str, Any]]:
        if self.__dict__.get("_direct_jinja") is not self.jinja:  # a subclass may set `jinja` after __init__
            self._direct = _direct_rendering(self.tokenizer, self.jinja)
            self._direct_jinja = self.jinja
            self._prompts = None if "strftime_now" in self.jinja else {}
        return self._direct

    def _prompt_cache(self) -> dict[tuple, tuple[str, list[int]]] | None:
        """Prompts rendered and tokenized already, by their messages (caption sets repeat a few instructions);
        None for a template that renders more than its messages (today's date)."""
        self._compiled()
        return self._prompts

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """`tokenizer.apply_chat_template(messages, tokenize=False)` with this format's template."""
        compiled, variables = self._compiled()
        if compiled is not None and messages and all(
                len(m) == 2 and type(m.get("role")) is str and type(m.get("content")) is str for m in messages):
            # Plain text messages: what apply_chat_template renders, without its per-call copying and checks.
            return compiled.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
        return self.tokenizer.apply_chat_template(messages, chat_template=self.jinja, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ---- encoding ------------------------------------------------------------------------------------------------
    def encode(self, conversation: Record | list[dict[str, str]],
               record_id: str | None = None) -> tuple[list[int], list[int]]:
        """Training ids and labels, one id per `<image>` / `<image3d>` placeholder (expand with `expand_media`).

        Returns:
            (input_ids, labels), equal lengths; labels are -100 except on assistant tokens and their end token.

        Raises:
            TemplateError: naming the record when the rendering cannot be split exactly (see the module doc).
        """
        rid = record_id if record_id is not None else getattr(conversation, "id", "<messages>")
        msgs = self.messages(conversation)
        shown = self.typed.protect(msgs)  # special-token text in the contents stays text
        pieces = shown is not msgs
        full = self.render(shown)
        # Every assistant turn's prompt is rendered first, so that the full rendering and the prompts tokenize in
        # one call; a turn that cannot be rendered fails at its place in the turn order below, as it did one by one.
        turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
        prompts: list[str] = []
        known: list[list[int] | None] = []  # per prompt: its ids when the cache held it, else None
        keys: list[tuple | None] = []
        cache = self._prompt_cache() if not pieces and all(type(m["content"]) is str for m in msgs) else None
        failure: Exception | None = None
        for k in turns:
            try:
                if not any(m["role"] == "user" for m in msgs[:k]):
                    raise TemplateError(f"record {rid!r}: assistant turn {k} has no user turn before it")
                key = tuple((m["role"], m["content"]) for m in msgs[:k]) if cache is not None else None
                hit = cache.get(key) if key is not None else None
                prompts.append(hit[0] if hit else self.render(shown[:k], add_generation_prompt=True))
                known.append(hit[1] if hit else None)
                keys.append(key)
            except Exception as e:
                failure = e
                break
        if pieces:
            encoded = [self.typed.tokenize(r, pieces=True) for r in (full, *prompts)]
        else:
            done = iter(self.typed.tokenize_batch([full, *(p for p, i in zip(prompts, known) if i is None)]))
            encoded = [next(done)]
            for prompt, prompt_ids, key in zip(prompts, known, keys):
                if prompt_ids is not None:
                    encoded.append((prompt, prompt_ids, None))
                    continue
                encoded.append(next(done))
                if key is not None and len(prompt) <= 2048:
                    if len(cache) >= 256:
                        cache.clear()
                    cache[key] = (prompt, encoded[-1][1])
        text, ids, offsets = encoded[0]
        labels = [IGNORE_INDEX] * len(ids)
        for j, k in enumerate(turns):
            if j == len(prompts):
                raise failure
            prompt, prompt_ids, _ = encoded[j + 1]
            t0, t_end = self._answer_span(text, msgs[k]["content"], k, prompt, prompt_ids, ids, offsets, rid)
            labels[t0:t_end + 1] = ids[t0:t_end + 1]
        self._check_media(msgs, ids, rid)
        return ids, labels

    def _answer_span(self, text: str, content: str, k: int, prompt: str, prompt_ids: list[int], ids: list[int],
                     offsets: list[tuple[int, int]], rid: str) -> tuple[int, int]:
        """Token indices (first, end-of-turn) of assistant message k (`content`) in the full rendering `text`, given
        the rendering and ids of the prompt before it."""
        if not text.startswith(prompt):
            at = next((i for i, (a, b) in enumerate(zip(text, prompt)) if a != b), min(len(text), len(prompt)))
            raise TemplateError(
                f"record {rid!r}: the prompt before assistant turn {k} (messages[:{k}] with the generation prompt) is "
                f"not a prefix of the full rendering; they differ at character {at}: full {text[at:at + 40]!r} vs "
                f"prompt {prompt[at:at + 40]!r}. The template renders a turn differently depending on what follows.")
        begin = len(prompt)
        # The prompt alone must tokenize to the first ids of the full rendering, ending exactly at the answer:
        # otherwise BPE merged text across the boundary and training ids would differ from the inference prompt.
        t0 = len(prompt_ids)
        if ids[:t0] != prompt_ids or (t0 < len(ids) and offsets[t0][0] < begin):
            near = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(t0, len(ids) - 1))
            s, e = offsets[near]
            raise TemplateError(
                f"record {rid!r}: the prompt before assistant turn {k} tokenizes differently alone than inside the "
                f"conversation (token {text[s:e]!r} at characters {s}-{e}, answer starts at {begin}): the tokenizer "
                "merges text across the prompt / answer boundary. Strip leading whitespace from the answer or fix "
                "the template.")
        special = self.special_ids
        t = next((i for i in range(t0, len(ids)) if ids[i] in special), len(ids))
        if t == len(ids):
            raise TemplateError(f"record {rid!r}: no end-of-turn special token after assistant turn {k}")
        body = text[begin:offsets[t][0]]
        if body.strip() != content.strip():
            raise TemplateError(
                f"record {rid!r}: assistant turn {k} renders as {body!r} before its end token "
                f"{text[offsets[t][0]:offsets[t][1]]!r}, expected its content {content!r}")
        return t0, t

    def _check_media(self, msgs: list[dict[str, str]], ids: list[int], rid: str) -> None:
        for token, tid in ((IMAGE_TOKEN, self.image_id), (IMAGE3D_TOKEN, self.image3d_id)):
            want = sum(m["content"].count(token) for m in msgs if m["role"] == "user")
            if want and tid is None:
                raise TemplateError(f"record {rid!r}: the tokenizer has no {token} token; build it with "
                                    "medm.models.builder.add_media_tokens")
            got = ids.count(tid) if tid is not None else 0
            if got != want:
                raise TemplateError(f"record {rid!r}: the rendering holds {got} {token} token(s) for {want} "
                                    f"placeholder(s) in the user turns")

    def encode_prompt(self, conversation: Record | list[dict[str, str]]) -> list[int]:
        """Inference prompt ids up to and including the generation prompt, one id per placeholder.

        Trailing assistant turns (e.g. the reference answer of an evaluation record) are left out, so the prompt
        ends on the last user turn; images sit in user turns, so every image of the conversation stays.
        """
        msgs = self.messages(conversation)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if not any(m["role"] == "user" for m in msgs):
            rid = getattr(conversation, "id", "<messages>")
            raise TemplateError(f"record {rid!r}: no user turn to prompt with")
        _, ids, _ = self.typed.tokenize(self.render(self.typed.protect(msgs), add_generation_prompt=True))
        self._check_media(msgs, ids, getattr(conversation, "id", "<messages>"))
        return ids


def _direct_rendering(tokenizer, jinja: str) -> tuple[Any, dict[str, Any]]:
    """(compiled template, template variables) that `tokenizer.apply_chat_template` renders `jinja` with, or
    (None, {}) where the tokenizer renders its own way or transformers' template compiler is not where it was."""
    if type(tokenizer).apply_chat_template is not _base_apply_chat_template():
        return None, {}
    try:
        from transformers.utils.chat_template_utils import (  # defers transformers
            _compile_jinja_template,
            _plain_template_data,
        )
    except ImportError:
        return None, {}
    return (_compile_jinja_template(tokenizer.get_chat_template(jinja, None)),
            _plain_template_data(dict(tokenizer.special_tokens_map)))


def _base_apply_chat_template():
    from transformers import PreTrainedTokenizerBase  # defers transformers

    return PreTrainedTokenizerBase.apply_chat_template


def expand_media(ids: list[int], labels: list[int] | None, sizes: dict[int, int],
                 max_length: int | None = None) -> tuple[list[int], list[int] | None, dict[int, int]]:
    """Repeat each media placeholder id `sizes[id]` times (labels -100), keeping at most `max_length` ids.

    Truncation keeps a prefix and never cuts a placeholder's run: if an image's run would cross `max_length`,
    the cut moves before it, and that image and every later one are dropped.

    Returns:
        (ids, labels or None, kept) where `kept[id]` counts the placeholders of each media id that remain.

    Raises:
        TemplateError: a placeholder whose size is below 1 (e.g. images for a model without a 2D tower).
    """
    kept = dict.fromkeys(sizes, 0)
    # Text ids are copied a run at a time between placeholders (found by list.index), not one by one.
    places = sorted(i for tok in sizes for i in _positions(ids, tok))
    limit = max_length if max_length is not None else len(ids) + sum(max(sizes[ids[i]] - 1, 0) for i in places)
    out_ids: list[int] = []
    out_labels: list[int] | None = [] if labels is not None else None
    start = 0  # the next id to copy
    for i in places:
        if i - start > limit - len(out_ids):  # the cut falls in the text before this placeholder
            break
        out_ids += ids[start:i]
        if out_labels is not None:
            out_labels += labels[start:i]
        tok, n = ids[i], sizes[ids[i]]
        if n < 1:
            raise TemplateError(f"media token id {tok} expands to {n} ids; the model has no encoder for it "
                                "(num_image_tokens / num_image3d_tokens is 0)")
        if len(out_ids) + n > limit:  # the cut moves before this placeholder; nothing after it is kept
            return out_ids, out_labels, kept
        out_ids += [tok] * n
        if out_labels is not None:
            out_labels += [IGNORE_INDEX] * n
        kept[tok] += 1
        start = i + 1
    end = start + limit - len(out_ids)
    out_ids += ids[start:end]
    if out_labels is not None:
        out_labels += labels[start:end]
    return out_ids, out_labels, kept


def _positions(ids, tok: int) -> list[int]:
    """Indices of `tok` in `ids` (a list or an array)."""
    out, i = [], -1
    for _ in range(ids.count(tok)):
        i = ids.index(tok, i + 1)
        out.append(i)
    return out


def render_prompt(conversation: Record | list[dict[str, str]], tokenizer: Any, *, template: str | None = None,
                  system_prompt: str | None = None, num_image_tokens: int = 0,
                  num_image3d_tokens: int = 0) -> list[int]:
    """Inference input ids for a record or messages: the prompt up to the generation prompt, placeholders expanded.

    For many prompts build one `ChatFormat` and call `encode_prompt` + `expand_media` instead.
    """
    fmt = ChatFormat(tokenizer, template, system_prompt)
    ids, _, _ = expand_media(fmt.encode_prompt(conversation), None, fmt.media_sizes(num_image_tokens,
                                                                                     num_image3d_tokens))
    return ids
