"""The playground's pieces without a server: uploads (images, volumes, zipped DICOM series, bad files), the slice
viewer's geometry and windows, the conversation state, the model panel and the example cases."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from playground_helpers import REPO, marker_volume, write_dicom_series, write_nifti, write_png, zip_folder

from medm.data.images import WINDOW_PRESETS
from medm.infer import GenerationSettings
from medm.playground import Session, UploadError, load_examples, model_markdown, model_rows, open_upload
from medm.playground.chat import EMPTY_ANSWER
from medm.playground.media import unpack_series
from medm.playground.model_info import takes_volumes
from medm.playground.viewer import DEFAULT_WINDOW, WINDOW_CHOICES, display_size

# ---- uploads ----------------------------------------------------------------------------------------------------


def test_png_and_dicom_open_as_2d_images(tmp_path):
    up = open_upload(write_png(tmp_path / "scan.png", (40, 48)), work_dir=tmp_path / "work")
    assert not up.is_volume and up.picture().size == (40, 48) and up.picture().mode == "RGB"
    assert up.caption() == "scan.png: 40 x 48 image, window default"

    from pydicom.data import get_testdata_file

    dcm = get_testdata_file("CT_small.dcm")
    up = open_upload(dcm, "ct.dcm", work_dir=tmp_path / "work")
    own = np.asarray(up.picture())
    assert up.picture().mode == "L" and up.picture().size == (128, 128)
    up.set_window("lung")  # a CT window changes the 8-bit rendering of the same HU values
    assert up.window == "lung" and not np.array_equal(np.asarray(up.picture()), own)
    up.set_window(DEFAULT_WINDOW)
    np.testing.assert_array_equal(np.asarray(up.picture()), own)


def test_nifti_volume_in_the_radiological_view_with_square_pixels(tmp_path):
    # (X, Y, Z) = (20, 10, 6) voxels of 1 x 2 x 3 mm: 20 x 20 mm in plane, 6 slices; marker at patient left,
    # posterior, inferior.
    path = write_nifti(tmp_path / "ct.nii.gz", marker_volume((20, 10, 6)), zooms=(1.0, 2.0, 3.0))
    assert display_size(path) == (6, 20, 20)
    up = open_upload(path, window="lung", work_dir=tmp_path / "work")
    v = up.viewer
    assert up.is_volume and v.num_slices == 6 and v.index == 3  # the middle slice first
    assert v.voxels.shape == (6, 20, 20) and v.voxels.dtype == np.uint8
    # Slice 0 is the most inferior; the marker sits bottom right (posterior = down, patient left = screen right).
    assert v.voxels[1:].max() < 255 and v.voxels[0].max() == 255
    row, col = np.unravel_index(np.argmax(v.voxels[0]), (20, 20))
    assert row >= 18 and col == 19
    # Lung window (-600 +- 750 HU): air at -1000 HU is (-1000 + 1350) / 1500 of the range.
    assert v.voxels[5, 0, 0] == round(350 / 1500 * 255)
    up.set_window("bone")  # (400 +- 900 HU): air is below the window
    assert v.voxels[5, 0, 0] == 0 and v.window == "bone"
    v.set_index(99)
    assert v.index == 5 and up.caption() == "ct.nii.gz: axial slice 6 of 6, window bone"
    assert up.picture().size == (20, 20) and up.picture().mode == "L"


def test_npy_volume_keeps_its_axes_and_is_capped_in_plane(tmp_path):
    vol = np.zeros((3, 600, 300), np.float32)
    vol[0, 0, 0] = 1.0
    np.save(tmp_path / "v.npy", vol)
    up = open_upload(tmp_path / "v.npy", work_dir=tmp_path / "work")
    assert up.viewer.size == (3, 512, 256)  # stored (D, H, W), shrunk to 512 px a side
    assert up.viewer.voxels[0, 0, 0] > 0 and up.viewer.voxels[1:].max() == 0  # min-max; no reorientation


def test_zipped_dicom_series_is_unpacked_and_sorted_by_position(tmp_path):
    series = write_dicom_series(tmp_path / "series", values=(100, 300, 500), positions=(20.0, 0.0, 10.0))
    archive = zip_folder(series, tmp_path / "series.zip", prefix="study/series")  # nested folders
    up = open_upload(archive, work_dir=tmp_path / "work")
    assert up.is_volume and up.viewer.num_slices == 3
    assert (tmp_path / "work").is_dir() and str(tmp_path / "work") in up.path  # unpacked in the app's work dir
    means = [up.viewer.voxels[i].mean() for i in range(3)]
    # Inferior to superior: z = 0 (300), 10 (500), 20 (100).
    assert means[1] > means[0] > means[2]


def test_bad_uploads_are_clear_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UploadError, match=r"cannot open 'notes.txt': not a recognised image format.*NIfTI"):
        open_upload(tmp_path / "notes.txt", work_dir=tmp_path)
    png = write_png(tmp_path / "cut.png")
    (tmp_path / "cut2.png").write_bytes(png.read_bytes()[:60])
    with pytest.raises(UploadError, match="'cut2.png': corrupt or truncated"):
        open_upload(tmp_path / "cut2.png", work_dir=tmp_path)
    (tmp_path / "fake.zip").write_text("no zip")
    with pytest.raises(UploadError, match="'fake.zip': not a readable zip"):
        open_upload(tmp_path / "fake.zip", work_dir=tmp_path)
    np.save(tmp_path / "flat.npy", np.zeros((4, 4)))
    with pytest.raises(UploadError, match="'flat.npy'.*not a 3D volume"):
        open_upload(tmp_path / "flat.npy", work_dir=tmp_path)
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as zf:
        zf.writestr("a/1.dcm", b"x")
        zf.writestr("b/1.dcm", b"x")
    with pytest.raises(UploadError, match="2 folders"):
        open_upload(tmp_path / "two.zip", work_dir=tmp_path)
    with zipfile.ZipFile(tmp_path / "notes.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(UploadError, match="'notes.zip': folder holds no DICOM image files"):
        open_upload(tmp_path / "notes.zip", work_dir=tmp_path)


def test_unpack_refuses_archives_above_the_limit(tmp_path):
    with zipfile.ZipFile(tmp_path / "big.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("s.dcm", b"\0" * 100_000)  # compresses to almost nothing
    with pytest.raises(UploadError, match="100,000 bytes unpacked; the limit is 10 files, 1,000 bytes"):
        unpack_series(tmp_path / "big.zip", tmp_path / "out", max_bytes=1000, max_files=10)
    assert not (tmp_path / "out").exists()


def test_window_choices_are_the_data_presets():
    assert [v for _, v in WINDOW_CHOICES] == [DEFAULT_WINDOW, *WINDOW_PRESETS]


# ---- conversation state -----------------------------------------------------------------------------------------
class FakePredictor:
    """Predictor.stream's contract: yields the growing answer; records what it was asked."""

    def __init__(self, answer="a small lesion", fail=False):
        self.answer, self.fail, self.calls = answer, fail, []

    def stream(self, messages, images=None, settings=None):
        self.calls.append(([dict(m) for m in messages], list(images or []), settings))
        if self.fail:
            raise ValueError("boom")
        text = ""
        for word in self.answer.split(" ") if self.answer else []:
            text = f"{text} {word}".strip()
            yield text


def test_session_gives_the_picture_once_and_again_after_a_new_slice(tmp_path):
    up = open_upload(write_nifti(tmp_path / "v.nii", marker_volume((8, 8, 4))), work_dir=tmp_path)
    s, pred, settings = Session(), FakePredictor(), GenerationSettings(max_new_tokens=5)
    s.set_upload(up)
    s.ask("Is there a <image> lesion?", "/pictures/1.png")  # typed placeholders are dropped
    steps = [s.chat[-1]["content"] for _ in s.stream_answer(pred, settings)]
    assert steps == ["a", "a small", "a small lesion"]
    messages, images, used = pred.calls[0]
    assert messages == [{"role": "user", "content": "<image>\nIs there a lesion?"}]
    assert len(images) == 1 and images[0].size == (8, 16) and used is settings  # 2 mm rows: 16 px high
    assert s.chat[0]["content"][0]["path"] == "/pictures/1.png"

    s.ask("Where?")  # same picture: no new placeholder
    list(s.stream_answer(pred, settings))
    messages, images, _ = pred.calls[1]
    assert [m["content"] for m in messages] == ["<image>\nIs there a lesion?", "a small lesion", "Where?"]
    assert len(images) == 1

    up.viewer.set_index(0)
    s.view_changed()  # a new slice: the next question carries it, in a new context for the model
    s.ask("And here?")
    list(s.stream_answer(pred, settings))
    messages, images, _ = pred.calls[2]
    assert messages == [{"role": "user", "content": "<image>\nAnd here?"}] and len(images) == 1
    assert np.asarray(images[0]).max() == 255  # slice 0 holds the marker
    assert len(s.chat) == 6  # the earlier turns stay on screen

    s.forget_answer()  # regenerate: the last answer goes, the question stays
    assert s.messages[-1]["role"] == "user" and s.chat[-1]["role"] == "user"
    s.clear()
    assert s.messages == [] and s.images == [] and s.chat == [] and s.upload is up and not s.attached
    with pytest.raises(ValueError, match="no answer to regenerate"):
        s.forget_answer()


def test_session_after_a_failed_answer_retries_or_moves_on(tmp_path):
    s = Session()
    s.set_upload(open_upload(write_png(tmp_path / "scan.png"), work_dir=tmp_path))
    s.ask("hello")
    with pytest.raises(ValueError, match="boom"):
        list(s.stream_answer(FakePredictor(fail=True), GenerationSettings()))
    assert s.failed and s.chat[-1] == {"role": "assistant", "content": "Error: boom"}
    assert s.can_regenerate()
    s.forget_answer()  # regenerate retries the failed question
    assert s.chat[-1]["role"] == "user" and not s.failed
    pred = FakePredictor(answer="fine")
    list(s.stream_answer(pred, GenerationSettings()))
    assert pred.calls[0][0] == [{"role": "user", "content": "<image>\nhello"}] and len(pred.calls[0][1]) == 1

    with pytest.raises(ValueError):
        s.ask("second")
        list(s.stream_answer(FakePredictor(fail=True), GenerationSettings()))
    s.ask("third")  # a new question replaces the failed one for the model; the chat keeps both
    list(s.stream_answer(pred, GenerationSettings()))
    assert [m["content"] for m in pred.calls[1][0]] == ["<image>\nhello", "fine", "third"]
    assert [m["role"] for m in s.chat] == ["user", "assistant"] * 3 and s.chat[3]["content"] == "Error: boom"

    s.clear()
    s.ask("again")
    list(s.stream_answer(FakePredictor(answer=""), GenerationSettings()))
    assert s.chat[-1]["content"] == EMPTY_ANSWER and s.messages[-1] == {"role": "assistant", "content": ""}


# ---- model panel and examples -----------------------------------------------------------------------------------
def test_model_panel_reads_config_meta_and_card(playground_ckpt, tmp_path):
    rows = dict(model_rows(str(playground_ckpt)))
    assert rows["Kind"] == "medm" and rows["Format"] == "full"
    assert rows["2D encoder"].startswith("clip (") and rows["2D connector"] == "mlp (type=mlp2x_gelu)"
    assert rows["LLM"].startswith("qwen2 family, qwen2 (hidden") and "random initialisation" in rows["LLM"]
    assert "Training stage" not in rows  # a bare save_model checkpoint has no card
    assert not takes_volumes(str(playground_ckpt))  # no 3D encoder: volumes go as the slice on screen

    import shutil

    ckpt = tmp_path / "finetune"
    shutil.copytree(playground_ckpt, ckpt)
    meta = {"format": "full", "stage": {"vision": "full", "connector": "full", "llm": "lora",
                                        "init_from": "runs/demo/pretrain"},
            "data": {"path": "runs/demo/data/train.json"}, "training": {"steps": 1500, "final_loss": 0.1234},
            "evaluation": {"phantoms": {"accuracy": 0.875}}}
    (ckpt / "README.md").write_text("---\n" + yaml.safe_dump({"medm": meta}) + "---\n# card\n")
    rows = dict(model_rows(str(ckpt)))
    assert rows["Training stage"] == "vision full, connector full, llm lora; started from `runs/demo/pretrain`"
    assert rows["Training data"] == "`runs/demo/data/train.json`"
    assert rows["Training"] == "1500 steps, final loss 0.1234"
    assert rows["Evaluation: phantoms"] == "accuracy 0.875"
    md = model_markdown(str(ckpt))
    assert md.startswith("- **Checkpoint**: `") and "\n- **Kind**: medm\n" in md


def test_examples_vary_question_kinds_and_images(phantom_records, tmp_path):
    examples = load_examples(str(phantom_records))
    assert examples and all((phantom_records.parent / e.image).is_file() for e in examples)
    assert not any("<image>" in e.question for e in examples)

    def rec(i, image, kind):
        return {"id": str(i), "image": [image], "question_type": kind,
                "conversations": [{"from": "human", "value": f"<image>\n{kind} of {image}?"},
                                  {"from": "gpt", "value": "x"}]}

    items = [rec(0, "a.png", "presence"), rec(1, "a.png", "size"), rec(2, "a.png", "count"),
             rec(3, "b.png", "presence"), rec(4, "b.png", "count"), rec(5, "c.png", "presence")]
    (tmp_path / "q.json").write_text(json.dumps(items))
    got = [(Path(e.image).name, e.question) for e in load_examples(str(tmp_path / "q.json"), limit=6)]
    # A new kind on a new image first (a: presence, b: count), then the other kind (a: size), then new images.
    assert got == [("a.png", "presence of a.png?"), ("b.png", "count of b.png?"), ("a.png", "size of a.png?"),
                   ("c.png", "presence of c.png?")]
    assert len(load_examples(str(tmp_path / "q.json"), limit=2)) == 2
    assert Path(load_examples(str(tmp_path / "q.json"), image_dir="/data")[0].image) == Path("/data/a.png")


def test_a_qwen_vl_checkpoint_serves_unchanged(tmp_path):
    """The playground only uses Predictor's public API, so the qwen-vl kind needs nothing of its own."""
    from medm.config import load_yaml
    from medm.infer import Predictor
    from medm.models import build_model, save_model

    torch.manual_seed(0)
    model, processor = build_model(load_yaml(str(REPO / "configs" / "model" / "tiny-qwen2.5-vl.yaml")))
    save_model(model, processor, str(tmp_path / "qwen"))
    rows = dict(model_rows(str(tmp_path / "qwen")))
    assert rows["Kind"] == "qwen-vl" and rows["2D connector"] == "the model's own merger"
    assert rows["LLM"].startswith("qwen2_5_vl (Qwen2_5_VLForConditionalGeneration")

    s = Session()
    s.set_upload(open_upload(write_png(tmp_path / "scan.png"), work_dir=tmp_path))
    s.ask("Is there a lesion?")
    list(s.stream_answer(Predictor.from_pretrained(str(tmp_path / "qwen")), GenerationSettings(max_new_tokens=4)))
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and len(s.images) == 1
    assert not s.chat[-1]["content"].startswith("Error")


def test_a_model_with_a_3d_encoder_is_given_the_whole_volume(tmp_path):
    from medm.config import load_yaml
    from medm.infer import Predictor
    from medm.models import build_model, save_model

    torch.manual_seed(0)
    model, tok = build_model(load_yaml(str(REPO / "configs" / "model" / "tiny-3d.yaml")))
    save_model(model, tok, str(tmp_path / "m3d"))
    assert takes_volumes(str(tmp_path / "m3d"))
    assert dict(model_rows(str(tmp_path / "m3d")))["3D encoder"].startswith("vit3d (")

    vol = np.random.default_rng(0).integers(0, 256, (12, 20, 20)).astype(np.uint8)  # uint8, as the model expects
    np.save(tmp_path / "v.npy", vol)
    s = Session(whole_volumes=True)
    s.set_upload(open_upload(tmp_path / "v.npy", work_dir=tmp_path))
    s.ask("Any lesion?", "/pictures/1.png")
    assert s.messages[-1]["content"] == "<image3d>\nAny lesion?" and s.volumes == [str(tmp_path / "v.npy")]
    assert s.chat[-1]["content"][0]["alt_text"].endswith("(the model is given the whole volume)")
    pred = Predictor.from_pretrained(str(tmp_path / "m3d"))
    calls = []
    real_volumes = pred.volumes
    pred.volumes = lambda paths, blank=False: calls.append(list(paths)) or real_volumes(paths, blank)
    list(s.stream_answer(pred, GenerationSettings(max_new_tokens=3)))
    assert calls == [[str(tmp_path / "v.npy")]] and not s.failed
    s.upload.viewer.set_index(0)
    s.view_changed()  # the view is only for looking: the volume is not given again
    s.ask("And now?")
    assert s.messages[-1]["content"] == "And now?" and len(s.volumes) == 1
