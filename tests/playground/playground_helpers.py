"""Helpers for playground tests: synthetic images, volumes (NIfTI, .npy, a zipped DICOM series) and a running server."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
# The test server's upload limit.
MAX_FILE_SIZE = "2mb"


def write_png(path: Path, size=(40, 48), seed: int = 0) -> Path:
    """A random RGB PNG of (W, H) `size`."""
    w, h = size
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def marker_volume(shape=(20, 10, 6), background=-1000.0, marker=1000.0) -> np.ndarray:
    """HU volume (X, Y, Z) of air with one bright voxel at index (0, 0, 0)."""
    vol = np.full(shape, background, dtype=np.float32)
    vol[0, 0, 0] = marker
    return vol


def write_nifti(path: Path, data: np.ndarray, zooms=(1.0, 2.0, 3.0)) -> Path:
    """RAS+ NIfTI with voxel sizes `zooms` mm (index (0, 0, 0) is patient left, posterior, inferior)."""
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), str(path))
    return path


def write_dicom_series(folder: Path, values=(100, 300, 500), positions=(20.0, 0.0, 10.0)) -> Path:
    """Slices of pydicom's CT_small.dcm, slice i filled with `values[i]` (stored; HU = stored + intercept) at
    z = positions[i], written in file order s0, s1, ... (not the anatomical order)."""
    import pydicom
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for i, (v, z) in enumerate(zip(values, positions)):
        ds = copy.deepcopy(base)
        ds.ImagePositionPatient = [-158.0, -179.0, float(z)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = i + 1
        ds.SeriesInstanceUID = "1.2.3.4"
        ds.PixelData = np.full((int(ds.Rows), int(ds.Columns)), v, dtype=np.int16).tobytes()
        ds.save_as(folder / f"s{i}.dcm")
    return folder


def zip_folder(folder: Path, out: Path, prefix: str = "") -> Path:
    """Zip every file of `folder` under `prefix/` inside the archive."""
    with zipfile.ZipFile(out, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"{prefix}/{f.name}" if prefix else f.name)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A playground process on the loopback address; `tmp` is its TMPDIR (the app's temp dir goes inside)."""

    url: str
    proc: subprocess.Popen
    tmp: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(model: Path, work: Path, examples: Path | None = None, timeout: float = 120.0) -> Server:
    """Run `python playground.py --model ...` on a free loopback port and wait until it answers."""
    import httpx

    port = free_port()
    tmp = work / "tmp"
    tmp.mkdir(parents=True)
    log = work / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TMPDIR": str(tmp),
           "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "playground.py", "--model", str(model), "--port", str(port), "--device", "cpu",
           "--concurrency", "4", "--max-file-size", MAX_FILE_SIZE, "--examples", str(examples) if examples else "none"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the playground exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "config", timeout=2).status_code == 200:
                return Server(url, proc, tmp, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the playground did not answer within {timeout:.0f} s:\n{log.read_text()}")


def stop_server(server: Server) -> int:
    """SIGTERM (like Ctrl-C) and wait; returns the exit code."""
    server.proc.terminate()
    try:
        return server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        raise
