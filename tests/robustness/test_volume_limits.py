"""Volumes that would take a machine down or kill a run (issue 26 items 3 and 7): a size read from the header
(NIfTI, .npy, DICOM rows x columns x slices) above `volume.max_voxels` is refused before decoding, in validation,
training, inference and the playground; a NIfTI with a singular affine is a `VolumeLoadError` naming the file
(a bad sample in training, a clear message in the playground), and so is any failure inside the preprocessing."""

import copy
import gzip
import json
import logging
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from medm.data.annotations import load_records, parse_record
from medm.data.cli import validate_files
from medm.data.dataset import ConversationDataset
from medm.data.volumes import DEFAULT_MAX_VOXELS, VolumeLoadError, VolumePreprocess, read_volume
from medm.infer.generate import Predictor
from medm.playground import UploadError, open_upload


def _bomb(path, shape=(1024, 1024, 1024)):
    """A 1024^3 uint8 NIfTI header with (almost) no data: what a 1 MB .nii.gz of zeros declares."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    hdr.set_sform(np.eye(4), code=1)
    with gzip.open(path, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4 + bytes(1024))
    return path


def _singular(path):
    img = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), np.eye(4))
    img.header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)  # a zero slice thickness
    img.header.set_qform(None, code=0)
    img.update_header = lambda: None  # keep the header as set (nibabel would rebuild it from the affine)
    nib.save(img, path)
    return path


def _records(tmp_path, names):
    recs = [{"id": f"v{i}", "image3d": [name], "conversations": [
        {"from": "human", "value": "<image3d>\nNormal?"}, {"from": "gpt", "value": "yes"}]} for i, name in
        enumerate(names)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(recs))
    return path


def test_voxel_limit_is_read_from_the_header_before_decoding(tmp_path):
    big = _bomb(tmp_path / "big.nii.gz")
    with pytest.raises(VolumeLoadError, match=rf"big.nii.gz'.*1024x1024x1024 = 1,073,741,824 voxels, above the "
                                              rf"limit of {DEFAULT_MAX_VOXELS:,}"):
        read_volume(big)  # the data is 1 kB short of 1 GB: refused from the header, never read
    # .npy: the header says (600, 512, 512); the data is never read either.
    with open(tmp_path / "big.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i2", "fortran_order": False, "shape": (600, 512, 512)})
    with pytest.raises(VolumeLoadError, match=r"big.npy'.*600x512x512 = 157,286,400 voxels, above the limit of "
                                              r"100,000,000"):
        read_volume(tmp_path / "big.npy", max_voxels=100_000_000)
    # A DICOM series: rows x columns x slices (128 x 128 x 3), from the slice headers.
    folder = tmp_path / "ct"
    folder.mkdir()
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for i in range(3):
        ds = copy.deepcopy(base)
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * i]
        ds.save_as(folder / f"s{i}.dcm")
    with pytest.raises(VolumeLoadError, match=r"ct'.*128x128x3 = 49,152 voxels, above the limit of 40,000"):
        read_volume(folder, max_voxels=40_000)
    assert read_volume(folder)[0].shape == (128, 128, 3)


def test_voxel_limit_applies_in_validate_training_inference_and_the_playground(tmp_path, tiny_model, caplog):
    _bomb(tmp_path / "big.nii.gz")
    np.save(tmp_path / "ok.npy", np.zeros((4, 8, 8), np.uint8))
    data = _records(tmp_path, ["big.nii.gz", "ok.npy"])
    report = validate_files([str(data)], str(tmp_path))
    assert len(report.good) == 1 and "above the limit" in str(report.failures["corrupt_image"][0])

    # Training (the model's volume.max_voxels) skips and counts the sample.
    _, tok = tiny_model
    pre = VolumePreprocess({"intensity": "uint8", "max_voxels": 1000}, (4, 8, 8))
    np.save(tmp_path / "mid.npy", np.zeros((16, 16, 16), np.uint8))  # 4096 voxels: above this model's 1000
    ds = ConversationDataset(load_records(str(_records(tmp_path, ["mid.npy", "ok.npy"]))), tok, num_image_tokens=16,
                             num_image3d_tokens=2, volume_preprocess=pre, image_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="medm.data.dataset"):
        item = ds[0]
    assert ds.bad_samples.count == 1 and item["pixel_values_3d"].shape == (1, 1, 4, 8, 8)
    assert "mid.npy" in caplog.text and "above the limit of 1,000" in caplog.text

    # Inference: the Predictor's volume step raises the same error naming the file.
    predictor = SimpleNamespace(volume_preprocess=pre, image_dir=str(tmp_path))
    with pytest.raises(VolumeLoadError, match=r"mid.npy'.*above the limit of 1,000"):
        Predictor.volumes(predictor, ["mid.npy"])
    assert Predictor.volumes(predictor, ["ok.npy"]).shape == (1, 1, 4, 8, 8)

    # The playground (default limit): a clear upload error, no 6 GB allocation.
    with pytest.raises(UploadError, match=r"'big.nii.gz'.*above the limit of"):
        open_upload(tmp_path / "big.nii.gz", work_dir=tmp_path / "work")


def test_singular_affine_is_a_named_error_and_a_bad_sample(tmp_path, tiny_model, caplog):
    path = _singular(tmp_path / "flat.nii.gz")
    assert nib.load(path).affine[2, 2] == 0
    with pytest.raises(VolumeLoadError, match=r"flat.nii.gz'.*affine \(voxel -> world matrix\) is singular"):
        VolumePreprocess({}, (4, 8, 8))(path)
    np.save(tmp_path / "ok.npy", np.zeros((4, 8, 8), np.float32))
    data = _records(tmp_path, ["flat.nii.gz", "ok.npy"])
    report = validate_files([str(data)], str(tmp_path))  # validate catches what training would fail on
    assert [e.record_id for e in report.failures["corrupt_image"]] == ["v0"]

    _, tok = tiny_model
    ds = ConversationDataset(load_records(str(data)), tok, num_image_tokens=16, num_image3d_tokens=2,
                             volume_preprocess=VolumePreprocess({}, (4, 8, 8)), image_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="medm.data.dataset"):
        ds[0]
    assert ds.bad_samples.count == 1 and "flat.nii.gz" in caplog.text and "singular" in caplog.text

    with pytest.raises(UploadError, match=r"'flat.nii.gz'.*singular"):
        open_upload(path, work_dir=tmp_path / "work")


def test_errors_inside_preprocessing_name_the_file(tmp_path, tiny_model, caplog, monkeypatch):
    """A failure in a MONAI / torch step becomes a VolumeLoadError / ImageLoadError naming the file (and a skipped
    sample), not a bare exception that ends the run."""
    from PIL import Image

    from medm.data._media import image_tensor
    from medm.data.images import ImageLoadError

    np.save(tmp_path / "v.npy", np.zeros((4, 8, 8), np.float32))
    pre = VolumePreprocess({"intensity": "none"}, (4, 8, 8))

    def broken(*a, **k):
        raise ValueError("Unable to find out axis 2.0 in start_ornt")

    monkeypatch.setattr("monai.transforms.Resize.__call__", broken)
    with pytest.raises(VolumeLoadError, match=r"v.npy'.*preprocessing failed \(ValueError: Unable to find out axis"):
        pre(tmp_path / "v.npy")

    Image.new("L", (8, 8)).save(tmp_path / "i.png")
    with pytest.raises(ImageLoadError, match=r"i.png'.*preprocessing failed \(RuntimeError: boom"):
        image_tensor(lambda im: (_ for _ in ()).throw(RuntimeError("boom")), str(tmp_path / "i.png"))
    rec = parse_record({"id": "p", "image": ["i.png"], "conversations": [
        {"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]}, "x")
    ok = parse_record({"id": "q", "image": ["i.png"], "conversations": [
        {"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "n"}]}, "x")
    calls = []

    def flaky(im):  # fails on the first image only
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return torch.zeros(3, 8, 8)

    _, tok = tiny_model
    ds = ConversationDataset([rec, ok], tok, num_image_tokens=4, image_preprocess=flaky, image_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="medm.data.dataset"):
        ds[0]
    assert ds.bad_samples.count == 1 and "i.png" in caplog.text and "boom" in caplog.text
