"""medm.data.annotations: MedM-VL / LLaVA and ShareGPT records load, normalise and round-trip; bad input is named."""

from __future__ import annotations

import json
import re

import pytest

from medm.data.annotations import (
    IMAGE3D_TOKEN,
    IMAGE_TOKEN,
    AnnotationError,
    Record,
    RecordError,
    load_records,
    parse_record,
    read_json_records,
    resolve_path,
    write_records,
)

# Records in the layout of MedM-VL's published examples (docs/example_2d_*.json, examples/data/*_3d.json).
PRETRAIN_2D = [
    {"id": "000021315", "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": "a chest radiograph with clear lungs"}], "image": ["00002/000021315.jpg"]},
    {"id": "004511940", "conversations": [
        {"from": "human", "value": "<image>\nProvide a brief description of the given image."},
        {"from": "gpt", "value": "axial CT of the abdomen"}], "image": ["00451/004511940.jpg"]},
]
FINETUNE_2D = [
    {"id": "30921228_F2", "image": ["/hdd/datasets/PMC-15M/images/30921228_F2.jpg"],
     "domain": {"chest_xray": False, "mri": False, "ct_scan": False, "histology": False, "gross": True},
     "conversations": [
         {"from": "human", "value": "What is the color of the tumor?\n<image>"},
         {"from": "gpt", "value": "The tumor appears to be whitish in color."},
         {"from": "human", "value": "How big is the tumor?"},
         {"from": "gpt", "value": "The tumor is approximately 1.8 cm in size."}],
     "task": "instruct", "data_source": "llavamed"},
]
FINETUNE_3D = [
    {"id": "long_answer_0", "conversations": [
        {"from": "human", "value": "<image3d>\nAre the main bronchi open?"},
        {"from": "gpt", "value": "Yes, the trachea and both main bronchi are open."}],
     "image3d": ["train_1/train_1_a/train_1_a_1.npy"]},
]
INFERENCE_3D = [
    {"id": "multiple_choice_0_0", "conversations": [
        {"from": "human", "value": "<image3d>\n Which of the following findings are present? (a) Normal (b) Nodules"}],
     "image3d": ["valid_1/valid_1_a/valid_1_a_1.npy"], "answer": "(b) Nodules"},
]


def write(tmp_path, name, items, jsonl=False):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(x) for x in items) if jsonl else json.dumps(items, indent=4))
    return str(path)


@pytest.mark.parametrize("items", [PRETRAIN_2D, FINETUNE_2D, FINETUNE_3D, INFERENCE_3D],
                         ids=["pretrain_2d", "finetune_2d", "finetune_3d", "inference_3d"])
@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_medmvl_example_layouts_load_unchanged(tmp_path, items, jsonl):
    records = load_records(write(tmp_path, "a.jsonl" if jsonl else "a.json", items, jsonl))
    assert [r.id for r in records] == [x["id"] for x in items]
    for rec, raw in zip(records, items):
        # Nothing is rewritten: placeholders were explicit, so the LLaVA dict is the input, key order aside.
        assert rec.to_llava() == raw
        assert rec.image == raw.get("image", []) and rec.image3d == raw.get("image3d", [])
    assert records[0].is_inference == (items is INFERENCE_3D)


def test_extra_keys_and_answer_are_kept():
    rec = parse_record(FINETUNE_2D[0], "x")
    assert rec.extra == {"domain": FINETUNE_2D[0]["domain"], "task": "instruct", "data_source": "llavamed"}
    inf = parse_record(INFERENCE_3D[0], "x")
    assert inf.answer == "(b) Nodules" and inf.conversations[0]["value"].startswith("<image3d>\n Which")


def test_absolute_and_relative_paths_resolve_against_image_dir():
    assert resolve_path("/abs/x.png", "/data") == "/abs/x.png"
    assert resolve_path("sub/x.png", "/data") == "/data/sub/x.png"
    assert resolve_path("sub/x.png", None) == "sub/x.png"


def test_placeholder_anywhere_and_counts():
    end = parse_record({"id": "e", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "Compare <image> with\n<image>"}, {"from": "gpt", "value": "same"}]}, "x")
    assert end.conversations[0]["value"] == "Compare <image> with\n<image>"
    none = parse_record({"id": "t", "conversations": [{"from": "human", "value": "Q"},
                                                      {"from": "gpt", "value": "A"}]}, "x")
    assert none.image == [] and none.image3d == []


def test_single_image_without_placeholder_goes_first_llava_rule():
    rec = parse_record({"id": "m", "image": "x.png", "conversations": [
        {"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "A lung."},
        {"from": "human", "value": "Left or right?"}, {"from": "gpt", "value": "Left."}]}, "x")
    assert rec.image == ["x.png"]  # a string is a list of one
    assert rec.conversations[0]["value"] == "<image>\nWhat is shown?"
    assert rec.conversations[2]["value"] == "Left or right?"
    vol = parse_record({"id": "v", "image3d": ["ct.npy"], "conversations": [
        {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Normal."}]}, "x")
    assert vol.conversations[0]["value"] == "<image3d>\nDescribe."


@pytest.mark.parametrize("raw, found", [
    ({"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image> Q"},
                                                     {"from": "gpt", "value": "A"}]}, "2 file(s) in `image` but 1"),
    ({"image": [], "conversations": [{"from": "human", "value": "<image> Q"},
                                     {"from": "gpt", "value": "A"}]}, "0 file(s) in `image` but 1"),
    ({"image3d": ["a", "b"], "conversations": [{"from": "human", "value": "Q"},
                                               {"from": "gpt", "value": "A"}]}, "2 file(s) in `image3d` but 0"),
    ({"image": ["a.png"], "conversations": [{"from": "human", "value": "<image> Q"},
                                            {"from": "gpt", "value": "see <image>"}]}, "only appear in human turns"),
])
def test_placeholder_mismatch_names_record_and_counts(raw, found):
    with pytest.raises(RecordError, match=re.escape(found)) as e:
        parse_record({"id": "bad-7", **raw}, "x")
    assert e.value.kind == "placeholder_mismatch" and e.value.record_id == "bad-7" and "bad-7" in str(e.value)


@pytest.mark.parametrize("raw, kind", [
    ({"conversations": []}, "empty_conversation"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "  "}]}, "empty_conversation"),
    ({"conversations": [{"from": "gpt", "value": "A"}]}, "bad_turn_order"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"}]}, "bad_turn_order"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
                        {"from": "human", "value": "Q2"}]}, "ends_on_human"),
    ({"conversations": [{"from": "robot", "value": "Q"}]}, "schema"),
    ({"conversations": "Q"}, "schema"),
    ({"image": [3], "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "schema"),
    ({"question": "Q"}, "schema"),
])
def test_bad_records_raise_with_kind(raw, kind):
    with pytest.raises(RecordError) as e:
        parse_record({"id": "r1", **raw}, "x", for_training=True)
    assert e.value.kind == kind and "'r1'" in str(e.value)


def test_inference_records_are_accepted_unless_training():
    raw = INFERENCE_3D[0]
    assert parse_record(raw, "x").is_inference
    with pytest.raises(RecordError, match="ends on a human turn"):
        parse_record(raw, "x", for_training=True)


def test_system_turn_and_messages():
    rec = parse_record({"id": "s", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "x")
    assert rec.messages("other") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
                                     {"role": "assistant", "content": "A"}]
    plain = parse_record({"id": "p", "conversations": [{"from": "human", "value": "Q"}]}, "x")
    assert plain.messages("Sys")[0] == {"role": "system", "content": "Sys"}
    assert plain.messages() == [{"role": "user", "content": "Q"}]


def test_missing_ids_are_generated_from_file_and_index(tmp_path):
    items = [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}] * 2
    ids = [r.id for r in load_records(write(tmp_path, "vqa.json", items))]
    assert ids == ["vqa.json:0", "vqa.json:1"]
    assert [r.id for r in load_records(str(tmp_path / "vqa.json"))] == ids  # stable


def test_malformed_json_list_names_file_line_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b" "conversations": []}\n]\n')
    with pytest.raises(AnnotationError, match=r"bad\.json:3:14: invalid JSON"):
        read_json_records(str(path))


def test_malformed_jsonl_names_file_line_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a"}\n\n{"id": "b",, "x": 1}\n')
    with pytest.raises(AnnotationError, match=r"bad\.jsonl:3:12: invalid JSON"):
        read_json_records(str(path))


def test_load_records_lists_every_bad_record(tmp_path):
    good = FINETUNE_2D[0]
    items = [good, {"id": "x1", "conversations": []}, good, {"id": "x2", "image": ["a", "b"], "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A"}]}]
    with pytest.raises(AnnotationError, match="2 bad record") as e:
        load_records(write(tmp_path, "mix.json", items))
    assert "'x1'" in str(e.value) and "'x2'" in str(e.value) and "medm data validate" in str(e.value)


SHAREGPT = [
    {"messages": [{"role": "user", "content": "<image>Who are they?"}, {"role": "assistant", "content": "Doctors."},
                  {"role": "user", "content": "What are they doing?<image>"},
                  {"role": "assistant", "content": "Reading a scan."}],
     "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/1b.jpg"]},
    {"messages": [{"role": "system", "content": "You are a radiologist."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}]},
]


def test_sharegpt_reads_like_llava():
    rec = parse_record(SHAREGPT[0], "demo.json:0")
    assert rec.id == "demo.json:0" and rec.image == ["mllm_demo_data/1.jpg", "mllm_demo_data/1b.jpg"]
    assert [t["from"] for t in rec.conversations] == ["human", "gpt", "human", "gpt"]
    in_messages = parse_record(SHAREGPT[1], "x")
    assert in_messages.conversations[0] == {"from": "system", "value": "You are a radiologist."}
    top_level = parse_record({"system": "Be brief.", **SHAREGPT[0]}, "x")  # LLaMA-Factory's `system` column
    assert top_level.conversations[0] == {"from": "system", "value": "Be brief."}
    assert top_level.to_sharegpt()["messages"][0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(RecordError, match="message 0"):
        parse_record({"messages": [{"role": "bot", "content": "x"}]}, "x")


def test_sharegpt_round_trip(tmp_path):
    records = [parse_record(x, f"s:{i}") for i, x in enumerate(SHAREGPT)] + [parse_record(x, "m") for x in
                                                                              FINETUNE_2D + INFERENCE_3D]
    sg = str(tmp_path / "sg.json")
    write_records(sg, records, layout="sharegpt")
    on_disk = json.loads(open(sg).read())
    assert on_disk[0]["messages"][0] == {"role": "user", "content": "<image>Who are they?"}
    assert on_disk[0]["images"] == SHAREGPT[0]["images"]
    assert "conversations" not in on_disk[2] and on_disk[2]["task"] == "instruct"
    back = load_records(sg)
    assert back == records
    llava = str(tmp_path / "back.jsonl")
    write_records(llava, back, layout="llava")
    assert load_records(llava) == records
    assert json.loads(open(llava).readline())["conversations"][0] == {"from": "human", "value": "<image>Who are they?"}


def test_placeholder_strings_match_the_tokens_the_builder_adds():
    from medm.models import builder

    assert (IMAGE_TOKEN, IMAGE3D_TOKEN) == (builder.IMAGE_TOKEN, builder.IMAGE3D_TOKEN)
    assert Record(id="a", conversations=[{"from": "human", "value": "q"}]).is_inference
