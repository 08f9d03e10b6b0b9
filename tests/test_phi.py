"""PHI hygiene: no patient-identifying DICOM header value reaches anything mmvl writes.

Synthetic studies carry recognisable fake identifiers (datasets/synthetic.py sets PatientName, PatientID,
PatientBirthDate, AccessionNumber, InstitutionName, ReferringPhysicianName); two damaged copies make the
readers' error paths run too, one with a header value the pipeline cannot parse set to the patient's name.
After training, zero-shot (API and tool), check_data and export, every byte of every output (logs,
tensorboard, checkpoints, CSV, JSON, the zoo entry) is searched for them, and for the study, series and
instance UIDs, which no output is asked to carry here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from mmvl.data.dicom import read_dicom_image
from mmvl.errors import DicomError
from tests.conftest import load_script, load_tool, tiny_clip_config

PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
            "ReferringPhysicianName")
UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def header_values(files: list[Path], tags) -> set[bytes]:
    values: set[bytes] = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for tag in tags:
            text = str(ds.get(tag, "")).strip()
            for part in {text, *text.split("^")}:
                if len(part) >= 6:  # shorter pieces ("SYNTH") are not identifying and match too much
                    values.add(part.encode())
    return values


def leaks(folders: list[Path], values: set[bytes]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    lowered = {value.lower() for value in values}
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes().lower()
            hits = sorted(value.decode() for value in lowered if value in data)
            if hits:
                found[str(path)] = hits
    return found


def damaged_copies(source: Path, folder: Path) -> list[Path]:
    """A copy with truncated pixel data, and one whose (0028,1050) WindowCenter holds the patient's name."""
    folder.mkdir()
    ds = pydicom.dcmread(source)
    truncated = folder / "truncated.dcm"
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(truncated)
    ds = pydicom.dcmread(source)
    ds.add_new(0x00281050, "LO", str(ds.PatientName))  # WindowCenter, written with a text VR a hostile file may use
    ds.add_new(0x00281051, "DS", "400")
    bad_window = folder / "bad_window.dcm"
    ds.save_as(bad_window)
    return [truncated, bad_window]


def test_reader_errors_do_not_quote_phi(tmp_path, make_dicom):
    import numpy as np

    path = make_dicom("x.dcm", np.zeros((8, 8), np.uint16))
    damaged = damaged_copies(path, tmp_path / "damaged")
    for file in damaged:
        with pytest.raises(DicomError) as info:
            read_dicom_image(file)
        assert info.value.path == str(file)
        assert "SECRET" not in str(info.value) and "PID-SECRET" not in str(info.value), str(info.value)
    assert "<redacted>" in str(pytest.raises(DicomError, read_dicom_image, damaged[1]).value)


@pytest.mark.slow
def test_no_phi_in_any_output(tmp_path, one_thread, capsys):
    from mmvl import zero_shot
    from mmvl.engine.trainer import Trainer

    manifest = Path(load_script("synthetic").generate(tmp_path / "data", n=24, size=64, seed=3))
    dicoms = sorted((tmp_path / "data").rglob("*.dcm"))
    assert dicoms
    damaged = damaged_copies(dicoms[0], tmp_path / "data" / "damaged")
    phi = header_values(dicoms, PHI_TAGS)
    uids = header_values(dicoms, UID_TAGS)
    assert len(phi) > 3 * 24 and uids  # names, ids, birth dates, accession numbers, physicians, institution

    work = tmp_path / "work"
    cfg = tiny_clip_config(manifest, "train.max_steps=3", "train.batch_size=8", "train.val_interval=3",
                           "train.ckpt_interval=3", "optim.warmup_steps=1")
    Trainer(cfg, work).fit()
    out = tmp_path / "out"
    out.mkdir()
    rows = zero_shot(work, [str(tmp_path / "data")], ["pleural effusion"], progress=False)
    assert any(row["error"] for row in rows) and any(not row["error"] for row in rows)
    (out / "api_rows.json").write_text(json.dumps(rows))
    load_tool("zero_shot").main([str(work), str(tmp_path / "data"), "--labels", "pleural effusion,pneumothorax",
                                 "--out", str(out / "preds.csv"), "--device", "cpu"])
    load_tool("check_data").main([str(manifest), "--out", str(out / "problems.csv")])
    broken = tmp_path / "data" / "broken.jsonl"  # check_data's error path on the damaged files
    broken.write_text("".join(json.dumps({"image": str(p), "report": "FINDINGS: clear."}) + "\n" for p in damaged))
    load_tool("check_data").main([str(broken), "--out", str(out / "broken_problems.jsonl")])
    load_tool("export").main([str(work), "--name", "x", "--out", str(tmp_path / "zoo" / "x"), "--formats", "mmvl"])
    console = capsys.readouterr()
    (out / "console.txt").write_text(console.out + console.err)

    folders = [work, out, tmp_path / "zoo"]
    written = {p.relative_to(tmp_path).as_posix() for folder in folders for p in folder.rglob("*")}
    for expected in ("work/train.log", "work/metrics.jsonl", "work/checkpoints/last.pt", "work/preprocess.json",
                     "out/preds.csv", "out/problems.csv", "out/broken_problems.jsonl", "zoo/x/config.json"):
        assert expected in written, sorted(written)
    assert any(name.startswith("work/tensorboard/") for name in written)
    assert leaks([tmp_path / "data"], phi)  # the search finds them where they are: in the input files
    assert not leaks(folders, phi), "PHI in outputs"
    assert not leaks(folders, uids), "DICOM UIDs in outputs"
