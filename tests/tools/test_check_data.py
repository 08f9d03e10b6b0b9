"""tools/check_data.py lists every bad-input case with its file and reason, and exits non-zero."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest

from mmvl.data.check import check_manifest

REPO = Path(__file__).resolve().parents[2]
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mmvl_tool_check_data", REPO / "tools" / "check_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def messy(tmp_path, make_dicom, ct_series):
    """A manifest with one good row of each kind and one row for each bad-input case."""
    write_series, phantom = ct_series
    good = make_dicom("good.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8), Modality="CR")
    write_series(tmp_path / "series_ok", phantom())
    nibabel.save(nibabel.Nifti1Image(phantom(), np.eye(4)), tmp_path / "ok.nii.gz")
    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x00" * 30)
    shutil.copy(PYDICOM_FILES / "rtplan.dcm", tmp_path / "no_pixels.dcm")
    wrong = make_dicom("wrong_modality.dcm", np.ones((8, 8), dtype=np.uint16), Modality="US")
    empty = make_dicom("zero.dcm", np.zeros((0, 0), dtype=np.uint16))
    nan = np.ones((4, 4, 4), dtype=np.float32)
    nan[1, 2, 3] = np.nan
    nibabel.save(nibabel.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    series = write_series(tmp_path / "series_bad", phantom())
    ds = pydicom.dcmread(series["paths"][2])
    ds.Rows, ds.Columns = 6, 6  # the others are 10 x 12
    ds.PixelData = np.zeros((6, 6), dtype=np.uint16).tobytes()
    ds.save_as(series["paths"][2])
    report = "FINDINGS: clear lungs. IMPRESSION: normal."
    rows = [
        {"image": str(good), "report": report},
        {"image": "series_ok", "report": report},
        {"image": "ok.nii.gz", "report": report},
        {"image": "corrupt.dcm", "report": report},
        {"image": "no_pixels.dcm", "report": report},
        {"image": str(wrong), "report": report},
        {"image": str(empty), "report": report},
        {"image": "nan.nii.gz", "report": report},
        {"image": "series_bad", "report": report},
        {"image": "missing.dcm", "report": report},
        {"image": str(good), "report": "  "},
    ]
    lines = [json.dumps(r).encode() for r in rows]
    lines.append(json.dumps({"image": str(good), "report": "FINDINGS: caf\u00e9"}).encode()
                 .replace(b"caf\\u00e9", b"caf\xe9"))
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_every_bad_input_case_is_listed_with_file_and_reason(messy):
    pipeline_2d = [dict(type="LoadImage", modalities=("CR", "DX"))]
    n_rows, problems = check_manifest(messy, progress=False)
    assert n_rows == 12
    by_line = {p.line: p for p in problems}
    assert sorted(by_line) == [4, 5, 7, 8, 9, 10, 11, 12]  # lines 1-3 are fine; 6 needs a modality rule
    assert "corrupt or truncated DICOM" in by_line[4].reason
    assert by_line[4].path.endswith("corrupt.dcm") and by_line[4].kind == "unreadable"
    assert "no (7FE0,0010) PixelData: not an image (RT Plan Storage)" in by_line[5].reason
    assert "empty" in by_line[7].reason
    assert "NaN" in by_line[8].reason and by_line[8].path.endswith("nan.nii.gz")
    assert "inconsistent series" in by_line[9].reason and "series_bad" in by_line[9].reason
    assert by_line[10].kind == "missing_file" and by_line[10].path.endswith("missing.dcm")
    assert by_line[11].kind == "empty_report"
    assert by_line[12].kind == "encoding" and "0xe9" in by_line[12].reason
    _, problems = check_manifest(messy, pipeline=pipeline_2d, progress=False, jobs=2)
    wrong = [p for p in problems if p.line == 6]
    assert wrong and "modality 'US' but this pipeline expects ['CR', 'DX']" in wrong[0].reason


def test_check_data_cli(messy, tmp_path, capsys):
    tool = _tool()
    assert tool.main([str(messy), "--out", str(tmp_path / "problems.csv")]) == 1
    out = capsys.readouterr().out
    assert "line 4: " in out and "corrupt.dcm" in out and "checked 12 rows" in out
    assert (tmp_path / "problems.csv").read_text().startswith("line,path,kind,reason")
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(line + "\n" for line in messy.read_text(errors="replace").splitlines()[:3]))
    assert tool.main([str(clean)]) == 0
    assert tool.main([str(tmp_path / "nope.jsonl")]) == 2
    assert tool.main(["--decoders", str(clean)]) == 0
    assert "JPEG-LS Lossless Image Compression" in capsys.readouterr().out
