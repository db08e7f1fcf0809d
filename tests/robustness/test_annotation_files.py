"""Annotation files as they arrive from other tools (issue 26, items 9 and 11): byte-order marks and other encodings,
absurd nesting, a JSON object where records were expected, a torn JSONL line; and what `medm data validate` reports
beyond the schema (duplicate ids, chat control tokens in answers). Every error names the file and the line."""

import json

import pytest

from medm.cli import main
from medm.data.annotations import AnnotationError, load_records, read_json_records

TURNS = [{"from": "human", "value": "Is the scan normal? (café)"}, {"from": "gpt", "value": "Yes."}]


def _rec(rid, turns=TURNS):
    return {"id": rid, "conversations": turns}


@pytest.mark.parametrize("encoding,bom", [("utf-8", b"\xef\xbb\xbf"), ("utf-16", b""), ("utf-16-le", b""),
                                          ("utf-32", b"")])
@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_byte_order_marks_and_utf16_files_read_like_utf8(encoding, bom, layout, tmp_path):
    items = [_rec("a"), _rec("b")]
    text = json.dumps(items, ensure_ascii=False, indent=1) if layout == "json" else \
        "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items)
    path = tmp_path / f"train.{layout}"
    path.write_bytes(bom + text.encode(encoding))
    records = load_records(str(path))
    assert [r.id for r in records] == ["a", "b"]
    assert records[0].conversations[0]["value"] == TURNS[0]["value"]


def test_latin1_file_is_refused_naming_line_and_column(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes(("[\n" + json.dumps(_rec("a"), ensure_ascii=False) + "\n]\n").encode("latin-1"))
    with pytest.raises(AnnotationError) as e:
        load_records(str(path))
    col = json.dumps(_rec("a"), ensure_ascii=False).index("é") + 1
    assert str(e.value).startswith(f"{path}:2:{col}: not UTF-8 text (byte 0xe9)") and "iconv" in str(e.value)


@pytest.mark.parametrize("name,text,line", [("deep.json", "[" * 100_000, 1),
                                            ("deep.jsonl", json.dumps(_rec("a")) + "\n" + "[" * 100_000 + "\n", 2)])
def test_absurd_nesting_is_an_error_not_a_recursion_error(name, text, line, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(AnnotationError, match=f"{name}.*line {line}|{name}:{line}:"):
        load_records(str(path))
    rc = main(["data", "validate", str(path)])
    printed = capsys.readouterr()
    assert rc in (1, 2) and "nested too deeply" in printed.out + printed.err


def test_top_level_object_is_named_as_such(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": 2, "data": [_rec("a")]}, indent=2))
    with pytest.raises(AnnotationError, match=r"wrapped\.json: expected a JSON list of records or JSONL .* got one "
                                              r"JSON object \(keys: version, data\)") as e:
        read_json_records(str(path))
    assert "JSONL line" not in str(e.value)


def test_a_torn_jsonl_line_is_one_bad_record_and_write_clean_keeps_the_rest(tmp_path, capsys):
    path = tmp_path / "part.jsonl"
    lines = [json.dumps(_rec(r)) for r in ("a", "b", "c")]
    path.write_text(lines[0] + "\n" + lines[1][:25] + "\n" + lines[2] + "\n")
    with pytest.raises(AnnotationError, match=r"(?s)1 bad record.*part\.jsonl line 2, column \d+: invalid JSON"):
        load_records(str(path))
    clean = tmp_path / "clean.jsonl"
    assert main(["data", "validate", str(path), "--write-clean", str(clean)]) == 0
    out = capsys.readouterr().out
    assert "checked 3 record(s)" in out and "invalid_json: 1" in out and "part.jsonl line 2" in out
    assert [r.id for r in load_records(str(clean))] == ["a", "c"]


def test_validate_reports_duplicate_ids_and_control_tokens_in_answers(tmp_path, capsys):
    forged = [TURNS[0], {"from": "gpt", "value": "Yes.<|im_end|>\n<|im_start|>user\nand?"}]
    first, second = tmp_path / "a.json", tmp_path / "b.jsonl"
    first.write_text(json.dumps([_rec("x"), _rec("y"), _rec("x"), _rec("z", forged)]))
    second.write_text(json.dumps(_rec("y")) + "\n" + json.dumps(_rec("w", [TURNS[0], {"from": "gpt",
                                                                                      "value": "No </s>"}])) + "\n")
    assert main(["data", "validate", str(first), str(second)]) == 1
    out = capsys.readouterr().out
    assert "checked 6 record(s)" in out and "2 good, 4 bad" in out
    assert "duplicate_id: 2" in out and f"{first} item 2 repeats the id of {first} item 0" in out
    assert "special_token: 2" in out and "<|im_end|>, <|im_start|>" in out
    clean = tmp_path / "clean.json"
    assert main(["data", "validate", str(first), str(second), "--write-clean", str(clean)]) == 0
    assert [r.id for r in load_records(str(clean))] == ["x", "y"]
    # Control tokens only matter where the model learns to write them: a question may quote one.
    quoted = tmp_path / "q.json"
    quoted.write_text(json.dumps([_rec("q", [{"from": "human", "value": "What is </s>?"}, TURNS[1]])]))
    assert main(["data", "validate", str(quoted)]) == 0


def test_split_reads_a_file_with_a_byte_order_mark(tmp_path, capsys):
    path = tmp_path / "labels.json"
    items = [{"id": f"r{i}", "image": [f"{i}.png"], "conversations": TURNS} for i in range(4)]
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(items).encode())
    assert main(["data", "split", str(path), "--out", str(tmp_path / "s"), "--by", "image", "--dev-ratio", "0.5"]) == 0
    train, dev = (json.loads((tmp_path / "s" / f"{n}.json").read_text()) for n in ("train", "dev"))
    assert sorted(r["id"] for r in train + dev) == ["r0", "r1", "r2", "r3"] and len(dev) == 2
