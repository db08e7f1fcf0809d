"""Benchmark builders on small hand-made fixtures in each source's published layout, and the eval task that scores
their records (predictions made from the records as `medm infer` writes them)."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from medm.data.annotations import load_records, parse_record
from medm.data.builders._common import SourceError
from medm.eval.report import evaluate
from medm.infer.predictions import prediction_row
from medm.registry import BUILDER, TASK


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(path)


def _preds(tmp_path, records_path, answers, name="preds.jsonl"):
    """Prediction rows as `medm infer` writes them, with the given model answers."""
    rows = [prediction_row(r, a) for r, a in zip(load_records(records_path), answers)]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


# ---- OmniMedVQA ------------------------------------------------------------------------------------------------
def _omnimedvqa(tmp_path):
    src = tmp_path / "OmniMedVQA"
    rows = [
        {"dataset": "ACRIMA", "question_id": "ACRIMA_0000", "question_type": "Modality Recognition",
         "question": "What imaging modality was used?", "gt_answer": "Fundus photography",
         "image_path": "Images/ACRIMA/Im553_g_ACRIMA.png", "option_A": "CT", "option_B": "Fundus photography",
         "option_C": "MRI", "option_D": "X-ray", "modality_type": "Fundus Photography"},
        {"dataset": "ACRIMA", "question_id": "ACRIMA_0001", "question_type": "Disease Diagnosis",
         "question": "Is there glaucoma?", "gt_answer": "No", "image_path": "Images/ACRIMA/Im554_ACRIMA.png",
         "option_A": "Yes", "option_B": "No", "modality": "Fundus Photography"},  # the one file's `modality` key
    ]
    (src / "QA_information" / "Open-access").mkdir(parents=True)
    (src / "QA_information" / "Open-access" / "ACRIMA.json").write_text(json.dumps(rows))
    for r in rows:
        _png(src / r["image_path"])
    return src


def test_omnimedvqa_builder_and_task(tmp_path):
    src = _omnimedvqa(tmp_path)
    out = BUILDER.get("omnimedvqa")(out=str(tmp_path / "out"), src=str(src))
    recs = json.loads(open(out["test"]).read())
    r0, r1 = recs
    assert r0["id"] == "omnimedvqa-ACRIMA_0000" and r0["image"] == ["Images/ACRIMA/Im553_g_ACRIMA.png"]
    assert r0["conversations"][0]["value"] == (
        "<image>\nWhat imaging modality was used?Here are 4 candidate answers:['CT', 'Fundus photography', 'MRI', "
        "'X-ray'] Only return what you think is the correct answer from the candidate answers, do not return any "
        "other irrelevant text!")
    assert r0["conversations"][1]["value"] == "Fundus photography" and r0["answer"] == "B"
    assert r1["options"] == {"A": "Yes", "B": "No"} and r1["modality_type"] == "Fundus Photography"
    assert [parse_record(r, r["id"]).image for r in recs] == [[r["image"][0]] for r in recs]
    # The published file read with --layout gives the same records.
    layout = TASK.build("omnimedvqa").load_source(str(src / "QA_information" / "Open-access" / "ACRIMA.json"))
    assert [r.id for r in layout] == [r["id"] for r in recs]
    pred = _preds(tmp_path, out["test"], ["fundus photograph", "yes"])
    res = evaluate("omnimedvqa", pred, bootstrap=0)
    assert res.metrics["accuracy"] == 50.0 and res.protocol == "omnimedvqa"
    assert {g.group: g.metrics["accuracy"] for g in res.groups if g.breakdown.key == "question_type"} == \
        {"Disease Diagnosis": 0.0, "Modality Recognition": 100.0}
    bad = [dict(json.loads((src / "QA_information/Open-access/ACRIMA.json").read_text())[0], gt_answer="PET")]
    (src / "QA_information/Open-access/ACRIMA.json").write_text(json.dumps(bad))
    with pytest.raises(SourceError, match="ACRIMA.json, row 1: the answer 'PET' is none of the options"):
        BUILDER.get("omnimedvqa")(out=str(tmp_path / "o2"), src=str(src))


# ---- PMC-VQA ---------------------------------------------------------------------------------------------------
def test_pmc_vqa_builder_and_task(tmp_path):
    src = tmp_path / "PMC-VQA"
    src.mkdir()
    header = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
    rows = [["PMC1064097_F1.jpg", "What is the uptake pattern in the breast?", "Focal uptake pattern",
             "A:Diffuse uptake pattern", "B:Focal uptake pattern", "C:No uptake pattern",
             "D:Cannot determine from the information given", "B"],
            ["PMC1064097_F2.jpg", "Which modality?", "CT", " A:MRI", " B:PET", " C:CT", " D:US", "C"]]
    with open(src / "test_clean.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    for r in rows:
        _png(src / "images" / r[0])
    out = BUILDER.get("pmc-vqa")(out=str(tmp_path / "out"), src=str(src))
    recs = json.loads(open(out["test_clean"]).read())
    assert recs[0]["options"]["A"] == "Diffuse uptake pattern" and recs[1]["options"]["C"] == "CT"
    assert recs[0]["conversations"][0]["value"] == (
        "<image>\nQuestion: What is the uptake pattern in the breast?Choices: A:Diffuse uptake pattern B:Focal uptake "
        "pattern C:No uptake pattern D:Cannot determine from the information givenThe Answer is:")
    assert recs[0]["image"] == ["images/PMC1064097_F1.jpg"] and recs[0]["answer"] == "B"
    pred = _preds(tmp_path, out["test_clean"], ["B:Focal uptake pattern", "MRI"])
    assert evaluate("pmc-vqa", pred).metrics["accuracy"] == 50.0


# ---- MedXpertQA ------------------------------------------------------------------------------------------------
def test_medxpertqa_builder_and_task(tmp_path):
    src = tmp_path / "MedXpertQA"
    (src / "MM").mkdir(parents=True)
    q = ("A 26-year-old man falls ... Which step contributes most to rotatory stability?\nAnswer Choices: (A) LCL "
         "repair (B) Capsular plication (C) Radial head replacement (D) Radial head ORIF (E) MCL reconstruction")
    rows = [{"id": "MM-0", "question": q, "options": {"A": "LCL repair", "B": "Capsular plication",
                                                      "C": "Radial head replacement", "D": "Radial head ORIF",
                                                      "E": "MCL reconstruction"},
             "label": "A", "images": ["MM-0-a.jpeg", "MM-0-b.jpeg"], "medical_task": "Treatment",
             "body_system": "Skeletal", "question_type": "Reasoning"},
            {"id": "MM-1", "question": "Best approach?\nAnswer Choices: (A) Lateral (B) Inferior",
             "options": [{"letter": "A", "content": "Lateral"}, {"letter": "B", "content": "Inferior"}],
             "label": ["B"], "images": [{"image_path": "MM-1-a.jpeg"}], "medical_task": "Diagnosis",
             "body_system": "Integumentary", "question_type": "Understanding"}]
    (src / "MM" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("MM-0-a.jpeg", "MM-0-b.jpeg", "MM-1-a.jpeg"):
        _png(src / "images" / name)
    out = BUILDER.get("medxpertqa")(out=str(tmp_path / "out"), src=str(src))
    recs = json.loads(open(out["test"]).read())
    assert recs[0]["image"] == ["images/MM-0-a.jpeg", "images/MM-0-b.jpeg"]  # two images, two placeholders
    assert recs[0]["conversations"][0]["value"] == f"<image>\n<image>\nQ: {q}\nA: Among A through E, the answer is"
    assert parse_record(recs[0], "x").image == recs[0]["image"]
    assert recs[1]["answer"] == "B" and recs[1]["options"] == {"A": "Lateral", "B": "Inferior"}
    pred = _preds(tmp_path, out["test"], [" A.", "The answer is A"])
    res = evaluate("medxpertqa", pred)
    assert res.metrics["accuracy"] == 50.0
    assert {g.group: g.metrics["n"] for g in res.groups if g.breakdown.key == "body_system"} == \
        {"Integumentary": 1, "Skeletal": 1}


# ---- MMMU ------------------------------------------------------------------------------------------------------
def test_mmmu_builder_writes_images_and_skips_open_questions(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    png = {"bytes": buf.getvalue(), "path": "a.png"}
    base = {"explanation": "", "img_type": "['Body Scans: MRI, CT.']", "topic_difficulty": "Medium",
            "subfield": "Clinical Radiology"}
    rows = [dict(base, id="validation_Clinical_Medicine_1", question="<image 1> <image 2> Which organ is shown?",
                 options="['Liver', 'Spleen', 'Kidney']", answer="B", question_type="multiple-choice",
                 image_1=png, image_2=png, **{f"image_{k}": None for k in range(3, 8)}),
            dict(base, id="validation_Clinical_Medicine_2", question="How many lesions <image 1>?", options="[]",
                 answer="3", question_type="open", image_1=png, **{f"image_{k}": None for k in range(2, 8)})]
    (tmp_path / "MMMU" / "Clinical_Medicine").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "MMMU/Clinical_Medicine/validation-00000-of-00001.parquet")
    out = BUILDER.get("mmmu")(out=str(tmp_path / "out"), src=str(tmp_path / "MMMU"), subjects="Clinical_Medicine")
    recs = json.loads(open(out["validation"]).read())
    assert len(recs) == 1 and recs[0]["id"] == "mmmu-validation_Clinical_Medicine_1"
    assert recs[0]["image"] == [f"images/validation_Clinical_Medicine_1_{k}.png" for k in (1, 2)]
    assert (tmp_path / "out" / recs[0]["image"][1]).read_bytes() == png["bytes"]
    assert recs[0]["conversations"][0]["value"] == (
        "<image>\n<image>\n<image 1> <image 2> Which organ is shown?\n\n(A) Liver\n(B) Spleen\n(C) Kidney\n\n"
        "Answer with the option's letter from the given choices directly.")
    assert "1 open question(s)" in (tmp_path / "out" / "README.md").read_text()
    pred = _preds(tmp_path, out["validation"], ["(B) Spleen"])
    assert evaluate("mmmu", pred).metrics["accuracy"] == 100.0


# ---- M3D -------------------------------------------------------------------------------------------------------
def test_m3d_vqa_and_cap_builders_and_tasks(tmp_path):
    root = tmp_path / "data"
    (root / "M3D-VQA").mkdir(parents=True)
    (root / "ct_case" / "000006").mkdir(parents=True)
    np.save(root / "ct_case/000006/Axial_non_contrast.npy", np.zeros((1, 4, 8, 8), np.float32))
    header = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
              "Answer", "Answer Choice"]
    row = ["ct_case/000006/Axial_non_contrast.npy", "report text", "1", "In which plane is the image?", "Sagittal",
           "Axial", "Coronal", "Oblique", "Axial", "B"]
    with open(root / "M3D-VQA" / "M3D_VQA_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, row])
    out = BUILDER.get("m3d-vqa")(out=str(tmp_path / "vqa"), src=str(root))
    closed = json.loads(open(out["M3D_VQA_test_closed"]).read())[0]
    opened = json.loads(open(out["M3D_VQA_test_open"]).read())[0]
    assert closed["image3d"] == [row[0]] and closed["answer"] == "B" and closed["question_type"] == "1"
    assert closed["conversations"][0]["value"] == (
        "<image3d>\nIn which plane is the image? Choices: A. Sagittal B. Axial C. Coronal D. Oblique")
    assert opened["answer"] == "Axial"
    assert opened["conversations"][0]["value"] == "<image3d>\nIn which plane is the image?"
    closed_preds = _preds(tmp_path, out["M3D_VQA_test_closed"], ["B. Axial"])
    assert evaluate("m3d-vqa-closed", closed_preds).metrics["accuracy"] == 100
    res = evaluate("m3d-vqa-open", _preds(tmp_path, out["M3D_VQA_test_open"], ["axial"], "o.jsonl"))
    assert res.metrics["bleu1"] == 100.0 and res.metrics["rouge1"] == 100.0

    (root / "M3D_Cap_npy").mkdir()
    (root / "ct_case/000006/text.txt").write_text("No acute abnormality.\n")
    (root / "M3D_Cap_npy" / "M3D_Cap.json").write_text(json.dumps(
        {"train": [], "validation": [], "test": [{"image": row[0], "text": "ct_case/000006/text.txt"}]}))
    cap = BUILDER.get("m3d-cap")(out=str(tmp_path / "cap"), src=str(root))
    rec = json.loads(open(cap["test"]).read())[0]
    assert rec["answer"] == "No acute abnormality." and rec["image3d"] == [row[0]]
    assert rec["conversations"][0]["value"].startswith("<image3d>\nCan you provide a caption")


# ---- IU X-ray (R2Gen) ------------------------------------------------------------------------------------------
def test_iu_xray_builder_keeps_both_views(tmp_path):
    src = tmp_path / "iu_xray"
    item = {"id": "CXR2384_IM-0942", "report": "The heart size and pulmonary vascularity appear within normal "
                                               "limits. No pneumothorax.",
            "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"], "split": "test"}
    src.mkdir()
    (src / "annotation.json").write_text(json.dumps({"train": [dict(item, id="CXR1_1", split="train")], "val": [],
                                                     "test": [item]}))
    for p in ("CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png", "CXR1_1/0.png", "CXR1_1/1.png"):
        _png(src / "images" / p)
    out = BUILDER.get("iu-xray")(out=str(tmp_path / "out"), src=str(src))
    rec = json.loads(open(out["test"]).read())[0]
    assert rec["id"] == "iu-xray-test-CXR2384_IM-0942" and rec["answer"] == item["report"]
    assert rec["image"] == ["images/CXR2384_IM-0942/0.png", "images/CXR2384_IM-0942/1.png"]
    assert parse_record(rec, "x").conversations[0]["value"].count("<image>") == 2
    assert [r.id for r in TASK.build("iu-xray").load_source(str(src / "annotation.json"))] == [rec["id"]]
    res = evaluate("iu-xray", _preds(tmp_path, out["test"], [item["report"]]))
    assert res.metrics["rouge1"] == pytest.approx(100.0) and res.metrics["n_chars"] == 0


# ---- FLARE25 Task 5 --------------------------------------------------------------------------------------------
def test_flare25_builder_keeps_every_image_of_a_question(tmp_path):
    src = tmp_path / "FLARE-Task5-MLLM-2D"
    ds = src / "training" / "Xray" / "chestdr"
    for n in ("a.png", "b.png", "c.png"):
        _png(ds / "imagesTr" / n)
    rows = [{"TaskType": "Classification", "Modality": "Xray", "ImageName": "imagesTr/a.png",
             "Question": "Is there pneumonia? Options: yes, no", "Answer": "no", "Split": "train"},
            {"TaskType": "Multi-label Classification", "Modality": "Xray", "ImageName": ["b.png", "c.png"],
             "Question": "Which findings are present in these views?", "Answer": "effusion, nodule", "Split": "train"},
            {"TaskType": "Counting", "Modality": "Xray", "ImageName": "a.png", "Question": "How many ribs?",
             "Answer": 12, "Split": "train"}]
    (ds / "chestdr_questions_train.json").write_text(json.dumps(rows))
    out = BUILDER.get("flare25")(out=str(tmp_path / "out"), src=str(src), splits="train")
    recs = json.loads(open(out["train"]).read())
    assert [r["id"] for r in recs] == [f"flare25-train-chestdr-{i}" for i in range(3)]
    assert recs[1]["image"] == ["training/Xray/chestdr/imagesTr/b.png", "training/Xray/chestdr/imagesTr/c.png"]
    assert recs[1]["conversations"][0]["value"].startswith("<image>\n<image>\nWhich findings")
    assert recs[1]["n_images"] == 2 and recs[2]["answer"] == "12" and recs[0]["task_type"] == "Classification"
    assert all(len(parse_record(r, "x").image) == r["n_images"] for r in recs)
    res = evaluate("flare25", _preds(tmp_path, out["train"], ["No.", "effusion", "12"]))
    assert res.metrics["n"] == 3 and {g.group for g in res.groups if g.breakdown.key == "task_type"} == \
        {"Classification", "Counting", "Multi-label Classification"}
    with pytest.raises(FileNotFoundError, match="no FLARE25 questions files"):
        BUILDER.get("flare25")(out=str(tmp_path / "o2"), src=str(src), splits="val")


# ---- Chinese X-ray reports (OpenI-zh) --------------------------------------------------------------------------
def test_openi_zh_builder_splits_by_study_and_report_zh_scores_by_character(tmp_path):
    src = tmp_path / "OpenI-zh"
    ann = [{"image_id": f"{s}_{v}", "caption": "双肺纹理增多，心影正常。"} for s in range(1, 11) for v in (1, 2)]
    src.mkdir()
    (src / "openi-zh.json").write_text(json.dumps({"annotations": ann}, ensure_ascii=False))
    for a in ann:
        _png(src / "images" / f"{a['image_id']}.png")
    out = BUILDER.get("openi-zh")(out=str(tmp_path / "out"), src=str(src), test_ratio=0.2, seed=0)
    train, test = (json.loads(open(out[s]).read()) for s in ("train", "test"))
    assert len(test) == 4 and len(train) == 16  # 2 of 10 studies, both views each
    assert not {r["study_id"] for r in train} & {r["study_id"] for r in test}
    assert test[0]["conversations"][0]["value"] == "<image>\n通过这张胸部X光影像可以诊断出什么？"
    assert test[0]["image"] == [f"images/{test[0]['image_id']}.png"]
    again = BUILDER.get("openi-zh")(out=str(tmp_path / "out2"), src=str(src), test_ratio=0.2, seed=0)
    assert json.loads(open(again["test"]).read()) == test  # seeded
    res = evaluate("report-zh", _preds(tmp_path, out["test"], ["双肺纹理增多，心影不大"] * 4), bootstrap=100)
    assert res.metrics["rouge1"] == pytest.approx(80.0) and res.metrics["rouge2"] == pytest.approx(700 / 9)
    assert res.metrics["n_chars"] == 4 and res.ci["rouge1"] == pytest.approx([80.0, 80.0])
