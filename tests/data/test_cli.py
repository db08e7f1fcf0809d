"""`medm data validate | convert`: every bad record is found and counted by kind; clean output and exit codes."""

from __future__ import annotations

import json

from PIL import Image

from medm.cli import main


def _turns(q="<image>\nIs there a lesion?", a="Yes."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def mixed_file(tmp_path):
    Image.new("L", (16, 16), 80).save(tmp_path / "ok.png")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "ok2.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    items = [
        {"id": "good-1", "image": ["ok.png"], "conversations": _turns(), "task": "vqa"},
        {"id": "missing", "image": ["nowhere.png"], "conversations": _turns()},
        {"id": "corrupt", "image": ["broken.png"], "conversations": _turns()},
        {"id": "mismatch", "image": ["ok.png", "ok2.jpg"], "conversations": _turns()},
        {"id": "empty", "image": ["ok.png"], "conversations": []},
        {"id": "prompt-only", "image": [str(tmp_path / "ok.png")], "conversations": _turns()[:1]},
        {"id": "good-2", "image": [str(tmp_path / "ok2.jpg")], "conversations": _turns("Q?\n<image>", "No.")},
        {"id": "two-bad-files", "image": ["nowhere.png", "broken.png"],
         "conversations": _turns("<image><image> same?", "yes")},
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(items))
    return str(path), items


def test_validate_counts_every_kind_and_exits_nonzero(tmp_path, capsys):
    path, _ = mixed_file(tmp_path)
    rc = main(["data", "validate", path, "--image-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "checked 8 record(s)" in out and "2 good, 6 bad" in out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  ") and ":" in line}
    assert lines["missing_file"].split(":")[1].strip().startswith("2 ")
    assert "missing, two-bad-files" in lines["missing_file"]
    assert "corrupt, two-bad-files" in lines["corrupt_image"] and lines["corrupt_image"].split(":")[1].startswith(" 2 ")
    assert lines["placeholder_mismatch"].rstrip().endswith("mismatch")
    assert lines["empty_conversation"].rstrip().endswith("empty")
    assert lines["ends_on_human"].rstrip().endswith("prompt-only")
    assert "good-1" not in out.replace("checked", "")


def test_validate_write_clean_keeps_good_records_as_read(tmp_path, capsys):
    path, items = mixed_file(tmp_path)
    out_path = tmp_path / "clean" / "clean.json"
    assert main(["data", "validate", path, "--image-dir", str(tmp_path), "--write-clean", str(out_path)]) == 0
    assert json.loads(out_path.read_text()) == [items[0], items[6]]
    assert "wrote 2 good record(s)" in capsys.readouterr().out
    # The clean file validates.
    assert main(["data", "validate", str(out_path), "--image-dir", str(tmp_path)]) == 0


def test_validate_inference_mode_accepts_prompts(tmp_path, capsys):
    path, _ = mixed_file(tmp_path)
    jsonl = tmp_path / "clean.jsonl"
    assert main(["data", "validate", path, "--image-dir", str(tmp_path), "--inference", "--write-clean",
                 str(jsonl)]) == 0
    assert [json.loads(x)["id"] for x in jsonl.read_text().splitlines()] == ["good-1", "prompt-only", "good-2"]


def test_validate_bad_json_names_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "a", "conversations": []},\n{"id": "b", conversations: []}]\n')
    assert main(["data", "validate", str(path)]) == 2
    assert "broken.json:2:13: invalid JSON" in capsys.readouterr().err
    # A JSONL line is one record: a bad one is counted and named, and the other lines are still checked.
    path = tmp_path / "broken.jsonl"
    path.write_text('{"id": "a", "conversations": []}\n{"id": "b", conversations: []}\n')
    assert main(["data", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "broken.jsonl line 2, column 13: invalid JSON" in out and "empty_conversation: 1" in out


def test_convert_round_trip(tmp_path, capsys):
    src = tmp_path / "llava.json"
    src.write_text(json.dumps([
        {"id": "r1", "image": "x.png", "conversations": _turns("Where?", "upper left"), "organ": "lung"},
        {"id": "r2", "conversations": _turns("Hello?", "Hi.")}]))
    sg, back = tmp_path / "sg.json", tmp_path / "back.json"
    assert main(["data", "convert", "--to", "sharegpt", str(src), str(sg)]) == 0
    shared = json.loads(sg.read_text())
    assert shared[0] == {"id": "r1", "messages": [{"role": "user", "content": "<image>\nWhere?"},
                                                  {"role": "assistant", "content": "upper left"}],
                         "images": ["x.png"], "organ": "lung"}
    assert main(["data", "convert", "--to", "llava", str(sg), str(back)]) == 0
    assert json.loads(back.read_text())[0] == {"id": "r1", "image": ["x.png"], "conversations": _turns(
        "<image>\nWhere?", "upper left"), "organ": "lung"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "z", "conversations": []}]))
    assert main(["data", "convert", "--to", "sharegpt", str(bad), str(tmp_path / "o.json")]) == 2
    assert "'z'" in capsys.readouterr().err


def test_build_runs_a_registered_builder_and_its_output_validates(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["data", "build", "phantoms", "--out", str(out), "--n-train", "2", "--n-test", "1",
                 "--size", "16"]) == 0
    printed = capsys.readouterr().out
    assert f"train: {out}/train.json" in printed
    assert main(["data", "validate", str(out / "train.json"), str(out / "captions.json"), "--image-dir",
                 str(out)]) == 0
    assert main(["data", "build", "phantoms", "--out", str(out), "--sides", "3"]) == 2
    assert "unknown option '--sides'" in capsys.readouterr().err
    assert main(["data", "build", "phantoms", "--n-train", "2"]) == 2
    assert "needs --out" in capsys.readouterr().err
