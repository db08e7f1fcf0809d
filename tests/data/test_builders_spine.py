"""Spine builder on the synthetic fixture in the label schema (docs/spine_labels.md), `medm data split` by study, and
`spine` scoring (accuracy / macro-F1 per task, IoU / Acc@0.5 for positioning)."""

import json

import pytest

from medm.cli import main
from medm.data.builders._common import SourceError
from medm.data.builders.spine import LEVELS, build_spine, load_labels
from medm.data.builders.spine_synthetic import write_synthetic_spine
from medm.eval.tasks.spine import SpineTask, macro_f1, parse_class, score_spine

PER_STUDY = 1 + 1 + 5 + 5 + 5  # qd, sl, zjppt and zyzg per level, positioning per level


@pytest.fixture
def spine(tmp_path):
    root = tmp_path / "spine"
    write_synthetic_spine(str(root))
    return root


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_synthetic_fixture_is_in_the_schema_and_seeded(tmp_path, spine):
    studies, levels, classes = load_labels(str(spine / "train.json"))
    assert len(studies) == 4 and levels == LEVELS and classes["zyzg"] == ("normal", "mild", "moderate", "severe")
    s = studies[0]
    assert len(s["sagittal"]) == 8 and (spine / s["sagittal"][0]).is_file()
    assert s["qd"] in classes["qd"] and set(s["zjppt"]) == set(LEVELS)
    assert s["positioning"]["slice"] == 4 and len(s["positioning"]["boxes"]) == 5
    write_synthetic_spine(str(tmp_path / "again"))
    assert (tmp_path / "again" / "train.json").read_text() == (spine / "train.json").read_text()


def test_all_tasks_joint_middle_slice(tmp_path, spine):
    paths = build_spine(str(tmp_path / "out"), str(spine))
    train, dev = _read(paths["train"]), _read(paths["dev"])  # type_dataset "both"
    assert len(train) == 4 * PER_STUDY and len(dev) == 2 * PER_STUDY and "test" not in paths
    labels = _read(spine / "train.json")["studies"][0]
    by_id = {r["id"]: r for r in train}
    qd = by_id["spine-train-S0000-qd"]
    assert qd["image"] == [labels["sagittal"][4]] and qd["slices"] == [4]
    assert qd["answer"] == labels["qd"] and qd["conversations"][1]["value"] == labels["qd"]
    assert qd["conversations"][0]["value"].startswith("<image>\nWhat is the curvature of the lumbar spine")
    assert "Options: normal, straightened, reversed, increased." in qd["question"]
    z = by_id["spine-train-S0000-zyzg-L4-L5"]
    assert z["level"] == "L4-L5" and z["answer"] == labels["zyzg"]["L4-L5"] and z["spine_task"] == "zyzg"
    assert "at L4-L5?" in z["question"]
    pos = by_id["spine-train-S0000-positioning-L5-S1"]
    assert pos["answer"] == labels["positioning"]["boxes"]["L5-S1"] and pos["image_size"] == [64, 64]
    assert json.loads(pos["conversations"][1]["value"])[0]["bbox_2d"] == pos["answer"]
    assert "| train | zjppt | 20 | 4 |" in open(paths["readme"]).read()
    for split in ("train", "dev"):
        assert main(["data", "validate", paths[split], "--image-dir", paths["image_dir"]]) == 0


def test_sag_image_joint_and_separate(tmp_path, spine):
    joint = _read(build_spine(str(tmp_path / "j"), str(spine), task_type="qd", sag_image=[5, 6],
                              type_dataset="train", suffix="_qd")["train"])
    assert (tmp_path / "j" / "train_qd.json").is_file() and len(joint) == 4
    assert joint[0]["slices"] == [5, 6] and joint[0]["image"][1].endswith("sag_06.png")
    assert joint[0]["conversations"][0]["value"].startswith("<image>\n<image>\nWhat is")
    separate = _read(build_spine(str(tmp_path / "s"), str(spine), task_type=["qd", "zjppt"], sag_image="5,6",
                                 sag_type="separate", type_dataset="dev")["dev"])
    assert len(separate) == 2 * (1 + 5) * 2
    ids = [r["id"] for r in separate[:4]]
    assert ids == ["spine-dev-S0004-qd-s5", "spine-dev-S0004-qd-s6", "spine-dev-S0004-zjppt-L1-L2-s5",
                   "spine-dev-S0004-zjppt-L1-L2-s6"]
    assert [len(r["image"]) for r in separate] == [1] * len(separate)
    assert main(["data", "validate", str(tmp_path / "s" / "dev.json"), "--image-dir", str(spine)]) == 0
    with pytest.raises(SourceError, match=r"study 'S0000'.*--sag-image \[9\] outside the study's 8 sagittal slices"):
        build_spine(str(tmp_path / "x"), str(spine), sag_image=9, type_dataset="train")


def test_hidden_test_labels_give_prompt_only_records(tmp_path):
    root = tmp_path / "spine"
    write_synthetic_spine(str(root), {"train": 1, "test": 2}, unlabelled_test=True)
    paths = build_spine(str(tmp_path / "out"), str(root), type_dataset="test")
    test = _read(paths["test"])
    assert len(test) == 2 * PER_STUDY
    assert all(len(r["conversations"]) == 1 and "answer" not in r for r in test)
    assert main(["data", "validate", paths["test"], "--image-dir", paths["image_dir"], "--inference"]) == 0
    assert main(["data", "validate", paths["test"], "--image-dir", paths["image_dir"]]) == 1
    # The same nulls in a training split are skipped (and counted), never written as prompts.
    (root / "train.json").write_text((root / "test.json").read_text())
    paths = build_spine(str(tmp_path / "out2"), str(root), type_dataset="train")
    assert _read(paths["train"]) == []
    assert "Unlabelled (null) labels: train 34" in open(paths["readme"]).read()


def test_templates_file(tmp_path, spine):
    t = tmp_path / "templates.json"
    t.write_text(json.dumps({"zjppt": ["Disc at {level}: bulge or herniation? ({options})", "Grade the {level} disc."],
                             "qd": "Curvature?"}))
    records = _read(build_spine(str(tmp_path / "o"), str(spine), task_type="qd,zjppt", templates=str(t),
                                type_dataset="train")["train"])
    questions = {r["question"] for r in records}
    assert "Curvature?" in questions and "Disc at L3-L4: bulge or herniation? (normal, bulge, herniation)" in questions
    assert "Grade the L1-L2 disc." in questions or "Grade the L2-L3 disc." in questions
    # Same id, same wording, run after run.
    again = _read(build_spine(str(tmp_path / "o2"), str(spine), task_type="qd,zjppt", templates=str(t),
                              type_dataset="train")["train"])
    assert [r["question"] for r in again] == [r["question"] for r in records]
    t.write_text(json.dumps({"zyzg": "Stenosis?"}))
    with pytest.raises(SourceError, match="zyzg template 'Stenosis\\?' must name the disc level"):
        build_spine(str(tmp_path / "o3"), str(spine), templates=str(t))
    t.write_text(json.dumps({"qd": "Curve of {spine}?"}))
    with pytest.raises(SourceError, match="only {level} and {options}"):
        build_spine(str(tmp_path / "o4"), str(spine), templates=str(t))
    t.write_text(json.dumps({"kyphosis": "?"}))
    with pytest.raises(SourceError, match="unknown task 'kyphosis'"):
        build_spine(str(tmp_path / "o5"), str(spine), templates=str(t))


def test_label_errors_name_study_task_and_level(tmp_path, spine):
    data = _read(spine / "train.json")
    data["studies"][1]["zjppt"]["L4-L5"] = "sequestration"
    (spine / "train.json").write_text(json.dumps(data))
    with pytest.raises(SourceError, match="study 'S0001': zjppt L4-L5 label 'sequestration' is not one of normal"):
        build_spine(str(tmp_path / "o"), str(spine))
    data["studies"][1]["zjppt"]["L4-L5"] = "bulge"
    data["studies"][2]["positioning"]["boxes"]["L1-L2"] = [30, 20, 10, 25]
    (spine / "train.json").write_text(json.dumps(data))
    with pytest.raises(SourceError, match="study 'S0002', positioning L1-L2: bbox .* x1 < x2"):
        build_spine(str(tmp_path / "o"), str(spine))
    with pytest.raises(ValueError, match="unknown spine task"):
        build_spine(str(tmp_path / "o"), str(spine), task_type="qd,kyphosis")
    with pytest.raises(ValueError, match="--type-dataset must be one of"):
        build_spine(str(tmp_path / "o"), str(spine), type_dataset="val")


def test_cli_build_and_split_by_study(tmp_path, spine, capsys):
    assert main(["data", "build", "spine", "--src", str(spine), "--out", str(tmp_path / "r"), "--task_type",
                 "[zyzg]", "--sag_image", "[3,4]", "--sag_type", "separate", "--type_dataset", "train"]) == 0
    records = _read(tmp_path / "r" / "train.json")
    assert len(records) == 4 * 5 * 2 and {r["spine_task"] for r in records} == {"zyzg"}
    # Split the train label file by study: deterministic for a seed, no study on both sides, schema kept.
    args = ["data", "split", str(spine / "train.json"), "--dev-ratio", "0.5", "--seed", "3"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert "train: " in capsys.readouterr().out
    a_train, a_dev = _read(tmp_path / "a" / "train.json"), _read(tmp_path / "a" / "dev.json")
    assert a_train == _read(tmp_path / "b" / "train.json")
    ids_train = [s["study_id"] for s in a_train["studies"]]
    ids_dev = [s["study_id"] for s in a_dev["studies"]]
    assert len(ids_train) == len(ids_dev) == 2 and not set(ids_train) & set(ids_dev)
    assert a_dev["schema"] == "medm-spine-labels/1" and a_dev["levels"] == list(LEVELS)
    # The split files are label files the builder reads, with the slices where the source has them.
    assert len(load_labels(str(tmp_path / "a" / "dev.json"))[0]) == 2
    build = ["data", "build", "spine", "--src", str(tmp_path / "a"), "--out", str(tmp_path / "ra"), "--task-type", "qd"]
    assert main(build) == 2
    assert "pass --image-folder DIR" in capsys.readouterr().err
    assert main(build + ["--image-folder", str(spine)]) == 0
    assert len(_read(tmp_path / "ra" / "train.json")) == len(_read(tmp_path / "ra" / "dev.json")) == 2


def test_split_records_by_image_and_errors(tmp_path):
    from medm.data.split import split_file

    records = [{"id": f"r{i}", "image": [f"img{i // 3}.png"], "conversations": []} for i in range(30)]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    result = split_file(str(path), str(tmp_path / "out"), dev_ratio=0.2, seed=0, by="image")
    assert result["counts"] == {"train": {"items": 24, "groups": 8}, "dev": {"items": 6, "groups": 2}}
    assert result["dev"].endswith("dev.jsonl")
    other = split_file(str(path), str(tmp_path / "out2"), dev_ratio=0.2, seed=1, by="image")
    assert open(other["dev"]).read() != open(result["dev"]).read()  # the seed matters
    assert main(["data", "split", str(path), "--out", str(tmp_path / "o"), "--by", "study_id"]) == 2


def test_parse_class_and_macro_f1():
    opts = ["normal", "bulge", "herniation"]
    assert parse_class("Bulge.", opts) == "bulge"
    assert parse_class("There is a disc bulge at this level.", opts) == "bulge"
    assert parse_class("bulge or herniation", opts) is None  # both named
    assert parse_class("normal disc. No herniation.", opts) == "normal"  # first clause only
    assert parse_class("not sure", opts) is None
    assert parse_class("disc bulge", ["bulge", "disc bulge"]) == "disc bulge"
    assert macro_f1(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_spine_scores_by_hand():
    rows = [
        {"spine_task": "zjppt", "answer": a, "prediction": p, "options": ["normal", "bulge", "herniation"]}
        for a, p in [("normal", "normal"), ("bulge", "There is a disc bulge."), ("bulge", "herniation"),
                     ("herniation", "I am not sure")]
    ] + [
        {"spine_task": "positioning", "answer": [10, 10, 20, 20], "image_size": [100, 100], "prediction": p}
        for p in ['[{"bbox_2d": [10, 10, 20, 30], "label": "L1-L2"}]', "<box>(100,100),(200,200)</box>", "no idea"]
    ]
    task = SpineTask()
    m = task.score(task.prepare(rows, "preds.jsonl"), "spine")
    assert m["zjppt_accuracy"] == pytest.approx(50.0) and m["zjppt_n"] == 4
    # normal F1 1, bulge 2/3, herniation 0 (one false positive, one unparsed miss).
    assert m["zjppt_macro_f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    assert m["positioning_mean_iou"] == pytest.approx(50.0) and m["positioning_acc_at_iou"] == pytest.approx(200 / 3)
    assert m["n"] == 7 and m["n_unparsed"] == 2 and m["accuracy"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="row 1 has spine_task None"):
        task.prepare([{"prediction": "x", "answer": "normal"}], "preds.jsonl")
    with pytest.raises(ValueError, match="answer 'slipped' is not one of its options"):
        task.prepare([{"prediction": "x", "answer": "slipped", "spine_task": "sl"}], "preds.jsonl")
    assert score_spine([])["accuracy"] is None


def test_perfect_predictions_on_built_records_score_100(tmp_path, spine):
    from medm.data.annotations import load_records
    from medm.eval.report import evaluate
    from medm.infer.predictions import prediction_row

    paths = build_spine(str(tmp_path / "out"), str(spine), type_dataset="dev", box_format="grid1000")
    preds = tmp_path / "preds.jsonl"
    with open(preds, "w") as f:
        for rec in load_records(paths["dev"]):
            f.write(json.dumps(prediction_row(rec, rec.conversations[-1]["value"])) + "\n")
    result = evaluate("spine", str(preds))
    m = result.metrics
    assert m["n"] == 2 * PER_STUDY and m["accuracy"] == 100.0 and m["macro_f1"] == 100.0
    assert m["acc_at_iou"] == 100.0 and m["mean_iou"] > 90.0  # grid rounding costs a little IoU
    groups = {(g.breakdown.key, g.group): g.metrics for g in result.groups}
    assert groups[("spine_task", "zyzg")]["n"] == 10 and groups[("level", "L4-L5")]["n"] == 2 * 3
