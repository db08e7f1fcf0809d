"""The one JSON-list reader (medm.data.jsonlist) serves annotations, builders and benchmark tasks alike: every
caller gets the UTF-16 / BOM handling, the nesting limit and errors naming file, line and column, raised as its own
exception class."""

import json

import pytest

from medm.data.annotations import AnnotationError, read_json_records
from medm.data.builders._common import SourceError, read_json_list
from medm.data.builders.medxpertqa import read_jsonl
from medm.data.jsonlist import InvalidLine
from medm.data.jsonlist import read_json_list as shared_read
from medm.eval.tasks._base import TaskError, read_source_rows

ROWS = [{"qid": 1, "question": "é?"}, {"qid": 2, "question": "ok"}]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_every_list_reader_reads_bom_and_utf16(tmp_path, encoding):
    path = tmp_path / "rows.json"
    path.write_bytes(json.dumps(ROWS, ensure_ascii=False).encode(encoding))
    assert read_source_rows(str(path), "SLAKE") == ROWS
    assert read_json_list(str(path), "SLAKE split file") == ROWS
    assert read_json_records(str(path)) == ROWS


@pytest.mark.parametrize(("reader", "error"), [
    (lambda p: read_source_rows(p, "VQA-RAD"), TaskError),
    (lambda p: read_json_list(p, "PathVQA split file"), SourceError),
    (read_json_records, AnnotationError),
])
def test_errors_name_line_and_column_in_the_callers_class(tmp_path, reader, error):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"qid": 1},\n {"qid" 2}\n]')
    with pytest.raises(error, match=r"bad\.json:3:9: invalid JSON"):
        reader(str(path))
    path.write_text("[" * 100_000)
    with pytest.raises(error, match="nested too deeply"):
        reader(str(path))
    path.write_text('{\n "qid": 1\n}')  # over several lines: not JSONL either
    with pytest.raises(error, match="expected a JSON list"):
        reader(str(path))


def test_jsonl_torn_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"\n{"id": "c"}\n')
    with pytest.raises(SourceError, match=r"q\.jsonl:2:11: invalid JSON \(JSONL line\)"):
        read_jsonl(str(path))
    items = shared_read(str(path), keep_torn=True)
    assert items[0] == {"id": "a"} and items[2] == {"id": "c"}
    assert isinstance(items[1], InvalidLine) and items[1].lineno == 2


def test_missing_file_raises_the_callers_class(tmp_path):
    with pytest.raises(FileNotFoundError, match="SLAKE file not found"):
        read_source_rows(str(tmp_path / "nope.json"), "SLAKE")
    with pytest.raises(AnnotationError, match="annotation file not found"):
        read_json_records(str(tmp_path / "nope.json"))
