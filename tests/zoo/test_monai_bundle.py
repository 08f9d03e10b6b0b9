"""The entry root as a MONAI bundle: MONAI's own checks and loaders, and ``python -m monai.bundle run`` on a folder
of DICOM files (2D) or NIfTI volumes (3D) in a Python where mmvl cannot be imported, its embeddings equal to mmvl's;
what the bundle cannot reproduce exactly is refused (at export, or per file with the file's name)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from mmvl import zoo
from mmvl.zoo._context import NotExportable
from mmvl.zoo.monai_bundle import monai_transforms
from mmvl.zoo.monai_bundle_dicom import BundleInputError, DicomVoid, input_files
from tests.conftest import write_dicom
from tests.zoo.conftest import PIPELINE_2D, PIPELINE_3D, volume_file

# The top-level fields MONAI's metadata schema (meta_schema_20240725.json) requires; the schema itself is a
# download, so its validation (monai.bundle.verify_metadata) does not run offline.
REQUIRED = ["schema", "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
            "task", "description", "authors", "copyright", "network_data_format"]
TENSOR_FIELDS = ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"]
MIN_COSINE = 0.9999

# `python -m monai.bundle run ...` with site-packages on sys.path but without processing its .pth files (-S), so
# mmvl's editable install is not importable; -I: no current directory, no PYTHONPATH. It prints what of mmvl was
# imported at the end (nothing, or the check fails).
RUNNER = """
import importlib.util, runpy, sys
sys.path.append(sys.argv[1])
if importlib.util.find_spec("mmvl") is not None:
    raise SystemExit("mmvl is importable in the isolated runner")
sys.argv = ["monai.bundle", "run", *sys.argv[2:]]
try:
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
finally:
    print("MMVL_MODULES", sorted(name for name in sys.modules if name.split(".")[0] == "mmvl"))
"""


def run_bundle(entry: Path, scans: Path, out: Path, cwd: Path) -> dict[str, torch.Tensor]:
    """Run the bundle in a fresh, mmvl-free Python; ``{file: embedding}`` from its CSV."""
    command = [sys.executable, "-I", "-S", "-c", RUNNER, sysconfig.get_paths()["purelib"],
               "--config_file", str(entry / "configs" / "inference.json"), "--bundle_root", str(entry),
               "--dataset_dir", str(scans), "--output_dir", str(out)]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "MMVL_MODULES []" in result.stdout, result.stdout[-2000:]
    rows = [line.split(",") for line in (out / "embeddings.csv").read_text().splitlines() if line.strip()]
    return {row[0]: torch.tensor([float(value) for value in row[1:]]) for row in rows}


def assert_equal_to_mmvl(entry: Path, embeddings: dict[str, torch.Tensor], files: list[Path]) -> None:
    assert sorted(embeddings) == sorted(str(path) for path in files)
    expected = zoo.load(entry).encode_image([str(path) for path in files])
    got = torch.stack([embeddings[str(path)] for path in files])
    cosine = torch.nn.functional.cosine_similarity(expected, got, dim=-1)
    assert cosine.min().item() >= MIN_COSINE, cosine


@pytest.mark.parametrize("entry_fixture, shape", [("entry2d", [32, 32]), ("entry3d", [16, 16, 16])])
def test_bundle_loads_with_monai_and_matches(entry_fixture, shape, request, one_thread):
    from monai.bundle import load, verify_net_in_out

    entry = request.getfixturevalue(entry_fixture)
    metadata = json.loads((entry / "configs" / "metadata.json").read_text())
    assert all(key in metadata for key in REQUIRED)
    assert "mmvl" not in metadata["required_packages_version"]
    image, pred = metadata["network_data_format"]["inputs"]["image"], metadata["network_data_format"]["outputs"]["pred"]
    assert all(key in image and key in pred for key in TENSOR_FIELDS)
    assert image["spatial_shape"] == shape and image["num_channels"] == 1 and pred["num_channels"] == 32
    assert image["value_range"] == [-2.0, 2.0]  # Normalize(0.5, 0.25) of [0, 1]
    inference = (entry / "configs" / "inference.json").read_text()
    assert "mmvl.models" not in inference and "mmvl.zoo" not in inference

    images = torch.randn(3, 1, *shape, generator=torch.Generator().manual_seed(5))
    expected = zoo.load(entry).encode_image(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verify_net_in_out(net_id="network_def", meta_file=str(entry / "configs" / "metadata.json"),
                          config_file=str(entry / "configs" / "inference.json"), device="cpu", bundle_root=str(entry))
        scripted, meta, extra = load(name=entry.name, bundle_dir=str(entry.parent), load_ts_module=True,
                                     device="cpu", progress=False, config_files=("inference.json",))
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(expected, scripted(images), dim=-1).min().item()
    assert cosine >= MIN_COSINE
    assert meta["network_data_format"] == metadata["network_data_format"]
    assert json.loads(extra["inference.json"])["network_def"].startswith("$torch.jit.load(")
    weights = torch.load(entry / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert set(weights) == set(scripted.state_dict())


def _dicoms(folder: Path) -> list[Path]:
    """DICOMs of every kind the bundle reproduces: LINEAR, LINEAR_EXACT and SIGMOID windows (one of several),
    a modality rescale, MONOCHROME1 and PresentationLUTShape INVERSE, the percentile fallback; three shapes."""
    rng = np.random.default_rng(3)

    def pixels(shape):
        return rng.integers(0, 4096, shape)

    return [
        write_dicom(folder / "linear.dcm", pixels((40, 50)), WindowCenter=500, WindowWidth=2000, RescaleSlope=1,
                    RescaleIntercept=-1024),
        write_dicom(folder / "series" / "exact.dcm", pixels((64, 20)), WindowCenter=[2000, 1500],
                    WindowWidth=[3000, 800], VOILUTFunction="LINEAR_EXACT", RescaleSlope=0.5),
        write_dicom(folder / "sigmoid_mono1.dcm", pixels((32, 32)), WindowCenter=1800, WindowWidth=1500,
                    VOILUTFunction="SIGMOID", PhotometricInterpretation="MONOCHROME1"),
        write_dicom(folder / "no_window", pixels((50, 35)), PresentationLUTShape="INVERSE"),  # found by 'DICM'
    ]


def test_bundle_runs_without_mmvl_on_a_folder_of_dicoms(entry2d, tmp_path, one_thread):
    scans = tmp_path / "scans"
    files = _dicoms(scans)
    (scans / "notes.txt").write_text("not an image")
    embeddings = run_bundle(entry2d, scans, tmp_path / "out", cwd=tmp_path)
    assert_equal_to_mmvl(entry2d, embeddings, files)
    assert "SECRET" not in (tmp_path / "out" / "embeddings.csv").read_text()  # write_dicom's PatientName


def test_bundle_runs_without_mmvl_on_nifti_volumes(entry3d, tmp_path, one_thread):
    scans = tmp_path / "volumes"
    scans.mkdir()
    files = [volume_file(scans, seed) for seed in range(2)]
    embeddings = run_bundle(entry3d, scans, tmp_path / "out", cwd=tmp_path)
    assert_equal_to_mmvl(entry3d, embeddings, files)


def _voi(path: Path, **options):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = Compose([LoadImaged(keys="image", reader="PydicomReader", swap_ij=False, prune_metadata=False,
                                     image_only=True),
                          EnsureChannelFirstd(keys="image", channel_dim="no_channel")])({"image": str(path)})
    return DicomVoid(keys="image", **options)(loaded)["image"]  # outside Compose, which wraps errors


def _voi_lut() -> Sequence:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new(0x00283006, "US", list(range(4096)))  # LUTData
    return Sequence([item])


@pytest.mark.parametrize("attributes, options, problem", [
    ({"VOILUTSequence": _voi_lut()}, {}, "VOILUTSequence"),
    ({"PixelPaddingValue": 0}, {}, "PixelPaddingValue"),
    ({}, {"voi": "window"}, "no \\(0028,1050/1051\\) WindowCenter/Width"),
    ({}, {"modalities": ["CT"]}, "modality 'DX' but this model expects \\['CT'\\]"),
    ({"WindowCenter": 100, "WindowWidth": 0.5}, {}, "WindowWidth must be >= 1"),
])
def test_what_has_no_exact_monai_form_is_refused_with_the_file(make_dicom, attributes, options, problem):
    path = make_dicom("refused.dcm", np.arange(64).reshape(8, 8), **attributes)
    with pytest.raises(BundleInputError, match=f"refused.dcm: .*{problem}"):
        _voi(path, **options)


def test_multi_frame_files_are_refused(make_dicom):
    path = make_dicom("frames.dcm", np.arange(128).reshape(2, 8, 8))
    with pytest.raises(BundleInputError, match="frames.dcm: multi-frame"):
        _voi(path)


def test_the_dicom_header_is_used_then_dropped(make_dicom):
    path = make_dicom("header.dcm", np.arange(64).reshape(8, 8), WindowCenter=30, WindowWidth=40)
    image = _voi(path)
    assert not [key for key in image.meta if len(key) == 8 and key.isalnum() and key.upper() == key]
    assert "SECRET" not in repr(dict(image.meta))
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0


@pytest.mark.parametrize("step, problem", [
    ({"type": "LoadImage", "voi": "lut"}, "VOI LUT Sequence has no MONAI transform"),
    ({"type": "LoadImage", "frame": 1}, "single-frame"),
    ({"type": "LoadVolume", "nan_value": 0.0}, "NaN voxels"),
    ({"type": "RandomAugment2D"}, "'RandomAugment2D' has no MONAI transform"),
    ({"type": "Normalize", "mean": 0.5, "sd": 0.2}, "option\\(s\\) \\['sd'\\]"),
])
def test_a_pipeline_without_an_exact_monai_form_is_not_exported(step, problem):
    with pytest.raises(NotExportable, match=problem):
        monai_transforms([step])
    assert monai_transforms(PIPELINE_2D)[-1] == {"_target_": "NormalizeIntensityd", "keys": "image",
                                                 "subtrahend": 0.5, "divisor": 0.25}
    assert [t["_target_"] for t in monai_transforms(PIPELINE_3D)][:3] == ["LoadImaged", "EnsureChannelFirstd",
                                                                        "Orientationd"]


def test_an_empty_input_folder_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no scans here")
    with pytest.raises(FileNotFoundError, match="no DICOM file under .* \\(1 other files\\)"):
        input_files(str(tmp_path))
    write_dicom(tmp_path / "series" / "slice1.dcm", np.zeros((4, 4)))
    with pytest.raises(FileNotFoundError, match="no NIFTI file .* DICOM series are not read by this bundle"):
        input_files(str(tmp_path), kind="nifti")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        input_files(str(tmp_path / "missing"))
