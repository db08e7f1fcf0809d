"""Helpers of the benchmark builders (multiple choice, reports): one record per question with its images, options
rendered into the prompt by the benchmark's own rule (`medm.eval.choice`), and the split files + README."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from medm.data.annotations import IMAGE3D_TOKEN, IMAGE_TOKEN, write_json_records
from medm.data.builders._common import SourceError, image_dir_note, markdown_table, write_readme
from medm.eval.choice import get_rule


def with_media(text: str, n: int, volume: bool = False) -> str:
    """`text` after one `<image>` (or `<image3d>`) line per image, as LLaVA places them."""
    return "".join(
        f"{IMAGE3D_TOKEN if volume else IMAGE_TOKEN}\n" for _ in range(n)) + text


def option_letter(options: dict[str, str], answer_text: str, where: str) -> str:
    """The letter of the option whose text is `answer_text` (stripped, exact)."""
    hits = [k for k, v in options.items() if v.strip() == answer_text.strip()]
    if not hits:
        raise SourceError(f"{where}: the answer {answer_text!r} is none of the options {list(options.values())}")
    return hits[0]


def choice_record(rid: str, media: Sequence[str], question: str, options: dict[str, str], answer: str, rule: str,
                  source: str, split: str, fields: dict[str, Any] | None = None, volume: bool = False,
                  target: str = "letter") -> dict[str, Any]:
    """One multiple-choice record: the prompt is `rule`'s rendering of question + options after the media
    placeholders; the gpt turn is the answer letter (`target="letter"`) or the option text (`"text"`, when the
    benchmark's prompt asks for the text, as OmniMedVQA's does)."""
    prompt = get_rule(rule).render(question, options)
    record: dict[str, Any] = {"id": rid}
    if media:
        record["image3d" if volume else "image"] = list(media)
    record["conversations"] = [{"from": "human", "value": with_media(prompt, len(media), volume)},
                               {"from": "gpt", "value": answer if target == "letter" else options[answer]}]
    record.update({"answer": answer, "answer_text": options[answer], "options": options, "choice_rule": rule,
                   "question": question})
    record.update(fields or {})
    record.update({"data_source": source, "split": split})
    return record


def text_record(rid: str, media: Sequence[str], prompt: str, answer: str, source: str, split: str,
                fields: dict[str, Any] | None = None, volume: bool = False) -> dict[str, Any]:
    """One open-ended record (report, caption, open question): prompt after the placeholders, answer as gpt turn."""
    record: dict[str, Any] = {"id": rid}
    if media:
        record["image3d" if volume else "image"] = list(media)
    record["conversations"] = [{"from": "human", "value": with_media(prompt, len(media), volume)},
                               {"from": "gpt", "value": answer}]
    record.update({"answer": answer, "question": prompt, **(fields or {}), "data_source": source, "split": split})
    return record


def check_unique(records: Sequence[dict[str, Any]], where: str) -> None:
    counts = Counter(r["id"] for r in records)
    dup = [k for k, c in counts.items() if c > 1]
    if dup:
        raise SourceError(f"{where}: {len(dup)} id(s) repeat (e.g. {dup[0]!r}); ids must be unique")


def write_splits(out: str, splits: dict[str, list[dict[str, Any]]], title: str, command: str, image_dir: str,
                 by: str | None = None, notes: Sequence[str] = ()) -> dict[str, str]:
    """Write `out/<split>.json` for each split and a README (counts, images, a breakdown by field `by`)."""
    os.makedirs(out, exist_ok=True)
    paths = {}
    for split, records in splits.items():
        paths[split] = os.path.join(out, f"{split}.json")
        write_json_records(paths[split], records)
    rows = [(f"{s}.json", len(r), sum(len(x.get("image", x.get("image3d", []))) for x in r)) for s, r in splits.items()]
    lines = [f"# {title} (medm records)", "", f"Built by `{command}`.", "", image_dir_note(image_dir), ""]
    lines += markdown_table(("file", "records", "images"), rows)
    if by:
        counts = Counter(str(r.get(by)) for recs in splits.values() for r in recs)
        lines += ["", f"Records per `{by}`:", ""] + markdown_table((by, "records"), sorted(counts.items()))
    lines += ["", *notes]
    paths["readme"] = write_readme(os.path.join(out, "README.md"), lines)
    paths["image_dir"] = image_dir
    return paths
