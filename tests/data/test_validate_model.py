"""`medm data validate --model CONFIG_OR_CHECKPOINT`: every file goes through that model's own 2D and 3D
preprocessing, so what validates is what trains; without --model the output says only decoding was checked."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medm.cli import main
from medm.config import load_yaml
from medm.data._media import load_model_media
from medm.models import build_model, save_model
from medm.models.tiny import tiny_model_config

REPO = Path(__file__).resolve().parents[2]
REPO_TINY_3D = "configs/model/tiny-3d.yaml"  # vit3d 16 x 32 x 32, volume.intensity: uint8


def _files(tmp_path):
    ct = np.full((12, 10, 8), -1000, np.int16)
    ct[3:9, 3:7, 2:6] = 40
    nib.save(nib.Nifti1Image(ct, np.eye(4)), tmp_path / "ct.nii.gz")  # HU: decodes, but not uint8
    np.save(tmp_path / "u8.npy", np.full((8, 16, 16), 200, np.uint8))
    Image.new("L", (16, 16), 80).save(tmp_path / "xray.png")
    turns = lambda tag: [{"from": "human", "value": f"{tag}\nNormal?"}, {"from": "gpt", "value": "yes"}]  # noqa: E731
    items = [{"id": "hu", "image3d": ["ct.nii.gz"], "conversations": turns("<image3d>")},
             {"id": "u8", "image3d": ["u8.npy"], "conversations": turns("<image3d>")},
             {"id": "xr", "image": ["xray.png"], "conversations": turns("<image>")}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(items))
    return str(path)


def test_without_model_only_decoding_is_checked_and_said(tmp_path, capsys):
    path = _files(tmp_path)
    assert main(["data", "validate", path, "--image-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 good, 0 bad" in out and "decoding only" in out and "--model" in out


def test_with_a_model_config_its_volume_settings_refuse_what_training_would(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    path = _files(tmp_path)
    rc = main(["data", "validate", path, "--image-dir", str(tmp_path), "--model", REPO_TINY_3D])
    out = capsys.readouterr().out
    assert rc == 1 and "1 good, 2 bad" in out and "through the preprocessing of configs/model/tiny-3d.yaml" in out
    # The HU CT fails the model's intensity: uint8 (training would skip it), naming the file; the 2D image fails
    # because this model has no 2D encoder.
    assert "ct.nii.gz" in out and "uint8 expects values in 0..255" in out
    assert "corrupt_image: 2" in out and "hu" in out and "xr" in out
    media = load_model_media(REPO_TINY_3D)
    assert media.image is None and tuple(media.volume(str(tmp_path / "u8.npy")).shape) == (1, 16, 32, 32)


def test_with_a_checkpoint_both_towers_are_applied(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = tiny_model_config()
    tiny3d = load_yaml(str(REPO / REPO_TINY_3D))
    cfg["vision3d"], cfg["connector3d"] = tiny3d["vision3d"], tiny3d["connector3d"]
    model, tok = build_model(cfg)
    ckpt = tmp_path / "ckpt"
    save_model(model, tok, str(ckpt))
    path = _files(tmp_path)
    rc = main(["data", "validate", path, "--image-dir", str(tmp_path), "--model", str(ckpt)])
    out = capsys.readouterr().out
    assert rc == 1 and "2 good, 1 bad" in out and "ct.nii.gz" in out  # the PNG passes the 2D tower
    media = load_model_media(str(ckpt))
    assert media.image is not None and media.volume is not None
    with pytest.raises(ValueError, match="uint8 expects"):
        media.volume(str(tmp_path / "ct.nii.gz"))


def test_a_bad_model_argument_is_an_error_exit(tmp_path, capsys):
    path = _files(tmp_path)
    assert main(["data", "validate", path, "--model", str(tmp_path / "nowhere.yaml")]) == 2
    assert "nowhere.yaml" in capsys.readouterr().err


def test_a_train_config_is_read_for_its_model_section(tmp_path, monkeypatch):
    # A train YAML naming its model file (relative to the YAML's folder) gives that model's preprocessing; its
    # training settings are `medm train`'s to check, so an output_dir that could never be created does not matter.
    monkeypatch.chdir(REPO)
    np.save(tmp_path / "u8.npy", np.full((8, 16, 16), 200, np.uint8))
    (tmp_path / "model.yaml").write_text((REPO / REPO_TINY_3D).read_text())
    (tmp_path / "blocker").write_text("a file")
    train = tmp_path / "train.yaml"
    train.write_text(f"model: model.yaml\ntrain:\n  output_dir: {tmp_path / 'blocker' / 'run'}\n")
    media = load_model_media(str(train))
    assert media.image is None and tuple(media.volume(str(tmp_path / "u8.npy")).shape) == (1, 16, 32, 32)
    (tmp_path / "train.yaml").write_text("model: missing.yaml\n")
    with pytest.raises(ValueError, match=r"train.yaml: model file 'missing.yaml' not found"):
        load_model_media(str(train))
