"""Fuzzing mmvl's readers with mutated real files, each read in a worker process with a time limit.

Four targets: ``dicom`` (``read_dicom_image``), ``nifti`` (``read_nifti``), ``series`` (``read_dicom_series``
on a folder of slices) and ``raster`` (``read_image`` on PNG/JPEG/TIFF/BMP). Seeds are the sample files pydicom
and nibabel ship inside their packages (read from the installed folders; pydicom's ``get_testdata_files`` would
try the network); series are built from pydicom's CT and MR slices restacked at successive positions, raster
seeds are small images Pillow writes here (no package ships any). A mutation flips, overwrites, inserts, deletes or
truncates bytes, favouring the values that break parsers (0, 0xFF.., lengths near 2**31). The reader runs in
a forked worker with an address-space limit, so a hang (no answer within ``timeout`` s), a crash (the worker
dies: segfault, abort, out of memory) and an exception that is not an ``mmvl.errors.DataError`` naming the
file are told apart. ``tests/fuzz/test_fuzz_readers.py`` runs a bounded number in CI; ``run_fuzz.py`` runs
for N minutes.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import resource
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import nibabel
import pydicom

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_FILES = Path(nibabel.__file__).parent / "tests" / "data"
MAX_SEED_BYTES = 600_000  # keeps a read at milliseconds; large seeds add decoder time, not new header paths
WORKER_MEMORY = 2 << 30  # address space the worker may add: a huge allocation fails instead of swapping
INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00", b"\xff\xff", b"\xff\xff\xff\xff",
               b"\x00\x00\x00\x80", b"\xff\xff\xff\x7f", b"\x00\x00\x01\x00", b"\x01\x00\x00\x00", b"\\",
               b"NaN", b"-1", b"1e308", b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"]  # item / sequence delimiter tags


def seed_files() -> dict[str, list[Path]]:
    """``{"dicom": [...], "nifti": [...]}``: the packages' sample files that the readers accept or should refuse."""
    dicom = sorted(p for p in PYDICOM_FILES.iterdir() if p.is_file() and p.stat().st_size <= MAX_SEED_BYTES
                   and (p.suffix.lower() == ".dcm" or _has_magic(p)))
    nifti = sorted(p for p in NIBABEL_FILES.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz"))
                   and p.stat().st_size <= MAX_SEED_BYTES)
    return {"dicom": dicom, "nifti": nifti}


# Series seeds: (bundled slice, number of slices). CT_small is plain little endian, MR_small_RLE compressed.
SERIES_SEEDS = (("CT_small.dcm", 4), ("MR_small.dcm", 3), ("MR_small_RLE.dcm", 3))


def series_seeds() -> dict[str, dict[str, bytes]]:
    """``{seed name: {file name: bytes}}``: each bundled slice copied to ``n`` slices of one series, stepped by
    its SliceThickness along the slice normal (new SOPInstanceUIDs, InstanceNumbers against position)."""
    import numpy as np
    from pydicom.uid import generate_uid

    seeds = {}
    for name, n in SERIES_SEEDS:
        files = {}
        for k in range(n):
            ds = pydicom.dcmread(PYDICOM_FILES / name)
            orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
            normal = np.cross(orientation[:3], orientation[3:])
            position = np.asarray(ds.ImagePositionPatient, dtype=float) + k * float(ds.SliceThickness) * normal
            ds.ImagePositionPatient = [round(float(v), 4) for v in position]
            ds.InstanceNumber = n - k
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[name, str(k)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            buffer = io.BytesIO()
            ds.save_as(buffer)
            files[f"slice{k:02d}.dcm"] = buffer.getvalue()
        seeds[name] = files
    return seeds


def raster_seeds() -> dict[str, bytes]:
    """``{file name: bytes}``: small gray, 16-bit, colour, palette and JPEG images written by Pillow."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:24, 0:32]
    gray = ((x * 7 + y * 3) % 256).astype(np.uint8)
    images = {
        "gray8.png": (Image.fromarray(gray), {}),
        "gray16.png": (Image.fromarray(gray.astype(np.uint16) * 257), {}),
        "gray16.tif": (Image.fromarray(gray.astype(np.uint16) * 16), {}),
        "rgb.png": (Image.fromarray(np.stack([gray, gray[::-1], 255 - gray], axis=-1)), {}),
        "palette.png": (Image.fromarray(gray).convert("P"), {}),
        "gray.jpg": (Image.fromarray(gray), {"quality": 90}),
        "rgb.jpg": (Image.fromarray(np.stack([gray, 255 - gray, gray], axis=-1)), {"quality": 90}),
        "gray.bmp": (Image.fromarray(gray), {}),
    }
    seeds = {}
    for name, (image, options) in images.items():
        buffer = io.BytesIO()
        image.save(buffer, format={"jpg": "JPEG", "tif": "TIFF"}.get(name.rsplit(".")[-1], name.rsplit(".")[-1]),
                   **options)
        seeds[name] = buffer.getvalue()
    return seeds


def mutate_series(files: dict[str, bytes], target: int, operations: list[tuple[int, int, int]],
                  folder_op: int = 0) -> dict[str, bytes]:
    """Mutate slice ``target`` (wrapping) of a series with ``operations``; ``folder_op`` 1 also drops the next
    slice, 2 adds a copy of the mutated slice under a new name (same position), 3 mutates the next slice too."""
    names = sorted(files)
    out = dict(files)
    name = names[target % len(names)]
    out[name] = mutate(files[name], operations)
    following = names[(target + 1) % len(names)]
    if folder_op == 1 and following != name:
        del out[following]
    elif folder_op == 2:
        out[f"copy_{name}"] = out[name]
    elif folder_op == 3 and following != name:
        out[following] = mutate(files[following], operations)
    return out


def _has_magic(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def mutate(data: bytes, operations: list[tuple[int, int, int]]) -> bytes:
    """Apply ``(kind, position, argument)`` operations; positions wrap around the current length. Biased to the
    first 2 KB, where headers (and so the parsers' decisions) live."""
    buffer = bytearray(data)
    for kind, position, argument in operations:
        if not buffer:
            break
        span = min(len(buffer), 2048) if position % 4 else len(buffer)
        at = position % span
        if kind == 0:  # flip one bit
            buffer[at] ^= 1 << (argument % 8)
        elif kind == 1:  # overwrite with an interesting value
            value = INTERESTING[argument % len(INTERESTING)]
            buffer[at:at + len(value)] = value
        elif kind == 2:  # random byte
            buffer[at] = argument % 256
        elif kind == 3:  # delete a chunk
            del buffer[at:at + 1 + argument % 64]
        elif kind == 4:  # duplicate a chunk (repeated elements, sequences)
            buffer[at:at] = buffer[at:at + 1 + argument % 64]
        else:  # truncate
            del buffer[max(at, 1 + argument % 256):]
    return bytes(buffer)


@dataclass
class Outcome:
    status: str  # "ok", "data_error", "wrong_error" (not a DataError, or no file path), "hang", "crash"
    detail: str = ""


def _readers() -> dict:
    from mmvl.data.dicom import read_dicom_image
    from mmvl.data.io import read_image
    from mmvl.data.volume import read_dicom_series, read_nifti

    return {"dicom": read_dicom_image, "nifti": read_nifti, "series": read_dicom_series, "raster": read_image}


READERS = None  # {kind: reader}; None: mmvl's (the harness's own test puts misbehaving readers here)


def _read(kind: str, path: str) -> Outcome:
    from mmvl.errors import DataError

    try:
        (READERS or _readers())[kind](path)
    except DataError as err:
        inside = os.path.isdir(path) and os.path.dirname(err.path or "") == path  # a series names its slice
        if (err.path != path and not inside) or err.path not in str(err):
            return Outcome("wrong_error", f"DataError without the file path: {err!r}")
        return Outcome("data_error", err.problem[:200])
    except BaseException as err:  # anything else is the finding
        return Outcome("wrong_error", "".join(traceback.format_exception(err))[-2000:])
    return Outcome("ok")


def _address_space() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmSize:"))


def _worker(connection, folder: str) -> None:
    import logging
    import warnings

    import monai.data  # noqa: F401  (imported once here, not timed against the first NIfTI)

    warnings.simplefilter("ignore")  # nibabel and pydicom warn on most damaged headers; the outcome is what counts
    logging.disable(logging.CRITICAL)  # nibabel reports header fixes as errors

    try:  # what the imports mapped (torch maps gigabytes it never touches), plus WORKER_MEMORY
        limit = _address_space() + WORKER_MEMORY
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (OSError, ValueError, StopIteration):  # no /proc (macOS): no limit
        pass

    while True:
        job = connection.recv()
        if job is None:
            return
        kind, suffix, data = job
        path = os.path.join(folder, f"fuzz{suffix}")
        if isinstance(data, dict):  # a folder of files (a DICOM series): written afresh for each input
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
            for name, content in data.items():
                with open(os.path.join(path, name), "wb") as handle:
                    handle.write(content)
        else:
            with open(path, "wb") as handle:
                handle.write(data)
        connection.send(_read(kind, path))


class Reader:
    """A worker process reading one file at a time with a time limit; restarted after a hang or a crash."""

    def __init__(self, timeout: float = 10.0):
        self.timeout = timeout
        self.folder = tempfile.mkdtemp(prefix="mmvl_fuzz_")
        self.process = None
        self.started = 0
        import monai.data  # noqa: F401  (imported once here: every forked worker, restarts included, starts in ms)
        import PIL.Image  # noqa: F401

        _readers()

    def _start(self) -> None:
        context = multiprocessing.get_context("fork")  # no re-import of the test process; Linux and macOS
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, self.folder), daemon=True)
        self.process.start()
        self.started += 1
        self.connection.send(("dicom", ".dcm", b""))  # warm-up: imports happen before the first timed read
        if not self.connection.poll(120):
            raise RuntimeError("fuzz worker did not start")
        self.connection.recv()

    def read(self, kind: str, data: bytes | dict[str, bytes], suffix: str) -> Outcome:
        """Read ``data`` (a file's bytes, or ``{name: bytes}`` for a folder) saved as ``fuzz{suffix}``."""
        if self.process is None or not self.process.is_alive():
            self._start()
        self.connection.send((kind, suffix, data))
        hung = False
        try:
            if self.connection.poll(self.timeout):
                return self.connection.recv()
            hung = True
        except (EOFError, ConnectionError):  # the pipe closed: the worker died (it may not be reaped yet)
            self.process.join(5)
        self.process.kill()
        self.process.join()
        code, self.process = self.process.exitcode, None
        if hung:
            return Outcome("hang", f"no answer within {self.timeout} s")
        return Outcome("crash", f"worker died with exit code {code}")

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.connection.send(None)
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


def suffix_of(kind: str, path: Path | str) -> str:
    """The name a mutated input is saved under: the readers route by suffix."""
    name = Path(path).name
    if kind == "dicom":
        return ".dcm"
    if kind == "series":
        return "_series"
    if kind == "raster":
        return Path(name).suffix
    return ".nii.gz" if name.endswith(".gz") else ".nii"
