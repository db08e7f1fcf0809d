"""3D volumes: NIfTI (real CT / MR in RAS, LPS, LAS, int16 / int32 / big-endian), .npy, DICOM series; orientation,
spacing, intensity modes, foreground crop, augmentation, the disk cache, and errors that name the file."""

import copy
import json
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

import medm.data.volumes as volumes
from medm.data.volumes import VolumeArgs, VolumeLoadError, VolumePreprocess, read_volume

# pydicom ships a 4-slice CT series (16 x 16 px) in its DICOMDIR test tree.
CT_SERIES = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "77654033" / "CT2"
NIFTI = {  # name: (axis codes of the file, intensity mode)
    "example_ct.nii.gz": ("RAS", "window"),  # int32 HU
    "example_ct_sm.nii.gz": ("RAS", "window"),  # int16 HU
    "aorta_ct_cropped.nii.gz": ("LPS", "window"),
    "example_mr_sm.nii.gz": ("LPS", "minmax"),
    "anatomical.nii": ("LAS", "minmax"),  # big-endian int16 MR
}


def _canonical(path):
    """Independent reference: nibabel's RAS reorientation, as float, depth first (Z, Y, X)."""
    return nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32).transpose(2, 1, 0)


def _nifti(path, data, zooms=(1.0, 1.0, 1.0), affine=None):
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]) if affine is None else affine)
    nib.save(img, str(path))
    return str(path)


# ---- real volumes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(NIFTI))
def test_real_nifti_loads_to_the_encoder_size_in_range(shared_data, name):
    codes, mode = NIFTI[name]
    path = shared_data / "nifti" / name
    assert "".join(nib.aff2axcodes(nib.load(path).affine)) == codes
    x = VolumePreprocess({"intensity": mode}, (8, 24, 20))(path)
    assert x.shape == (1, 8, 24, 20) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    if mode == "window":  # air (< -1000 HU) clips to 0; bone and contrast lie above soft tissue (0.5 .. 0.55)
        assert x.min() == 0 and x.max() > 0.6
    else:
        assert x.min() < 0.1 and x.max() > 0.5


@pytest.mark.parametrize("name", ["example_ct_sm.nii.gz", "example_mr_sm.nii.gz", "anatomical.nii"])
def test_orientation_matches_nibabel_canonical(shared_data, name):
    path = shared_data / "nifti" / name
    ref = _canonical(path)
    # The output size equals the reoriented shape, so resizing changes nothing and voxels compare one to one.
    x = VolumePreprocess({"intensity": "none"}, ref.shape)(path)
    np.testing.assert_allclose(x[0].numpy(), ref, rtol=1e-6, atol=1e-3)
    # LPS: the same volume with rows and columns reversed (radiological view).
    lps = VolumePreprocess({"intensity": "none", "orientation": "LPS"}, ref.shape)(path)
    np.testing.assert_allclose(lps[0].numpy(), ref[:, ::-1, ::-1], rtol=1e-6, atol=1e-3)


def test_pydicom_ct_series_reads_sorted_by_position_with_rescale():
    if not CT_SERIES.is_dir():
        pytest.skip(f"pydicom's test series is not installed at {CT_SERIES}")
    files = sorted(p for p in CT_SERIES.iterdir())
    slices = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    with pytest.warns(UserWarning, match="slice spacing is irregular"):
        array, affine = read_volume(CT_SERIES)
    assert array.shape == (16, 16, 4)
    for k, ds in enumerate(slices):  # (columns, rows, slice); HU = stored - 1024
        np.testing.assert_array_equal(array[:, :, k], ds.pixel_array.T.astype(np.float32) - 1024)
    assert "".join(nib.aff2axcodes(affine)) == "LPS"  # DICOM rows go to +x (patient left), columns to +y
    np.testing.assert_allclose(np.diag(affine)[:2], [-0.488281, -0.488281])
    with pytest.warns(UserWarning, match="irregular"):
        x = VolumePreprocess({}, (4, 16, 16))(CT_SERIES)
    assert x.shape == (1, 4, 16, 16) and 0 <= x.min() and x.max() <= 1


def _write_series(folder, positions, instance_numbers, intercepts, uid="1.2.3.4", names=None, geometry=True):
    """Slices from CT_small.dcm: slice i holds 10 * i + 100 everywhere, at z = positions[i]."""
    folder.mkdir(exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for i, (z, n, b) in enumerate(zip(positions, instance_numbers, intercepts)):
        ds = copy.deepcopy(base)
        ds.ImagePositionPatient = [-158.0, -179.0, float(z)]
        if not geometry:
            del ds.ImagePositionPatient
            del ds.ImageOrientationPatient
        ds.InstanceNumber = n
        ds.RescaleIntercept = b
        ds.SeriesInstanceUID = uid
        arr = np.full((128, 128), 10 * i + 100, dtype=np.int16)
        arr[0, :5] = 0  # a marker in the first row, to check the row / column axes
        ds.PixelData = arr.tobytes()
        ds.save_as(folder / (names[i] if names else f"s{i}.dcm"))
    return folder


def test_dicom_series_sorted_by_position_not_instance_number_or_name(tmp_path):
    # File names and instance numbers both run against the slice positions.
    folder = _write_series(tmp_path / "ct", positions=[20.0, 10.0, 0.0], instance_numbers=[1, 2, 3],
                           intercepts=[-1024, -1000, -1024], names=["a.dcm", "b.dcm", "c.dcm"])
    (folder / "README.txt").write_text("not dicom")  # skipped
    array, affine = read_volume(folder)
    assert array.shape == (128, 128, 3)
    # Inferior first: z = 0 (stored 120, intercept -1024), 10 (110 - 1000), 20 (100 - 1024).
    np.testing.assert_array_equal(array[5:, 5:, :].reshape(-1, 3)[0], [120 - 1024, 110 - 1000, 100 - 1024])
    assert array[:5, 0, 0].tolist() == [-1024.0] * 5  # the marker: first row, first 5 columns -> axis 0 is columns
    np.testing.assert_allclose(affine[:3, 2], [0, 0, 10.0])
    np.testing.assert_allclose(affine[:3, 3], [158.0, 179.0, 0.0])  # LPS origin of the first slice, in RAS


def test_dicom_series_without_geometry_sorts_by_instance_number(tmp_path):
    folder = _write_series(tmp_path / "ct", positions=[0, 0, 0], instance_numbers=[3, 1, 2], intercepts=[0, 0, 0],
                           geometry=False)
    with pytest.warns(UserWarning, match="sorted by InstanceNumber, spacing from SliceThickness"):
        array, affine = read_volume(folder)
    np.testing.assert_array_equal(array[5:, 5:, :].reshape(-1, 3)[0], [110, 120, 100])  # instance 1, 2, 3
    np.testing.assert_allclose(affine[:3, 2], [0, 0, 5.0])  # CT_small's SliceThickness


def test_dicom_series_errors_name_the_folder(tmp_path):
    two = _write_series(tmp_path / "two", [0.0, 5.0], [1, 2], [0, 0])
    _write_series(two, [10.0], [3], [0], uid="9.9.9", names=["other.dcm"])
    with pytest.raises(VolumeLoadError, match=r"two'.*holds 2 DICOM series"):
        read_volume(two)
    same = _write_series(tmp_path / "same", [0.0, 0.0], [1, 2], [0, 0])
    with pytest.raises(VolumeLoadError, match="lie at the same position .*4D series"):
        read_volume(same)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(VolumeLoadError, match=r"empty'.*no DICOM image files"):
        read_volume(empty)


# ---- .npy, intensity, shape rules --------------------------------------------------------------------------------
def test_npy_is_depth_first_and_intensity_modes(tmp_path):
    vol = np.arange(4 * 6 * 5, dtype=np.uint8).reshape(4, 6, 5)
    np.save(tmp_path / "u8.npy", vol[None])  # M3D's (1, D, H, W): the leading axis is dropped
    # orientation does not apply to .npy (no geometry): axes stay as stored.
    x = VolumePreprocess({"intensity": "uint8", "orientation": "LPS"}, (4, 6, 5))(tmp_path / "u8.npy")
    torch.testing.assert_close(x[0], torch.from_numpy(vol.astype(np.float32) / 255))

    hu = np.array([-2000, -1000, 0, 500, 1000, 3000], dtype=np.int16).reshape(1, 2, 3)
    np.save(tmp_path / "hu.npy", hu)
    x = VolumePreprocess({}, (1, 2, 3))(tmp_path / "hu.npy")
    torch.testing.assert_close(x.flatten(), torch.tensor([0, 0, 0.5, 0.75, 1, 1]))
    x = VolumePreprocess({"window": "brain"}, (1, 2, 3))(tmp_path / "hu.npy")  # (40, 80): 0..80 HU
    torch.testing.assert_close(x.flatten(), torch.tensor([0, 0, 0, 1, 1, 1.0]))
    x = VolumePreprocess({"intensity": "standardize", "standardize": [500, 1000]}, (1, 2, 3))(tmp_path / "hu.npy")
    torch.testing.assert_close(x.flatten(), torch.tensor([-2.5, -1.5, -0.5, 0, 0.5, 2.5]))
    x = VolumePreprocess({"intensity": "minmax"}, (1, 2, 3))(tmp_path / "hu.npy")
    torch.testing.assert_close(x.flatten(), torch.tensor([0, 0.2, 0.4, 0.5, 0.6, 1.0]))
    with pytest.raises(VolumeLoadError, match=r"hu.npy'.*uint8 expects values in 0..255.*-2000..3000"):
        VolumePreprocess({"intensity": "uint8"}, (1, 2, 3))(tmp_path / "hu.npy")


def test_minmax_percentiles_clip_outliers(tmp_path):
    vol = np.zeros((10, 10, 10), dtype=np.float32)
    vol.flat[:] = np.arange(1000)
    vol[0, 0, 0] = 1e6  # one hot voxel would squash min-max
    np.save(tmp_path / "mr.npy", vol)
    x = VolumePreprocess({"intensity": "minmax", "percentiles": [0, 99]}, (10, 10, 10))(tmp_path / "mr.npy")
    assert x.max() == 1 and float(x[0, 5, 0, 0]) == pytest.approx(500 / np.percentile(vol, 99), rel=1e-3)


def test_four_d_and_two_d_arrays(tmp_path):
    data = np.random.default_rng(0).normal(size=(6, 5, 4, 1)).astype(np.float32)
    x, _ = read_volume(_nifti(tmp_path / "one.nii.gz", data))
    assert x.shape == (6, 5, 4)  # the singleton 4th axis is squeezed
    with pytest.raises(VolumeLoadError, match=r"four.nii.gz'.*\(6, 5, 4, 2\) is 4D"):
        read_volume(_nifti(tmp_path / "four.nii.gz", np.zeros((6, 5, 4, 2), np.float32)))
    np.save(tmp_path / "two_ch.npy", np.zeros((2, 4, 5, 6), np.float32))
    with pytest.raises(VolumeLoadError, match=r"two_ch.npy'.*4D"):
        read_volume(tmp_path / "two_ch.npy")
    np.save(tmp_path / "flat.npy", np.zeros((4, 5), np.float32))
    with pytest.raises(VolumeLoadError, match=r"flat.npy'.*not a 3D volume"):
        read_volume(tmp_path / "flat.npy")


def test_nonfinite_voxels_replaced_with_warning_or_error(tmp_path):
    vol = np.linspace(-100, 100, 27, dtype=np.float32).reshape(3, 3, 3)
    vol[0, 0, 0], vol[1, 1, 1], vol[2, 2, 2] = np.nan, np.inf, -np.inf
    np.save(tmp_path / "bad.npy", vol)
    with pytest.warns(UserWarning, match=r"bad.npy: 3 of 27 voxels are NaN or infinite"):
        x, _ = read_volume(tmp_path / "bad.npy")
    finite = vol[np.isfinite(vol)]
    assert x[0, 0, 0] == finite.min() and x[1, 1, 1] == finite.max() and x[2, 2, 2] == finite.min()
    with pytest.raises(VolumeLoadError, match=r"bad.npy'.*3 of 27 voxels are NaN or infinite"):
        VolumePreprocess({"nonfinite": "error"}, (3, 3, 3))(tmp_path / "bad.npy")


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(VolumeLoadError, match=r"nowhere.nii.gz'.*file not found"):
        read_volume(tmp_path / "nowhere.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(VolumeLoadError, match=r"empty.nii.gz'.*empty"):
        read_volume(tmp_path / "empty.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(VolumeLoadError, match=r"broken.nii.gz'.*not a readable NIfTI"):
        read_volume(tmp_path / "broken.nii.gz")
    (tmp_path / "scan.xyz").write_bytes(b"x")
    with pytest.raises(VolumeLoadError, match=r"scan.xyz'.*unsupported volume format"):
        read_volume(tmp_path / "scan.xyz")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(VolumeLoadError, match=r"obj.npy'.*not a readable .npy"):
        read_volume(tmp_path / "obj.npy")


def test_bad_settings_name_the_field():
    for bad, match in (({"intensity": "hu"}, "volume.intensity: 'hu' is not one of"),
                       ({"orientation": "RAX"}, "volume.orientation"),
                       ({"spacing": [1, 1]}, "volume.spacing"),
                       ({"intensity": "standardize"}, "volume.standardize: None"),
                       ({"window": [40, 0]}, "volume.window"),
                       ({"percentiles": [50, 10]}, "volume.percentiles")):
        with pytest.raises(ValueError, match=match):
            VolumeArgs(**bad)
    with pytest.raises(ValueError, match="windw: unknown key; did you mean window?"):
        VolumePreprocess({"windw": [0, 100]}, (4, 4, 4))
    with pytest.raises(ValueError, match="volume.rot90_prob: in-plane rotation needs a square"):
        VolumePreprocess({"augment": True}, (4, 8, 6))


# ---- spatial steps -----------------------------------------------------------------------------------------------
def test_spacing_is_depth_first_in_mm(tmp_path):
    # 6 x 10 x 4 voxels of 1 x 1 x 3 mm (RAS); each voxel holds its z in mm.
    z_mm = np.broadcast_to(np.arange(4, dtype=np.float32) * 3, (6, 10, 4)).copy()
    path = _nifti(tmp_path / "aniso.nii.gz", z_mm, zooms=(1.0, 1.0, 3.0))
    # [D, H, W] = [1.5, 1, 1] mm: the 9 mm from the first to the last slice centre in 1.5 mm steps = 7 slices;
    # the output size keeps that shape, so no resize follows.
    x = VolumePreprocess({"intensity": "none", "spacing": [1.5, 1.0, 1.0]}, (7, 10, 6))(path)
    np.testing.assert_allclose(x[0, :, 5, 3].numpy(), np.arange(7) * 1.5, atol=1e-4)  # a resampled linear ramp
    # Read as (x, y, z) instead, [1.5, 1, 1] would resample the 6 columns, not the depth, and the ramp would differ.
    other = VolumePreprocess({"intensity": "none", "spacing": [1.0, 1.0, 1.5]}, (7, 10, 6))(path)
    assert not np.allclose(other[0, :, 5, 3].numpy(), np.arange(7) * 1.5, atol=1e-2)


def test_crop_foreground_keeps_the_body_box(tmp_path):
    vol = np.zeros((8, 16, 16), dtype=np.float32)
    vol[2:6, 4:12, 8:16] = 1.0
    np.save(tmp_path / "body.npy", vol)
    x = VolumePreprocess({"intensity": "none", "crop_foreground": True}, (4, 8, 8))(tmp_path / "body.npy")
    torch.testing.assert_close(x, torch.ones(1, 4, 8, 8))
    plain = VolumePreprocess({"intensity": "none"}, (4, 8, 8))(tmp_path / "body.npy")
    assert plain.mean() < 0.5
    np.save(tmp_path / "air.npy", np.zeros((4, 4, 4), np.float32))
    with pytest.warns(UserWarning, match="air.npy: no voxel above foreground_threshold=0"):
        VolumePreprocess({"intensity": "none", "crop_foreground": True}, (4, 4, 4))(tmp_path / "air.npy")


def test_augmentation_only_in_training_and_seeded_from_torch(tmp_path):
    vol = np.random.default_rng(1).uniform(0, 255, size=(4, 8, 8)).astype(np.uint8)
    np.save(tmp_path / "v.npy", vol)
    args = {"intensity": "uint8", "augment": True, "flip_prob": 0.5}
    pre = VolumePreprocess(args, (4, 8, 8))
    plain = pre(tmp_path / "v.npy")
    torch.testing.assert_close(pre(tmp_path / "v.npy"), plain)  # not in training mode: deterministic
    train = pre.for_training()
    draws = []
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        draws.append(train(tmp_path / "v.npy"))
    torch.testing.assert_close(draws[0], draws[1])  # same torch seed, same augmentation
    assert any(not torch.equal(draws[0], d) for d in draws[2:])
    assert all(d.shape == (1, 4, 8, 8) and torch.isfinite(d).all() for d in draws)
    off = VolumePreprocess({"intensity": "uint8"}, (4, 8, 8)).for_training()
    torch.testing.assert_close(off(tmp_path / "v.npy"), plain)  # augment off: training mode changes nothing


# ---- cache -------------------------------------------------------------------------------------------------------
def test_cache_is_hit_on_the_second_pass(tmp_path, monkeypatch):
    data = np.random.default_rng(0).normal(size=(10, 12, 8)).astype(np.float32) * 500
    src = _nifti(tmp_path / "ct.nii.gz", data)
    calls = []
    real = volumes._read
    monkeypatch.setattr(volumes, "_read", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cache = tmp_path / "cache"
    pre = VolumePreprocess({"cache_dir": str(cache)}, (4, 8, 8))
    first = pre(src)
    second = pre(src)
    assert len(calls) == 1
    torch.testing.assert_close(first, second)
    files = os.listdir(cache)
    assert files == [pre.cache_key(src) + ".npy"]
    np.testing.assert_array_equal(np.load(cache / files[0]), first.numpy())
    # Augmentation settings act after the cache: same key, no new read.
    VolumePreprocess({"cache_dir": str(cache), "augment": True, "rot90_prob": 0.0}, (4, 8, 8)).for_training()(src)
    assert len(calls) == 1
    # Other settings or another size: a new entry.
    VolumePreprocess({"cache_dir": str(cache), "window": "lung"}, (4, 8, 8))(src)
    VolumePreprocess({"cache_dir": str(cache)}, (4, 8, 4))(src)
    assert len(calls) == 3 and len(os.listdir(cache)) == 3
    # The source changes (new mtime): recomputed.
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    pre(src)
    assert len(calls) == 4
    # A corrupt cache file is recomputed, not trusted.
    key_file = cache / (pre.cache_key(src) + ".npy")
    key_file.write_bytes(b"garbage")
    torch.testing.assert_close(pre(src), first)
    assert len(calls) == 5


def test_cache_key_covers_every_file_of_a_dicom_folder(tmp_path):
    folder = _write_series(tmp_path / "ct", [0.0, 5.0], [1, 2], [0, 0])
    pre = VolumePreprocess({"cache_dir": str(tmp_path / "cache")}, (2, 8, 8))
    before = pre.cache_key(folder)
    _write_series(folder, [10.0], [3], [0], names=["s9.dcm"])
    assert pre.cache_key(folder) != before


# ---- data validation decodes volumes -------------------------------------------------------------------------------
def test_validate_decodes_volumes(tmp_path, capsys):
    from medm.cli import main

    np.save(tmp_path / "ok.npy", np.zeros((4, 4, 4), np.float32))
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    _write_series(tmp_path / "series", [0.0, 5.0], [1, 2], [0, 0])
    turns = [{"from": "human", "value": "<image3d>\nAny lesion?"}, {"from": "gpt", "value": "No."}]
    items = [{"id": "npy", "image3d": ["ok.npy"], "conversations": turns},
             {"id": "dicom-folder", "image3d": ["series"], "conversations": turns},
             {"id": "broken", "image3d": ["bad.nii.gz"], "conversations": turns}]
    (tmp_path / "vol.json").write_text(json.dumps(items))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["data", "validate", str(tmp_path / "vol.json"), "--image-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1 and "2 good, 1 bad" in out
    assert "corrupt_image" in out and "broken" in out
