"""A playground upload: a 2D image or a 3D volume, opened with the dataset's own loaders.

Told apart by the file name, as the data code does: `.nii` / `.nii.gz` / `.mgz` / `.hdr` / `.nrrd` / `.mha` / `.npy`
(`medm.data.volumes.VOLUME_SUFFIXES`) are volumes (read within the default voxel limit), `.zip` is a DICOM
series (unpacked into the app's work directory), anything else is a 2D image for `medm.data.images.load_image`
(PNG, JPEG, ..., and DICOM whatever its suffix). A file that is neither is an `UploadError` naming the file and
the reason, for the page to show.
"""

from __future__ import annotations

import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from medm.data.images import ImageLoadError, load_image
from medm.data.volumes import VOLUME_SUFFIXES, VolumeLoadError
from medm.playground.viewer import DEFAULT_WINDOW, SliceViewer

__all__ = ["MAX_UNPACKED_BYTES", "Upload", "UploadError", "open_upload", "unpack_series"]

ARCHIVE_SUFFIX = ".zip"
# A zipped DICOM series may hold at most this much once unpacked (zip bombs), and at most MAX_UNPACKED_FILES files.
MAX_UNPACKED_BYTES = 4 * 1024**3
MAX_UNPACKED_FILES = 20_000


class UploadError(ValueError):
    """An upload that is neither an image nor a volume; the message names the file and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot open {name!r}: {reason}")
        self.name = name
        self.reason = reason


@dataclass
class Upload:
    """The file a session is looking at.

    Args:
        name: the uploaded file's own name (messages and captions use it, not the temp path).
        image: a 2D upload, as `load_image` gives it at `window`; None for a volume.
        viewer: a volume's slice viewer; None for a 2D image.
        window: `DEFAULT_WINDOW` or a `WINDOW_PRESETS` name.
    """

    name: str
    path: str
    window: str = DEFAULT_WINDOW
    image: Image.Image | None = None
    viewer: SliceViewer | None = None

    @property
    def is_volume(self) -> bool:
        return self.viewer is not None

    def picture(self) -> Image.Image:
        """What the viewer shows and the model is given: the image, or the volume's current slice."""
        return self.viewer.image() if self.viewer is not None else self.image

    def caption(self) -> str:
        if self.viewer is not None:
            return self.viewer.caption()
        w, h = self.image.size
        return f"{self.name}: {w} x {h} image, window {self.window}"

    def set_window(self, window: str) -> None:
        """Re-render at another window (DICOM and high bit depth images, volumes; 8-bit images do not change)."""
        if self.viewer is not None:
            self.viewer.set_window(window)
        elif window != self.window:
            self.image = load_image(self.path, None if window == DEFAULT_WINDOW else window)
        self.window = window


def open_upload(path: str | Path, name: str | None = None, window: str = DEFAULT_WINDOW,
                work_dir: str | Path | None = None) -> Upload:
    """Open an uploaded file as a 2D image or a volume.

    Args:
        name: the file's own name (default: the path's).
        work_dir: where a zipped DICOM series is unpacked and the volume cache lives (default: beside `path`).

    Raises:
        UploadError: the file is not a readable image, volume or zipped DICOM series.
    """
    path = Path(path)
    name = name or path.name
    work = Path(work_dir) if work_dir is not None else path.parent
    lower = name.lower()
    try:
        if lower.endswith(ARCHIVE_SUFFIX):
            folder = unpack_series(path, work / f"series-{uuid.uuid4().hex}", name)
            viewer = SliceViewer.open(folder, name, window, str(work / "volume-cache"))
            return Upload(name, str(folder), window, viewer=viewer)
        if lower.endswith(VOLUME_SUFFIXES):
            viewer = SliceViewer.open(path, name, window, str(work / "volume-cache"))
            return Upload(name, str(path), window, viewer=viewer)
        image = load_image(path, None if window == DEFAULT_WINDOW else window)
        return Upload(name, str(path), window, image=image)
    except (ImageLoadError, VolumeLoadError) as e:
        raise UploadError(name, e.reason + _hint(lower)) from e


def _hint(lower_name: str) -> str:
    if lower_name.endswith((ARCHIVE_SUFFIX, *VOLUME_SUFFIXES)):
        return ""
    return ("; volumes are taken as NIfTI (.nii, .nii.gz), MGH (.mgz), NRRD (.nrrd), MetaImage (.mha), NumPy (.npy) "
            "or a .zip of one DICOM series")


def unpack_series(zip_path: str | Path, dest: str | Path, name: str | None = None,
                  max_bytes: int = MAX_UNPACKED_BYTES, max_files: int = MAX_UNPACKED_FILES) -> Path:
    """Unpack a zipped DICOM series into `dest` and return the folder holding its files.

    The zip may hold the files at its top or inside nested single folders (`study/series/*.dcm`); zip members
    never land outside `dest` (zipfile drops absolute and `..` parts).

    Raises:
        UploadError: not a zip, above `max_bytes` / `max_files` unpacked, empty, or several folders of files.
    """
    name = name or Path(zip_path).name
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            total = sum(i.file_size for i in members)
            if len(members) > max_files or total > max_bytes:
                raise UploadError(name, f"holds {len(members)} files, {total:,} bytes unpacked; the limit is "
                                        f"{max_files} files, {max_bytes:,} bytes")
            zf.extractall(dest, members)
    except zipfile.BadZipFile as e:
        raise UploadError(name, f"not a readable zip archive ({e})") from e
    folder = Path(dest)
    while True:
        entries = [p for p in folder.iterdir() if p.name != "__MACOSX"]  # macOS zips add resource-fork folders
        files, dirs = [p for p in entries if p.is_file()], [p for p in entries if p.is_dir()]
        if files or len(dirs) != 1:
            break
        folder = dirs[0]
    if not files:
        raise UploadError(name, "the zip holds no files" if not dirs else
                          f"the zip holds {len(dirs)} folders ({', '.join(sorted(d.name for d in dirs)[:3])}, ...); "
                          "zip one DICOM series")
    return folder
