"""Volumes as real scans arrive: intensity by modality with warnings that name the file, oblique geometry resampled
to world axes, complex data, more formats (each written by the library that reads it), clear refusals."""

import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medm.data import _intensity
from medm.data.volumes import VolumeArgs, VolumeLoadError, VolumePreprocess, read_volume


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Intensity warnings come once per file and process; each test starts with none given."""
    _intensity._warned.clear()
    yield
    _intensity._warned.clear()


def _nifti(path, data, affine=None, descrip=None):
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    if descrip is not None:
        img.header["descrip"] = descrip
    nib.save(img, str(path))
    return str(path)


def _ct(shape=(12, 10, 8), seed=0):
    """A HU CT: air (-1000) around a soft-tissue body (0..80) with a bone (700)."""
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000, np.int16)
    vol[2:-2, 2:-2, 1:-1] = rng.integers(0, 80, size=(shape[0] - 4, shape[1] - 4, shape[2] - 2))
    vol[5:7, 4:6, 3:5] = 700
    return vol


def _mr(shape=(12, 10, 8), seed=0):
    """An MR: positive arbitrary units (0 outside, ~300..900 inside, one hot voxel)."""
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape, np.float32)
    vol[2:-2, 2:-2, 1:-1] = rng.uniform(300, 900, size=(shape[0] - 4, shape[1] - 4, shape[2] - 2))
    vol[6, 5, 4] = 20000
    return vol


def _messages(record):
    return [str(w.message) for w in record]


# ---- intensity by modality ---------------------------------------------------------------------------------------
def test_auto_is_the_default_and_windows_ct_but_scales_mr_by_percentiles(tmp_path):
    assert VolumeArgs().intensity == "auto"
    ct = _nifti(tmp_path / "ct.nii.gz", _ct())
    mr = _nifti(tmp_path / "mr.nii.gz", _mr())
    size = (8, 10, 12)  # the oriented shape: no resize, voxels compare one to one
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither file gives a warning
        x_ct = VolumePreprocess({}, size)(ct)
        x_mr = VolumePreprocess({}, size)(mr)
    window = VolumePreprocess({"intensity": "window"}, size)(ct)
    torch.testing.assert_close(x_ct, window)  # CT (air present) -> the HU window, -1000..1000 to 0..1
    assert float(x_ct.min()) == 0 and float(x_ct.max()) == pytest.approx(0.85)
    # MR -> per-volume 0.5 / 99.5 percentiles: the body spans most of [0, 1], the hot voxel is clipped.
    lo, hi = np.percentile(_mr(), [0.5, 99.5])
    ref = np.clip((_mr() - lo) / (hi - lo), 0, 1).transpose(2, 1, 0)
    np.testing.assert_allclose(x_mr[0].numpy(), ref, atol=0.02)
    body = x_mr[0, 1:-1, 2:-2, 2:-2]
    assert float(body.min()) < 0.5 < 0.9 < float(body.max())
    # The HU window would squash this MR into a narrow band (the "0.50 .. 0.75").
    with pytest.warns(UserWarning):
        squashed = VolumePreprocess({"intensity": "window"}, size)(mr)
    assert float(squashed[0, 1:-1, 2:-2, 2:-2].min()) > 0.6


def test_auto_takes_the_modality_from_the_record_the_description_or_the_setting(tmp_path):
    vol = _mr().astype(np.float32) - 400  # no air, no tag: taken as MR
    size = (8, 10, 12)
    plain = _nifti(tmp_path / "plain.nii.gz", vol)
    described = _nifti(tmp_path / "described.nii.gz", vol, descrip=b"CT abdomen 1mm")
    window = lambda p: VolumePreprocess({"intensity": "window"}, size)(p)  # noqa: E731
    with pytest.warns(UserWarning, match="no air"):  # what auto gives a CT, warnings and all
        as_ct = window(plain)
    auto = VolumePreprocess({}, size)
    assert not torch.allclose(auto(plain), as_ct)
    with pytest.warns(UserWarning, match="described.nii.gz: a HU window"):
        torch.testing.assert_close(auto(described), as_ct)  # the NIfTI description says CT
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain.nii.gz was warned about above: once per file
        torch.testing.assert_close(auto(plain, modality="ct"), as_ct)  # the record's `modality` field
    torch.testing.assert_close(VolumePreprocess({"modality": "CT"}, size)(plain), as_ct)  # the setting
    # A described MR stays MR whatever its values; the record's field wins over the file.
    mr_air = _nifti(tmp_path / "mr_air.nii.gz", _ct().astype(np.float32), descrip=b"T1w MPRAGE")
    assert float(auto(mr_air)[0].mean()) != pytest.approx(float(window(mr_air)[0].mean()), abs=1e-3)
    torch.testing.assert_close(auto(mr_air, modality="CT"), window(mr_air))


def test_dicom_modality_tag_picks_the_mode(tmp_path):
    from pydicom.data import get_testdata_file

    from tests.data.test_volumes import _write_series

    folder = _write_series(tmp_path / "s", [0.0, 5.0, 10.0], [1, 2, 3], [0, 0, 0])  # values 100..120: no air
    import pydicom

    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    assert pydicom.dcmread(get_testdata_file("CT_small.dcm")).Modality == "CT"
    x = VolumePreprocess({}, (3, 16, 16))(folder)  # MR: percentiles, the full [0, 1] range is used
    assert float(x.min()) == 0 and float(x.max()) == 1


def test_uint8_ct_with_window_warns_once_naming_the_file(tmp_path):
    u8 = np.clip((_ct().astype(np.float32) + 1000) / 2000 * 255, 0, 255).astype(np.uint8)  # a windowed uint8 CT
    path = _nifti(tmp_path / "u8ct.nii.gz", u8)
    pre = VolumePreprocess({"intensity": "window"}, (8, 10, 12))
    with pytest.warns(UserWarning) as record:
        squashed = pre(path)
        pre(path)  # the same file again: no second warning
    msgs = [m for m in _messages(record) if "HU window" in m]
    assert len(msgs) == 1 and "u8ct.nii.gz" in msgs[0] and "no air" in msgs[0] and "span 0..216" in msgs[0]
    assert 0.5 <= float(squashed.min()) and float(squashed.max()) <= 0.63  # the silent squash the warning flags
    good = VolumePreprocess({"intensity": "uint8"}, (8, 10, 12))(path)
    assert float(good.min()) == 0 and float(good.max()) > 0.8


def test_uint8_warns_on_fractions_and_names_the_scale_factor(tmp_path):
    maps = np.linspace(0, 1.29, 8 * 10 * 12, dtype=np.float32).reshape(12, 10, 8)  # a 0..1.29 map
    path = _nifti(tmp_path / "map.nii.gz", maps)
    with pytest.warns(UserWarning, match=r"map.nii.gz: intensity: uint8 expects integer values.*not integers"):
        VolumePreprocess({"intensity": "uint8"}, (8, 10, 12))(path)
    # A uint8 file whose header scale makes it 0..2550 (not HU: no air): the error names the scale, and does not
    # advise a HU window.
    img = nib.Nifti1Image((np.arange(8 * 10 * 12).reshape(12, 10, 8) % 256).astype(np.uint8), np.eye(4))
    img.header.set_slope_inter(10.0, 0.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    with pytest.raises(VolumeLoadError, match=r"scaled.nii.gz'.*0..2550 \(after the header's scale factor: slope "
                                              r"10, intercept 0\); use intensity: auto or minmax"):
        VolumePreprocess({"intensity": "uint8"}, (8, 10, 12))(tmp_path / "scaled.nii.gz")
    with pytest.warns(UserWarning, match=r"scaled.nii.gz: a HU window .*scale factor: slope 10"):
        VolumePreprocess({"intensity": "window"}, (8, 10, 12))(tmp_path / "scaled.nii.gz")


def test_explicit_modes_keep_their_values(tmp_path):
    """Shipped configs name their mode; these give the same numbers as before `auto` existed."""
    vol = np.array([-2000, -1000, 0, 500, 1000, 3000], dtype=np.int16).reshape(1, 2, 3)
    np.save(tmp_path / "hu.npy", vol)
    for args, want in (({"intensity": "window"}, [0, 0, 0.5, 0.75, 1, 1]),
                       ({"intensity": "standardize", "standardize": [500, 1000]}, [-2.5, -1.5, -0.5, 0, 0.5, 2.5]),
                       ({"intensity": "minmax"}, [0, 0.2, 0.4, 0.5, 0.6, 1]),
                       ({"intensity": "none"}, [-2000, -1000, 0, 500, 1000, 3000])):
        x = VolumePreprocess(args, (1, 2, 3))(tmp_path / "hu.npy")
        torch.testing.assert_close(x.flatten(), torch.tensor(want, dtype=torch.float32))


def test_intensity_modes_are_a_registry():
    from medm.data.volumes import INTENSITY_MODES, register_intensity

    assert {"auto", "window", "uint8", "minmax", "standardize", "none"} <= set(INTENSITY_MODES)
    with pytest.raises(ValueError, match="volume.intensity: 'halve' is not one of"):
        VolumeArgs(intensity="halve")

    @register_intensity("halve")
    def halve(x, args, ctx):
        return x.mul_(0.5)

    try:
        assert VolumeArgs(intensity="halve").intensity == "halve"
    finally:
        del INTENSITY_MODES["halve"]


# ---- geometry ----------------------------------------------------------------------------------------------------
def _tilted_bar(path, degrees=20.0, n=40):
    """A phantom stored on a voxel grid rotated `degrees` about the S axis; in world space a bright bar runs along x
    (|y| <= 4 mm), so its edges are rows of the axial plane once the volume is on world axes."""
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = -rot @ np.array([n / 2 - 0.5, n / 2 - 0.5, 2])
    ijk = np.stack(np.meshgrid(np.arange(n), np.arange(n), np.arange(5), indexing="ij"), -1)
    world = ijk @ rot.T + affine[:3, 3]
    return _nifti(path, np.where(np.abs(world[..., 1]) <= 4, 1000.0, 0.0).astype(np.float32), affine)


def _mixed_rows(x):
    """Share of rows in the central columns of the middle slice that are partly bar, partly background."""
    s = x[0, x.shape[1] // 2].numpy()
    frac = (s[:, s.shape[1] // 4: 3 * s.shape[1] // 4] > 0.5).mean(1)
    return float(np.mean((frac > 0.1) & (frac < 0.9)))


def test_resample_world_puts_an_oblique_scan_on_world_axes(tmp_path):
    path = _tilted_bar(tmp_path / "tilt.nii.gz")
    args = {"intensity": "minmax"}
    tilted = VolumePreprocess(args, (5, 40, 40))(path)
    level = VolumePreprocess({**args, "resample": "world"}, (5, 40, 40))(path)
    assert _mixed_rows(tilted) > 0.15  # without resampling the bar crosses rows at 20 degrees
    assert _mixed_rows(level) < 0.05  # on world axes its edges are rows
    rows = (level[0, 2, :, 10:30] > 0.5).float().mean(1)
    assert 6 <= int((rows > 0.5).sum()) <= 12  # the 8 mm bar (9 rows of 1 mm) is there
    # An axis-aligned file is not resampled at all.
    straight = _nifti(tmp_path / "straight.nii.gz", _mr())
    torch.testing.assert_close(VolumePreprocess({"resample": "world"}, (8, 10, 12))(straight),
                               VolumePreprocess({}, (8, 10, 12))(straight))


def test_file_without_orientation_warns(tmp_path):
    nib.save(nib.Nifti1Image(_mr(), None), tmp_path / "noori.nii.gz")  # no affine: qform and sform codes 0
    header = nib.load(tmp_path / "noori.nii.gz").header
    assert header["qform_code"] == 0 and header["sform_code"] == 0
    with pytest.warns(UserWarning, match=r"noori.nii.gz: the file carries no orientation"):
        read_volume(tmp_path / "noori.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_volume(_nifti(tmp_path / "ori.nii.gz", _mr()))  # sform code 2 (aligned): no warning


# ---- complex, formats, refusals ----------------------------------------------------------------------------------
def test_complex_volume_magnitude_real_or_refuse(tmp_path):
    rng = np.random.default_rng(0)
    c = (rng.normal(size=(6, 5, 4)) + 1j * rng.normal(size=(6, 5, 4))).astype(np.complex64)
    path = _nifti(tmp_path / "cx.nii.gz", c)
    with pytest.warns(UserWarning, match=r"cx.nii.gz: voxels are complex \(complex64\); using their magnitude"):
        mag, _ = read_volume(path)
    np.testing.assert_allclose(mag, np.abs(c), rtol=1e-6)
    with pytest.warns(UserWarning, match="using their real"):
        real, _ = read_volume(path, complex="real")
    np.testing.assert_array_equal(real, c.real)
    with pytest.raises(VolumeLoadError, match=r"cx.nii.gz'.*complex .*volume.complex: magnitude or real"):
        VolumePreprocess({"complex": "refuse"}, (4, 5, 6))(path)
    np.save(tmp_path / "cx.npy", c)
    with pytest.warns(UserWarning, match="cx.npy: voxels are complex"):
        np.testing.assert_allclose(read_volume(tmp_path / "cx.npy")[0], np.abs(c), rtol=1e-6)


def _itk_write(path, data, spacing):
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))  # ITK arrays are (z, y, x)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


@pytest.mark.parametrize("suffix", [".mgz", ".hdr", ".nrrd", ".mha", ".mhd"])
def test_more_formats_read_like_nifti(tmp_path, suffix):
    vol = _ct()
    zooms = (2.0, 3.0, 4.0)
    ref, ref_affine = read_volume(_nifti(tmp_path / "ref.nii.gz", vol, np.diag([*zooms, 1.0])))
    path = tmp_path / f"scan{suffix}"
    if suffix == ".mgz":
        nib.save(nib.MGHImage(vol.astype(np.int32), np.diag([*zooms, 1.0])), path)
    elif suffix == ".hdr":
        nib.save(nib.AnalyzeImage(vol, np.diag([*zooms, 1.0])), path)  # writes scan.hdr + scan.img
    else:
        _itk_write(path, vol, zooms)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        array, affine = read_volume(path)
    np.testing.assert_array_equal(array, ref)
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), zooms)
    if suffix == ".hdr":  # Analyze has no orientation: warned, read with nibabel's x-flipped default
        assert any("carries no orientation" in m for m in _messages(record))
    else:
        assert not record
    if suffix in (".nrrd", ".mha"):  # ITK's LPS becomes RAS
        np.testing.assert_allclose(np.diag(affine)[:3], [-2.0, -3.0, 4.0])
    x = VolumePreprocess({}, (8, 10, 12))(path)
    expect = VolumePreprocess({"orientation": "".join(nib.aff2axcodes(affine))}, (8, 10, 12))(tmp_path / "ref.nii.gz")
    torch.testing.assert_close(x, expect)


def test_metaimage_modality_drives_auto(tmp_path):
    path = _itk_write(tmp_path / "scan.mhd", _mr().astype(np.int16), (1.0, 1.0, 1.0))
    header = path.read_text()  # SimpleITK writes no Modality; scanners' MetaImage exports do
    path.write_text(header.replace("ElementSpacing", "Modality = MET_MOD_CT\nElementSpacing"))
    with pytest.warns(UserWarning, match="scan.mhd: a HU window"):  # said CT, holds no air
        VolumePreprocess({}, (8, 10, 12))(path)


def test_cifti_rgb_and_vector_volumes_are_one_line_refusals(tmp_path):
    bm = nib.cifti2.BrainModelAxis.from_mask(np.ones((2, 2, 2)), affine=np.eye(4))
    cifti = nib.Cifti2Image(np.zeros((1, 8), np.float32), header=(nib.cifti2.ScalarAxis(["a"]), bm))
    nib.save(cifti, tmp_path / "x.dscalar.nii")
    with pytest.raises(VolumeLoadError, match=r"x.dscalar.nii'.*CIFTI-2 file"):
        read_volume(tmp_path / "x.dscalar.nii")
    rgb = np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    with pytest.raises(VolumeLoadError, match=r"rgb.nii.gz'.*colour \(R, G, B"):
        read_volume(tmp_path / "rgb.nii.gz")
    vec = sitk.Image([4, 5, 6], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(vec, str(tmp_path / "rgb.mha"))
    with pytest.raises(VolumeLoadError, match=r"rgb.mha'.*3 components"):
        read_volume(tmp_path / "rgb.mha")
    (tmp_path / "bad.nrrd").write_bytes(b"NRRD0004\ngarbage\n")
    with pytest.raises(VolumeLoadError, match=r"bad.nrrd'.*not a readable NRRD / MetaImage"):
        read_volume(tmp_path / "bad.nrrd")
    for err in (VolumeLoadError,):
        try:
            read_volume(tmp_path / "rgb.nii.gz")
        except err as e:
            assert "\n" not in str(e)


def test_playground_opens_the_new_formats(tmp_path):
    from medm.playground import open_upload

    vol = _ct()
    nib.save(nib.MGHImage(vol.astype(np.int32), np.eye(4)), tmp_path / "scan.mgz")
    _itk_write(tmp_path / "scan.nrrd", vol, (1.0, 1.0, 1.0))
    _itk_write(tmp_path / "scan.mha", vol, (1.0, 1.0, 1.0))
    for name in ("scan.mgz", "scan.nrrd", "scan.mha"):
        up = open_upload(tmp_path / name, work_dir=tmp_path / "work")
        assert up.is_volume and up.viewer.num_slices == vol.shape[2] and up.picture().size == (12, 10)
