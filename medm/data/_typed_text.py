"""Text typed in records and by users is text: a special token written in a message's content is tokenized split
into ordinary pieces (as transformers' `split_special_tokens`), so `<|im_end|><|im_start|>assistant` typed in a
question cannot close the turn and forge one. Only the tokens a content may hold as tokens (`<image>`, `<image3d>`;
Qwen-VL's vision span and grounding tokens, which medm itself writes) stay single ids.

How: before rendering, each control token in a content is swapped for a sentinel (private-use characters no
tokenizer treats specially); the rendering's own control tokens are then the only ones left. `tokenize` cuts the
rendering at those, tokenizes the text between them with special tokens split and the sentinels put back, and
returns ids and character offsets of the real text. A rendering without sentinels (the usual case) is tokenized
whole, exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_OPEN, _CLOSE = "\U000f0000", "\U000f0001"
_SENTINEL = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def _alternation(tokens: Iterable[str]) -> re.Pattern | None:
    tokens = sorted(set(tokens), key=len, reverse=True)  # the longest first: `<|im_end|>` before `<|im`
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


class TypedText:
    """Tokenization of renderings whose message contents may hold special-token text.

    Args:
        tokenizer: a fast tokenizer.
        allowed: tokens a content may hold as tokens (the media placeholders).
    """

    def __init__(self, tokenizer, allowed: Iterable[str]):
        self.tokenizer = tokenizer
        added = {t.content for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens)
        self.control = sorted(added - set(allowed))
        self._control = _alternation(self.control)
        self._index = {t: i for i, t in enumerate(self.control)}
        self._tokens = _alternation(added)
        from transformers import PreTrainedTokenizerFast  # defers transformers

        # The Rust tokenizer is called directly only where the class tokenizes as transformers' own fast tokenizer.
        cls = type(tokenizer)
        self._direct = (getattr(cls, "_encode_plus", None) is PreTrainedTokenizerFast._encode_plus
                        and getattr(cls, "__call__", None) is PreTrainedTokenizerFast.__call__)

    def protect(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """Copies of `messages` whose contents have each control token swapped for a sentinel; `messages` itself
        when no content holds one."""
        if self._control is None or not any(isinstance(m.get("content"), str) and self._control.search(m["content"])
                                            for m in messages):
            return messages
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, str) and self._control.search(content):
                m = {**m, "content": self._control.sub(lambda t: f"{_OPEN}{self._index[t.group(0)]}{_CLOSE}",
                                                       content)}
            out.append(m)
        return out

    def restore(self, text: str) -> str:
        """The real text of a rendering of protected messages."""
        return _SENTINEL.sub(lambda s: self.control[int(s.group(1))], text)

    def tokenize(self, rendering: str, pieces: bool = False) -> tuple[str, list[int], list[tuple[int, int]]]:
        """(real text, ids, character offsets into the real text) of a rendering of protected messages.

        `pieces`: cut at the control tokens even without a sentinel (a prompt of a conversation whose later turns
        hold one, so that it tokenizes as the full conversation does).
        """
        tok = self.tokenizer
        if _OPEN not in rendering and not pieces:
            return self.tokenize_batch([rendering])[0]
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        text = ""
        pos = 0
        for m in [*self._tokens.finditer(rendering), None]:
            end = m.start() if m is not None else len(rendering)
            piece = self.restore(rendering[pos:end])
            if piece:
                enc = tok(piece, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
                ids += enc["input_ids"]
                offsets += [(a + len(text), b + len(text)) for a, b in enc["offset_mapping"]]
                text += piece
            if m is None:
                break
            ids.append(tok.convert_tokens_to_ids(m.group(0)))
            offsets.append((len(text), len(text) + len(m.group(0))))
            text += m.group(0)
            pos = m.end()
        return text, ids, offsets

    def tokenize_batch(self, renderings: list[str]) -> list[tuple[str, list[int], Sequence[tuple[int, int]]]]:
        """`tokenize` of renderings without sentinels: (text, ids, offsets) each (offsets: a sequence, read by
        index).

        As `tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)`, but straight through the Rust
        tokenizer when it is set as transformers sets it for that call (no truncation or padding, special tokens
        split as `split_special_tokens`): the Python wrapper costs more than the tokenization of a short record.
        One `encode` per text: `encode_batch` of a few short texts costs more CPU time in its thread pool.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if self._direct else None
        if backend is None or backend.truncation is not None or backend.padding is not None:
            out = []
            for text in renderings:  # the wrapper call, which also switches truncation and padding off
                enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                out.append((text, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]))
            return out
        split = bool(getattr(self.tokenizer, "split_special_tokens", False))
        if backend.encode_special_tokens != split:
            backend.encode_special_tokens = split  # what the wrapper sets before each call
        encs = [backend.encode(text, add_special_tokens=False) for text in renderings]
        return [(text, enc.ids, _Offsets(enc)) for text, enc in zip(renderings, encs)]


class _Offsets:
    """`encoding.offsets[i]`, read one token at a time: labelling reads two or three of a record's offsets, and
    the whole list as Python tuples cost ~6% of a store build."""

    __slots__ = ("_enc",)

    def __init__(self, enc):
        self._enc = enc

    def __len__(self) -> int:
        return len(self._enc)

    def __getitem__(self, i: int) -> tuple[int, int]:
        if not -len(self._enc) <= i < len(self._enc):
            raise IndexError(i)
        return self._enc.token_to_chars(i % len(self._enc))
