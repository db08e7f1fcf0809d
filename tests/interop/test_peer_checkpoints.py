"""`medm import medm-vl | tinyllava` on checkpoints written by the peers' OWN code (tests/interop/fixtures, made by
make_peer_fixtures.py from MedM-VL 225fc0f / 193feb7 and TinyLLaVA_Factory 53f12c7 under the transformers versions
they pin; see fixtures/README.md). For every case: the prompt string is byte-equal to the peer's, the inference ids
and the training record's ids and labels equal the peer's dataset output, and the logits are within 1e-4 of the
peer's own forward, both from `load_trained` on the imported directory and from `model.yaml` + `stage.init_from`."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medm.cli import main
from medm.config import load_yaml
from medm.data.annotations import load_records
from medm.data.dataset import DataArgs, build_dataset
from medm.data.templates import expand_media
from medm.models import build_model
from medm.train.checkpoint import load_init_weights, load_trained

FIXTURES = Path(__file__).parent / "fixtures"
IMAGE_ID, IMAGE3D_ID, IGNORE = -200, -201, -100  # the peers' placeholder ids

# case -> (import format, options beyond the base paths)
CASES = {
    "medmvl-2d-siglip": ("medm-vl", []),
    "medmvl193-2d-clip": ("medm-vl", []),
    "medmvl-ct-slices": ("medm-vl", ["--image3d-slices", "32"]),
    "medmvl193-ct-slices": ("medm-vl", ["--image3d-slices", "32"]),
    "medmvl193-3d-medmclip": ("medm-vl", []),
    "tinyllava-clip-finetune": ("tinyllava", []),
    "tinyllava-clip-pretrain": ("tinyllava", []),
    "tinyllava-siglip-finetune": ("tinyllava", []),
    "tinyllava-siglip-pretrain": ("tinyllava", []),
}
PRESENT = [c for c in CASES if (FIXTURES / c / "expected.json").is_file()]


def _bases(case: Path) -> list[str]:
    bases = sorted(p for p in (case / "bases").iterdir())
    llm = next(p for p in bases if "qwen2" in p.name)
    enc = next(p for p in bases if p != llm)
    return ["--llm-path", str(llm), "--encoder3d-path" if enc.name == "medmclip" else "--encoder-path", str(enc)]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    done = {}

    def get(name):
        if name not in done:
            case = FIXTURES / name
            fmt, options = CASES[name]
            out = tmp_path_factory.mktemp(name) / "imported"
            assert main(["import", fmt, str(case / "checkpoint"), str(out)] + _bases(case) + options) == 0
            model, tok = load_trained(str(out))
            rebuilt, tok2 = build_model(load_yaml(str(out / "model.yaml")))
            load_init_weights(rebuilt, str(out))
            done[name] = (case, out, model.eval(), tok, rebuilt.eval(), tok2)
        return done[name]

    return get


def _collapse(ids, labels, image_id, image3d_id):
    """medm's expanded media runs back to one peer placeholder (-200 / -201) each, labels alike."""
    out_ids, out_labels = [], []
    for i, (t, lab) in enumerate(zip(ids, labels)):
        if t in (image_id, image3d_id):
            if i and ids[i - 1] == t:
                continue
            out_ids.append(IMAGE_ID if t == image_id else IMAGE3D_ID)
            out_labels.append(IGNORE)
        else:
            out_ids.append(t)
            out_labels.append(lab)
    return out_ids, out_labels


@pytest.mark.parametrize("name", PRESENT)
def test_peer_records_prompts_ids_labels_and_logits(imported, name):
    case, out, model, tok, rebuilt, _ = imported(name)
    expected = json.loads((case / "expected.json").read_text())["records"]
    tensors = load_file(str(case / "expected.safetensors"))
    data = case / "data"
    ds = build_dataset(DataArgs(path=str(data / "records.json"), image_dir=str(data)), model, tok)
    fmt = ds.format
    cfg = model.config
    records = load_records(str(data / "records.json"))
    assert len(ds) == len(records)
    for i, rec in enumerate(records):
        item = ds[i]
        for mode in ("train", "eval"):
            want = expected[f"{rec.id}/{mode}"]
            msgs = fmt.messages(rec)
            if mode == "train":
                assert fmt.render(msgs) == want["prompt"], rec.id
                ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
                got_ids, got_labels = _collapse(ids, labels, cfg.image_token_id, cfg.image3d_token_id)
                assert got_ids == want["input_ids"], rec.id
                assert got_labels == want["labels"], rec.id
            else:
                assert fmt.render(msgs[:-1], add_generation_prompt=True) == want["prompt"], rec.id
                ids, _, _ = expand_media(fmt.encode_prompt(rec), None, ds.sizes, 10**6)
                got_ids, _ = _collapse(ids, [0] * len(ids), cfg.image_token_id, cfg.image3d_token_id)
                assert got_ids == want["input_ids"], rec.id
            # The peers' pixels (float32 rounding apart: the same resampling, the same uint8 levels for CT).
            pixels, pixels3d = item["pixel_values"], item["pixel_values_3d"]
            if f"{rec.id}/image" in tensors:
                torch.testing.assert_close(pixels, tensors[f"{rec.id}/image"], atol=1e-5, rtol=0)
            if f"{rec.id}/image3d" in tensors:
                want3d = tensors[f"{rec.id}/image3d"]  # one channel: the peer's three are copies
                torch.testing.assert_close(pixels3d, want3d.expand_as(pixels3d), atol=1e-5, rtol=0)
            if f"{rec.id}/image3d_strided" in tensors:  # MedM-CLIP-CT's 32 x 256 x 256: a sample and the sum
                torch.testing.assert_close(pixels3d[..., ::2, ::16, ::16], tensors[f"{rec.id}/image3d_strided"],
                                           atol=1e-5, rtol=0)
                # float32 rounding only: under 1e-6 per voxel on average
                assert abs(pixels3d.double().sum() - tensors[f"{rec.id}/image3d_sum"][0]) < 1e-6 * pixels3d.numel()
            theirs, length = tensors[f"{rec.id}/{mode}/logits"], int(tensors[f"{rec.id}/{mode}/length"])
            assert len(ids) == length  # the placeholders expand to as many features as the peer inserts
            for which, m in (("load_trained", model), ("model.yaml + stage.init_from", rebuilt)):
                with torch.no_grad():
                    logits = m(input_ids=torch.tensor([ids]), pixel_values=pixels, pixel_values_3d=pixels3d).logits[0]
                torch.testing.assert_close(logits[-len(theirs):, :theirs.shape[1]], theirs, atol=1e-4, rtol=0,
                                           msg=lambda m, w=which: f"{name} {rec.id} {mode} via {w}: {m}")


def test_llava_hf_importer_takes_the_transformers_4x_layout(tmp_path):
    """A LLaVA-hf checkpoint saved by transformers 4.42 (`language_model.model.*`, `vision_tower.vision_model.*`):
    transformers' own conversion maps it on load; medm's import gives the 4.x model's ids, pixels and logits."""
    from PIL import Image

    from medm.infer.generate import Predictor

    case = FIXTURES / "llava-hf-4x"
    if not (case / "expected.json").is_file():
        pytest.skip("fixture not generated")
    keys = json.loads((case / "expected.json").read_text())["keys"]
    assert all(k.startswith(("language_model.", "vision_tower.vision_model.", "multi_modal_projector.")) for k in keys)
    want = load_file(str(case / "expected.safetensors"))
    out = tmp_path / "imported"
    assert main(["import", "llava-hf", str(case), str(out)]) == 0
    model, tok = load_trained(str(out))
    pred = Predictor(model.eval(), tok)
    ids = pred.encode([{"role": "user", "content": "<image>\nIs there a lesion?"}])
    image_id = model.config.image_token_id
    # transformers 4.42's processor leaves one <image> id, which its model expands: collapse medm's run to compare.
    collapsed = [t for i, t in enumerate(ids) if not (t == image_id and i and ids[i - 1] == image_id)]
    assert collapsed == want["input_ids"].tolist()
    pixels = pred.images([Image.open(case / "image.png")])
    torch.testing.assert_close(pixels, want["pixel_values"], atol=1e-5, rtol=0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
    theirs = want["logits"]
    assert logits.shape[0] == theirs.shape[0]
    torch.testing.assert_close(logits[:, :theirs.shape[1]], theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, default", [("medmvl-ct-slices", "hu"), ("medmvl193-ct-slices", "stored")])
def test_ct_intensity_follows_the_medm_vl_version(imported, tmp_path, name, default):
    """--ct-intensity defaults from the config format (b1b0770 brought the `lvlm_` keys and the HU clipping); the
    option overrides it; HU read as stored uint8 is refused naming the file and the other setting."""
    from medm.data._medm_vl_ct import medm_vl_volume
    from medm.data.volumes import VolumeLoadError

    case, out, model, *_ = imported(name)
    assert model.config.vision3d["medm_vl_ct"] == default
    assert load_yaml(str(out / "model.yaml"))["vision3d"]["medm_vl_ct"] == default
    other = "stored" if default == "hu" else "hu"
    fmt, options = CASES[name]
    assert main(["import", fmt, str(case / "checkpoint"), str(tmp_path / "o")] + _bases(case) + options
                + ["--ct-intensity", other]) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["vision3d"]["medm_vl_ct"] == other
    hu = FIXTURES / "medmvl-ct-slices" / "data" / "ct_hu.npy"
    with pytest.raises(VolumeLoadError, match=r"ct_hu\.npy.*span -1024\.\.1399.*medm_vl_ct: hu"):
        medm_vl_volume(hu, (32, 32, 32), "stored")
    png = FIXTURES / "medmvl-2d-siglip" / "data" / "img0.png"
    with pytest.raises(VolumeLoadError, match=r"img0\.png.*read MedM-VL's \.npy volumes"):
        medm_vl_volume(png, (32, 32, 32), "hu")


def test_medm_train_from_the_imported_model_yaml_keeps_the_peer_logits(imported, tmp_path):
    """`medm train model=OUT/model.yaml stage.init_from=OUT` on the peer's records (learning rate 0): the trained
    checkpoint still gives MedM-VL's logits, its re-initialised head kept apart from the embeddings."""
    from medm.train.args import parse_train_config
    from medm.train.trainer import run_training

    name = "medmvl-2d-siglip"
    case, out, *_ = imported(name)
    assert json.loads((case / "expected.json").read_text())["lm_head_equals_embeddings"] is False
    assert load_yaml(str(out / "model.yaml"))["llm"]["config"]["tie_word_embeddings"] is False
    data = case / "data"
    cfg = parse_train_config({
        "model": load_yaml(str(out / "model.yaml")),
        "stage": {"init_from": str(out), "vision": "full", "connector": "full", "llm": "full"},
        "data": {"path": str(data / "records.json"), "image_dir": str(data), "max_length": 1024},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 1,
                  "learning_rate": 0.0, "weight_decay": 0.0, "warmup_steps": 0, "logging_steps": 1,
                  "save_strategy": "no", "report_to": [], "disable_tqdm": True, "device": "cpu", "plot_loss": False}})
    assert run_training(cfg).state.global_step == 1
    model, tok = load_trained(str(tmp_path / "run"))
    ds = build_dataset(DataArgs(path=str(data / "records.json"), image_dir=str(data)), model.eval(), tok)
    tensors = load_file(str(case / "expected.safetensors"))
    item = ds[0]
    theirs = tensors["r2d/train/logits"]
    with torch.no_grad():
        logits = model(input_ids=item["input_ids"][None], pixel_values=item["pixel_values"]).logits[0]
    torch.testing.assert_close(logits[-len(theirs):, :theirs.shape[1]], theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("commit, steps, volume", [("225fc0f", "hu", "ct_hu.npy"), ("193feb7", "stored", "ct_u8.npy")])
@pytest.mark.parametrize("route", ["m3d", "medm-clip-ct"])
def test_3d_encoder_volumes_match_medm_vl_processors(commit, steps, volume, route):
    """vit3d with `medm_vl_ct` reads a CT .npy as MedM-VL's dataset + the M3D-CLIP / MedM-CLIP-CT Image3DProcessor
    do at each commit (225fc0f clips HU first; 193feb7 takes the stored values), to float rounding."""
    from medm.models.vision.vit3d import FORMAT_SWITCHES
    from medm.registry import VISION

    case = FIXTURES / "medmvl-3d-processors"
    want = load_file(str(case / "expected.safetensors"))
    key = f"{commit}/{route}/{volume}"
    section = {"image_size": [32, 256, 256], "patch_size": [8, 32, 32], "hidden_size": 16, "num_layers": 1,
               "num_heads": 2, "mlp_dim": 16, **FORMAT_SWITCHES[route], "checkpoint_format": route,
               "medm_vl_ct": steps}
    x = VISION.get("vit3d").preprocessor(section)(case / "data" / volume)
    assert list(x.shape) == want[key + "/shape"].tolist()
    torch.testing.assert_close(x[..., ::2, ::16, ::16], want[key + "/strided"], atol=1e-5, rtol=0)
    assert abs(x.double().sum() - want[key + "/sum"][0]) < 1e-6 * x.numel()


def test_a_saved_head_equal_to_the_embeddings_stays_tied(tmp_path):
    """The other side of the tied-head rule: a saved lm_head that equals the embeddings (one tensor saved twice)
    imports tied, and both ways of reopening agree."""
    import shutil

    from safetensors.torch import save_file

    case = FIXTURES / "medmvl-2d-siglip"
    src = tmp_path / "src"
    shutil.copytree(case / "checkpoint", src)
    state = load_file(str(src / "model.safetensors"))
    state["llm.lm_head.weight"] = state["llm.model.embed_tokens.weight"].clone()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(["import", "medm-vl", str(src), str(out)] + _bases(case)) == 0
    model, _ = load_trained(str(out))
    assert model.config.text_config.tie_word_embeddings is True
    assert model.llm.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    rebuilt, _ = build_model(load_yaml(str(out / "model.yaml")))
    load_init_weights(rebuilt, str(out))
    ids = torch.tensor([[5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
