"""medm.data.images: every format and mode -> 8-bit L/RGB, DICOM value handling, and errors that name the file."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medm.data.images import WINDOW_PRESETS, ImageLoadError, is_dicom, load_image, verify_image


def dicom_file(name: str) -> str:
    """A test file bundled with pydicom; skip rather than download when this install lacks it."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled with this install")
    return path


def ramp(h: int = 32, w: int = 48, hi: float = 255) -> np.ndarray:
    """(H, W) float values rising left-to-right then top-to-bottom from 0 to `hi`."""
    return np.linspace(0, hi, h * w).reshape(h, w)


def expected_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Independent reference for the linear map [lo, hi] -> [0, 255], clipped and rounded."""
    return np.rint(np.clip((values.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


# ---------------------------------------------------------------- ordinary formats and modes


def test_gray_png_kept_exactly(tmp_path):
    a = ramp().astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.mode == "L" and out.size == (48, 32)
    np.testing.assert_array_equal(np.asarray(out), a)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16bit_gray_is_stretched_min_max_not_clipped(tmp_path, suffix):
    a = ramp(hi=4000).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / f"x.{suffix}")
    assert Image.open(tmp_path / f"x.{suffix}").mode.startswith("I;16")
    out = np.asarray(load_image(tmp_path / f"x.{suffix}"))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert (np.diff(out.ravel().astype(int)) >= 0).all()  # ordering preserved
    assert (out == 255).mean() < 0.01  # not clipped: only the top of the ramp is white
    np.testing.assert_array_equal(out, expected_uint8(a, a.min(), a.max()))


def test_16bit_png_with_window(tmp_path):
    a = ramp(hi=4000).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")
    out = np.asarray(load_image(tmp_path / "x.png", window=(2000, 1000)))
    assert (out[a <= 1500] == 0).all() and (out[a >= 2500] == 255).all()
    np.testing.assert_array_equal(out, expected_uint8(a, 1500, 2500))


def test_float_and_int32_tiff(tmp_path):
    f = ramp(hi=2.0).astype(np.float32) - 1.0  # -1 .. 1
    Image.fromarray(f).save(tmp_path / "f.tif")
    out = np.asarray(load_image(tmp_path / "f.tif"))
    np.testing.assert_array_equal(out, expected_uint8(f, -1.0, 1.0))
    i = (ramp(hi=70000) - 1000).astype(np.int32)
    Image.fromarray(i).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "i.tif")), expected_uint8(i, i.min(), i.max()))


def test_rgba_composited_on_black(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., :3] = (200, 100, 50)
    a[0, 0, 3], a[0, 1, 3], a[0, 2, 3] = 0, 255, 128
    Image.fromarray(a).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB"
    px = np.asarray(out).astype(int)
    assert tuple(px[0, 0]) == (0, 0, 0)  # transparent -> black background
    assert tuple(px[0, 1]) == (200, 100, 50)  # opaque keeps its colour
    np.testing.assert_allclose(px[0, 2], np.array([200, 100, 50]) * 128 / 255, atol=1)


def test_gray_alpha_stays_gray(tmp_path):
    im = Image.merge("LA", [Image.new("L", (4, 4), 200), Image.new("L", (4, 4), 0)])
    im.putpixel((1, 1), (200, 255))
    im.save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert out.mode == "L"
    assert out.getpixel((0, 0)) == 0 and out.getpixel((1, 1)) == 200


def test_palette_png(tmp_path):
    im = Image.new("P", (4, 2), 0)
    im.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((1, 0)) == (250, 0, 0)
    im.save(tmp_path / "pt.png", transparency=1)  # palette entry 1 transparent -> black
    out = load_image(tmp_path / "pt.png")
    assert out.getpixel((1, 0)) == (0, 0, 0) and out.getpixel((0, 0)) == (10, 20, 30)


def test_bilevel_png(tmp_path):
    im = Image.new("1", (4, 4), 0)
    im.putpixel((2, 2), 1)
    im.save(tmp_path / "b.png")
    out = load_image(tmp_path / "b.png")
    assert out.mode == "L" and out.getpixel((2, 2)) == 255 and out.getpixel((0, 0)) == 0


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)  # pure red in CMYK
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = load_image(tmp_path / "c.jpg")
    assert out.mode == "RGB"
    np.testing.assert_allclose(np.asarray(out)[8, 8], (255, 0, 0), atol=8)


def test_bmp(tmp_path):
    a = np.stack([ramp().astype(np.uint8), 255 - ramp().astype(np.uint8), np.full((32, 48), 7, np.uint8)], -1)
    Image.fromarray(a).save(tmp_path / "x.bmp")
    out = load_image(tmp_path / "x.bmp")
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), a)


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((20, 40), np.uint8)
    a[:, 20:] = 255  # stored: left black, right white
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # display needs a 90 degree clockwise turn
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)  # (W, H) swapped
    px = np.asarray(out).astype(int)
    assert px[:15].mean() < 10 and px[-15:].mean() > 245  # the left (black) side is now on top


def test_output_feeds_encoder_preprocess(tmp_path):
    from medm.models.vision._base import ImagePreprocess

    Image.fromarray(ramp(hi=4000).astype(np.uint16)).save(tmp_path / "x.png")
    pre = ImagePreprocess(image_size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = pre(load_image(tmp_path / "x.png"))
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1 and x.max() > 0.9


# ---------------------------------------------------------------- DICOM


def test_ct_dicom_without_window_is_min_max_of_hounsfield():
    path = dicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleIntercept) == -1024 and "WindowCenter" not in ds
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = load_image(path)
    assert out.mode == "L" and out.size == (ds.Columns, ds.Rows)
    np.testing.assert_allclose(np.asarray(out).astype(int), expected_uint8(hu, hu.min(), hu.max()), atol=1)


def test_ct_dicom_explicit_window_is_in_hounsfield_units():
    path = dicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = np.asarray(load_image(path, window=(40, 400)))
    assert (hu <= -160).any() and (hu >= 240).any()  # the test image spans both sides of the window
    assert (out[hu <= -160] == 0).all() and (out[hu >= 240] == 255).all()
    np.testing.assert_allclose(out.astype(int), expected_uint8(hu, -160, 240), atol=1)
    np.testing.assert_array_equal(np.asarray(load_image(path, window="soft_tissue")), out)
    assert WINDOW_PRESETS["soft_tissue"] == (40.0, 400.0)
    assert not np.array_equal(np.asarray(load_image(path, window="lung")), out)


def test_mr_dicom_uses_file_window_first_value(tmp_path):
    path = dicom_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = expected_uint8(ds.pixel_array, c - w / 2, c + w / 2)
    np.testing.assert_allclose(np.asarray(load_image(path)).astype(int), expected, atol=1)
    ds.WindowCenter, ds.WindowWidth = [c, 10.0], [w, 5.0]  # several windows: the first is the default
    ds.save_as(tmp_path / "multi.dcm")
    np.testing.assert_allclose(np.asarray(load_image(tmp_path / "multi.dcm")).astype(int), expected, atol=1)


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    ds.save_as(tmp_path / "m2.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    m2 = np.asarray(load_image(tmp_path / "m2.dcm")).astype(int)
    m1 = np.asarray(load_image(tmp_path / "m1.dcm")).astype(int)
    assert m2.std() > 10
    np.testing.assert_array_equal(m1, 255 - m2)


def test_dicom_found_by_magic_without_suffix(tmp_path):
    shutil.copy(dicom_file("CT_small.dcm"), tmp_path / "scan.img")
    assert is_dicom(tmp_path / "scan.img")
    reference = np.asarray(load_image(dicom_file("CT_small.dcm")))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "scan.img")), reference)
    Image.new("L", (4, 4)).save(tmp_path / "x.png")
    assert not is_dicom(tmp_path / "x.png") and not is_dicom(tmp_path / "missing.img")


def test_multiframe_dicom_takes_middle_frame():
    path = dicom_file("rtdose.dcm")
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.astype(np.float64)
    assert frames.shape[0] == 15 and "RescaleSlope" not in ds
    mid = frames[7]
    out = np.asarray(load_image(path)).astype(int)
    np.testing.assert_allclose(out, expected_uint8(mid, mid.min(), mid.max()), atol=1)


def test_enhanced_multiframe_functional_groups(tmp_path):
    """Rescale shared by all frames and a per-frame window, as enhanced CT/MR store them."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    base = ds.pixel_array
    stack = np.stack([base, base + 100, base + 200]).astype(base.dtype)
    ds.PixelData, ds.NumberOfFrames = stack.tobytes(), 3
    del ds.WindowCenter, ds.WindowWidth
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 2, -100
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for center in (0, 1500, 99999):
        voi, item = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = center, 2000
        item.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(tmp_path / "enh.dcm")
    values = stack[1].astype(np.float64) * 2 - 100
    out = np.asarray(load_image(tmp_path / "enh.dcm")).astype(int)
    np.testing.assert_allclose(out, expected_uint8(values, 500, 2500), atol=1)


def test_rgb_dicom_stays_rgb():
    path = dicom_file("SC_rgb_rle_2frame.dcm")
    ds = pydicom.dcmread(path)
    out = load_image(path)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), ds.pixel_array[1])


def test_16bit_rgb_dicom_scaled_to_8bit():
    path = dicom_file("SC_rgb_rle_16bit_2frame.dcm")
    ds = pydicom.dcmread(path)
    out = np.asarray(load_image(path)).astype(int)
    ref = ds.pixel_array[1].astype(np.float64) * 255 / (2 ** int(ds.BitsStored) - 1)
    np.testing.assert_allclose(out, np.rint(ref), atol=1)
    assert out.max() > 200


def test_dicom_without_pixels_or_truncated(tmp_path):
    with pytest.raises(ImageLoadError, match="no pixel data") as e:
        load_image(dicom_file("rtplan.dcm"))
    assert "rtplan.dcm" in str(e.value)
    with pytest.raises(ImageLoadError, match="MR_truncated.dcm"):
        load_image(dicom_file("MR_truncated.dcm"))


# ---------------------------------------------------------------- errors


def _jpeg_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _jpeg_bad_huffman_table() -> bytes:
    """A JPEG whose header parses but whose Huffman table is invalid, so only the full decode fails."""
    data = bytearray(_jpeg_bytes())
    dht = data.index(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16  # code counts per length: impossible
    return bytes(data)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("random.jpg", np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes(), "not a recognised"),
        ("bad_table.jpg", _jpeg_bad_huffman_table(), "corrupt or truncated"),
        ("truncated.jpg", _jpeg_bytes()[: len(_jpeg_bytes()) // 2], "truncated"),
        ("empty.png", b"", "empty"),
        ("notes.png", b"this is a text file, not an image\n" * 20, "not a recognised"),
    ],
)
def test_bad_files_raise_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    for call in (load_image, verify_image):
        with pytest.raises(ImageLoadError, match=reason) as e:
            call(path)
        assert str(path) in str(e.value) and e.value.path == str(path)
        assert isinstance(e.value, ValueError)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="not found") as e:
        load_image(tmp_path / "nope.png")
    assert "nope.png" in str(e.value)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)


def _png_claiming_size(path: Path, width: int, height: int) -> None:
    """A real 1x1 PNG whose header claims width x height (the pixel limit must trip before any decoding)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit(tmp_path):
    Image.new("L", (16, 16)).save(tmp_path / "small.png")
    with pytest.raises(ImageLoadError, match="16x16"):
        load_image(tmp_path / "small.png", max_pixels=100)
    assert load_image(tmp_path / "small.png", max_pixels=256).size == (16, 16)
    _png_claiming_size(tmp_path / "bomb.png", 12000, 10000)  # 120 MP: above our default, below PIL's error
    with pytest.raises(ImageLoadError, match="12000x10000"):
        load_image(tmp_path / "bomb.png")
    _png_claiming_size(tmp_path / "huge.png", 60000, 60000)  # PIL itself refuses this at open
    with pytest.raises(ImageLoadError, match="decompression bomb") as e:
        load_image(tmp_path / "huge.png", max_pixels=None)
    assert "huge.png" in str(e.value)
    with pytest.raises(ImageLoadError, match="128x128"):
        load_image(dicom_file("CT_small.dcm"), max_pixels=1000)


def test_verify_image_accepts_good_files(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "ok.jpg")
    assert verify_image(tmp_path / "ok.jpg") is None
    assert verify_image(dicom_file("CT_small.dcm")) is None


@pytest.mark.parametrize("window", ["no_such_preset", (40, 0), (40,), (1, 2, 3), 40, ("a", "b")])
def test_invalid_window(tmp_path, window):
    Image.new("L", (4, 4)).save(tmp_path / "x.png")
    with pytest.raises(ValueError, match="window"):
        load_image(tmp_path / "x.png", window=window)


# ---------------------------------------------------------------- real data


def test_vqa_rad_jpegs(shared_data):
    paths = sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[:5]
    assert paths, "no VQA-RAD images found"
    for path in paths:
        out = load_image(path)
        with Image.open(path) as raw:
            assert out.size == raw.size and min(raw.size) >= 64
        assert out.mode in ("L", "RGB")
        assert np.asarray(out).std() > 5  # real anatomy, not a blank decode
