"""Evaluation tasks: each benchmark's published layout (small fixtures shaped like the release files) becomes
records; predictions are checked, normalised, scored and grouped as the report needs."""

import json

import pytest
from PIL import Image

from medm.data.annotations import load_records
from medm.data.builders.pathvqa import build_pathvqa
from medm.data.builders.slake import build_slake
from medm.data.builders.vqa_rad import build_vqa_rad
from medm.eval.metrics import bleu_scores, rouge
from medm.eval.protocols import score
from medm.eval.report import group_rows
from medm.eval.tasks import Breakdown, TaskError
from medm.registry import TASK

# Rows shaped like VQA-RAD's split/testset.json, with its quirks: an integer answer, "CLOSED " and a
# multi-label question type.
VQA_RAD = [
    {"qid": 11, "image_name": "synpic1.jpg", "image_organ": "HEAD", "answer": "MRI", "answer_type": "CLOSED",
     "question_type": "MODALITY", "question": "Is this an MRI or a CT scan?", "phrase_type": "freeform"},
    {"qid": 12, "image_name": "synpic2.jpg", "image_organ": "ABD", "answer": 4, "answer_type": "OPEN",
     "question_type": "COUNT", "question": "How many gallstones are there?", "phrase_type": "para"},
    {"qid": 13, "image_name": "synpic2.jpg", "image_organ": "ABD", "answer": "Yes", "answer_type": "CLOSED ",
     "question_type": "PRES, POS", "question": "Is there free air on the left?", "phrase_type": "freeform"},
]
# Rows shaped like SLAKE 1.0's test.json (both languages).
SLAKE = [
    {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "Which organ is abnormal?", "answer": "Liver",
     "q_lang": "en", "location": "Abdomen", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa",
     "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": 11934},
    {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "Is this a CT image?", "answer": "Yes",
     "q_lang": "en", "location": "Abdomen", "modality": "CT", "answer_type": "CLOSED", "base_type": "vqa",
     "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": 11935},
    {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "这是CT图像吗?", "answer": "是", "q_lang": "zh",
     "location": "腹部", "modality": "CT", "answer_type": "CLOSED", "base_type": "vqa", "content_type": "Modality",
     "triple": ["vhead", "_", "_"], "qid": 12001},
]
# Rows of PathVQA's qas/test/test_qa.pkl, written as JSON.
PATHVQA = [
    {"image": "test_0262", "question": "Does this image show neutrophils?", "answer": "yes"},
    {"image": "test_0262", "question": "What have lost their nuclei?", "answer": "neutrophils"},
    {"image": "test_0263", "question": "Is the liver enlarged?", "answer": "No"},
]


def _write(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False))
    return str(path)


def test_every_task_is_registered_and_unknown_names_list_them():
    assert {"vqa", "vqa-rad", "slake", "pathvqa", "report", "grounding"} <= set(TASK.names())
    with pytest.raises(KeyError, match="unknown eval task 'coco'; known: ") as err:
        TASK.get("coco")
    assert set(err.value.args[0].split("known: ")[1].split(", ")) == set(TASK.names())
    assert {"pathvqa", "slake", "vqa-rad"} <= {n for n in TASK.names() if TASK.get(n).source_layout}


def test_vqa_rad_layout_gives_the_records_the_builder_writes(tmp_path):
    src = tmp_path / "vqa_rad"
    (src / "split").mkdir(parents=True)
    (src / "images").mkdir()
    for name in ("synpic1.jpg", "synpic2.jpg"):
        Image.new("RGB", (8, 8)).save(src / "images" / name)
    _write(src / "split" / "trainset.json", VQA_RAD[:1])
    path = _write(src / "split" / "testset.json", VQA_RAD)
    records = TASK.build("vqa-rad").load_records(path, layout="vqa-rad")
    built = load_records(build_vqa_rad(str(tmp_path / "built"), str(src))["test"])
    assert [r.to_llava() for r in records] == [r.to_llava() for r in built]
    rec = records[1]
    assert rec.id == "vqa-rad-test-12" and rec.answer == "4" and rec.image == ["synpic2.jpg"]
    assert rec.extra["answer_type"] == "OPEN" and records[2].extra["answer_type"] == "CLOSED"
    assert records[2].extra["question_type"] == "PRES, POS"
    # The same file as plain records is the builder's job, not this layout's: "records" reads medm files.
    with pytest.raises(ValueError, match="layout 'records' or 'vqa-rad', not 'slake'"):
        TASK.build("vqa-rad").load_records(path, layout="slake")
    _write(tmp_path / "dup.json", [VQA_RAD[0], VQA_RAD[0]])
    with pytest.raises(TaskError, match="qid 11: qid repeats"):
        TASK.build("vqa-rad").load_source(str(tmp_path / "dup.json"))


def test_slake_layout_gives_the_builders_english_records(tmp_path):
    src = tmp_path / "Slake1.0"
    (src / "imgs" / "xmlab102").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(src / "imgs" / "xmlab102" / "source.jpg")
    path = _write(src / "test.json", SLAKE)
    records = TASK.build("slake").load_records(path, layout="slake")
    built = load_records(build_slake(str(tmp_path / "built"), str(src), splits="test")["test"])
    assert [r.to_llava() for r in records] == [r.to_llava() for r in built]
    assert [r.id for r in records] == ["slake-test-11934", "slake-test-11935"]  # English, as papers report
    en = records[0]
    assert en.image == ["xmlab102/source.jpg"] and en.answer == "Liver"
    assert en.conversations[0] == {"from": "human", "value": "<image>\nWhich organ is abnormal?"}
    assert {k: en.extra[k] for k in ("answer_type", "q_lang", "content_type", "modality", "location", "img_id")} == \
        {"answer_type": "OPEN", "q_lang": "en", "content_type": "Organ", "modality": "CT", "location": "Abdomen",
         "img_id": 102}
    both = TASK.build("slake")
    both.lang = "all"
    assert [r.answer for r in both.load_source(path)] == ["Liver", "Yes", "是"]
    bad = [dict(SLAKE[0], answer_type="MAYBE")]
    with pytest.raises(ValueError, match="qid 11934: field 'answer_type' must be OPEN or CLOSED"):
        TASK.build("slake").load_source(_write(tmp_path / "bad.json", bad))
    with pytest.raises(FileNotFoundError, match="SLAKE file not found: .*nope.json"):
        TASK.build("slake").load_source(str(tmp_path / "nope.json"))


def test_pathvqa_layout_json_and_jsonl(tmp_path):
    src = tmp_path / "pvqa"
    (src / "images" / "test").mkdir(parents=True)
    for name in ("test_0262", "test_0263"):
        Image.new("RGB", (8, 8)).save(src / "images" / "test" / f"{name}.jpg")
    task = TASK.build("pathvqa")
    records = task.load_source(_write(src / "test.json", PATHVQA))
    built = load_records(build_pathvqa(str(tmp_path / "built"), str(src), splits="test")["test"])
    assert [r.to_llava() for r in records] == [r.to_llava() for r in built]
    assert [r.id for r in records] == ["pathvqa-test-0", "pathvqa-test-1", "pathvqa-test-2"]
    assert [r.extra["answer_type"] for r in records] == ["CLOSED", "OPEN", "CLOSED"]  # yes/no = closed
    assert records[0].image == ["images/test/test_0262.jpg"]
    assert records[1].extra["question"] == "What have lost their nuclei?"
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in PATHVQA) + "\n")
    assert [r.to_llava() for r in task.load_source(str(jsonl))] == [r.to_llava() for r in records]
    # A row's own answer type wins over the yes/no rule.
    own = task.load_source(_write(tmp_path / "own.json", [dict(PATHVQA[1], answer_type="closed")]))
    assert own[0].extra["answer_type"] == "CLOSED"
    with pytest.raises(ValueError, match="row 0: field 'question' must be a non-empty string"):
        task.load_source(_write(tmp_path / "bad.json", [{"image": "x", "answer": "yes"}]))
    with pytest.raises(TaskError, match="'pathvqa-test-7' repeats"):
        task.load_source(_write(tmp_path / "dup.json", [dict(PATHVQA[0], id=7), dict(PATHVQA[1], id=7)]))


def test_records_only_tasks_refuse_a_published_layout(tmp_path):
    with pytest.raises(TaskError, match="'vqa' reads medm records only"):
        TASK.build("vqa").load_source(str(tmp_path / "x.json"))


def test_vqa_prepare_checks_rows_and_fills_answer_types():
    task = TASK.build("vqa")
    rows = task.prepare([{"id": "a", "prediction": "Yes", "answer": "no"},
                         {"id": "b", "prediction": "liver", "answer": "Liver"},
                         {"id": "c", "prediction": "x", "answer": 4, "answer_type": " closed "}], "p.jsonl")
    assert [r["answer_type"] for r in rows] == ["CLOSED", "OPEN", "CLOSED"]
    assert task.score(rows, "strict") == score(rows, "strict")
    with pytest.raises(TaskError, match=r"p.jsonl: row 2 \(id 'b'\) has no 'answer'"):
        task.prepare([{"id": "a", "prediction": "x", "answer": "y"}, {"id": "b", "prediction": "x"}], "p.jsonl")
    with pytest.raises(TaskError, match=r"row 1 \(id 'a'\) has answer_type 'MAYBE'"):
        task.prepare([{"id": "a", "prediction": "x", "answer": "y", "answer_type": "MAYBE"}], "p.jsonl")
    with pytest.raises(TaskError, match="has no text 'prediction'"):
        task.prepare([{"id": "a", "answer": "y"}], "p.jsonl")
    assert task.check_protocol(None) == "strict" and task.check_protocol("llava-med") == "llava-med"
    with pytest.raises(ValueError, match="no protocol 'bleu'; known: strict, llava-med"):
        task.check_protocol("bleu")


def test_group_rows_splits_multi_label_values():
    rows = [{"t": "PRES, POS"}, {"t": "PRES"}, {}, {"t": "POS,POS"}]
    assert group_rows(rows, Breakdown("t", "type", sep=",")) == {"(none)": [2], "POS": [0, 3], "PRES": [0, 1]}
    assert group_rows(rows, Breakdown("t", "type")) == {"(none)": [2], "POS,POS": [3], "PRES": [1],
                                                        "PRES, POS": [0]}


def test_report_task_means_rouge_and_bleu():
    task = TASK.build("report")
    rows = task.prepare([{"id": "a", "prediction": "No acute cardiopulmonary process.",
                          "answer": "No acute cardiopulmonary process."},
                         {"id": "b", "prediction": "Small left pleural effusion.",
                          "answer": "There is a small right pleural effusion."},
                         {"id": "c", "prediction": "", "answer": "Normal chest."}], "r.jsonl")
    m = task.score(rows, task.check_protocol(None))
    assert m["protocol"] == "rouge-bleu" and m["n"] == 3 and m["n_empty"] == 1
    b = rouge(rows[1]["prediction"], rows[1]["answer"])
    assert m["rougeL"] == pytest.approx(100 * (1.0 + b["rougeL"] + 0.0) / 3)
    bl = bleu_scores(rows[1]["prediction"], rows[1]["answer"])
    assert m["bleu4"] == pytest.approx(100 * (1.0 + bl["bleu4"]) / 3) and 0 < bl["bleu4"] < bl["bleu1"] < 1
    with pytest.raises(ValueError, match="no protocol 'strict'; known: rouge-bleu"):
        task.check_protocol("strict")


def test_grounding_reads_image_sizes_and_names_bad_rows(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "ct.png")
    task = TASK.build("grounding")
    rows = task.prepare([
        # 0-1000 grid over a 200 x 100 image: (20, 10)-(100, 50) px, the reference exactly.
        {"id": "a", "prediction": "<box>(100,100),(500,500)</box>", "answer": [20, 10, 100, 50], "image": ["ct.png"]},
        # Pixels, half overlapping: IoU 1/3.
        {"id": "b", "prediction": '{"bbox_2d": [0, 0, 20, 10]}', "answer": [10, 0, 30, 10], "image_size": [50, 50]},
        {"id": "c", "prediction": "no idea", "answer": [0, 0, 5, 5], "image_size": [50, 50]},
    ], "g.jsonl", image_dir=str(tmp_path))
    assert rows[0]["image_size"] == [200, 100]
    m = task.score(rows, "box-iou")
    assert m["n"] == 3 and m["n_unparsed"] == 1
    assert m["mean_iou"] == pytest.approx(100 * (1 + 1 / 3) / 3) and m["acc_at_iou"] == pytest.approx(100 / 3)
    lost = task.prepare([{"id": "z", "prediction": "<box>(1,1),(5,5)</box>", "answer": [0, 0, 1, 1],
                          "image": ["missing.png"]}], "g.jsonl", image_dir=str(tmp_path))
    with pytest.raises(TaskError, match=r"id 'z'.*0-1000 grid: pass image_size"):
        task.score(lost, "box-iou")
