"""The image encoder as a MONAI bundle at the entry's root, runnable without mmvl: ``models/model.ts`` (the
image embedder traced to TorchScript, checked against eager mmvl), ``configs/inference.json`` (the entry's
``preprocess.json`` as MONAI dictionary transforms, a ``SimpleInferer``, embeddings written to
``<output_dir>/embeddings.csv`` by ``SaveClassificationd``), ``configs/metadata.json``, ``models/model.pt`` (the
state dict) and ``scripts/mmvl_dicom.py`` (the per-file DICOM window as MONAI transforms,
:mod:`mmvl.zoo.monai_bundle_dicom`). One folder is at once an mmvl entry, a Hugging Face-style repo and a MONAI
bundle::

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir SCANS --output_dir OUT

(from the entry folder, or with ``--bundle_root ENTRY``) needs torch, MONAI with ``fire``, and pydicom (2D DICOM
files) or nibabel (3D NIfTI files). A preprocessing step or option with no exact MONAI composition makes the
format not exportable (:class:`NotExportable` says which), never an approximation."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mmvl
from mmvl.data.transforms import ResizePad
from mmvl.models import ImageEmbedder
from mmvl.zoo._context import ExportContext, NotExportable, compare

BUNDLE_VERSION = "0.2.0"
META_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
               "meta_schema_20240725.json")
METADATA_FILE = "configs/metadata.json"
INFERENCE_FILE = "configs/inference.json"
WEIGHTS_FILE = "models/model.pt"
TORCHSCRIPT_FILE = "models/model.ts"
SCRIPTS = "scripts"
DICOM_SCRIPT = "scripts/mmvl_dicom.py"  # a copy of mmvl/zoo/monai_bundle_dicom.py
EMBEDDINGS_FILE = "embeddings.csv"
MONAI_LOGGERS = ("monai.bundle.scripts", "monai.bundle.workflows", "monai.networks.utils")
IMAGE = "image"


def _value_range(pipeline: list[dict[str, Any]]) -> list[float]:
    """The input range after the pipeline: [0, 1] intensities through its last ``Normalize``."""
    low, high = 0.0, 1.0
    for step in pipeline:
        if step.get("type") == "Normalize":
            mean, std = float(step.get("mean", 0.5)), float(step.get("std", 0.5))
            low, high = (low - mean) / std, (high - mean) / std
    return [round(low, 6), round(high, 6)]


def _options(step: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The step's options over ``defaults`` (the mmvl transform's own defaults); any other key is refused."""
    options = {key: value for key, value in step.items() if key != "type"}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise NotExportable(f"preprocess step {step['type']}: option(s) {unknown} have no MONAI bundle equivalent")
    return {**defaults, **options}


def monai_transforms(pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The preprocessing of ``preprocess.json`` as MONAI dictionary transforms (config dicts with ``_target_``),
    step by step with the numerics of mmvl's own transform (:mod:`mmvl.data.transforms`):

    - ``LoadImage`` (2D DICOM): ``LoadImaged`` with ``PydicomReader`` (rescale slope/intercept in float32, rows and
      columns as stored), a channel, then ``DicomVoid`` (the file's window; see :mod:`mmvl.zoo.monai_bundle_dicom`);
    - ``ResizePad``: ``Resized(size_mode="longest")`` + ``SpatialPadd(method="symmetric")``, as the step's docstring
      states;
    - ``LoadVolume`` (3D NIfTI): ``LoadImaged`` with ``NibabelReader(squeeze_non_spatial_dims=True)`` and a channel;
      ``Orient``/``Resample``/``IntensityWindow``/``CropOrPad`` are MONAI transforms in mmvl already;
    - ``Normalize``: ``NormalizeIntensityd(subtrahend=mean, divisor=std)``.
    """
    keys = {"keys": IMAGE}
    out: list[dict[str, Any]] = []
    for step in pipeline:
        kind = step.get("type")
        if kind == "LoadImage":
            options = _options(step, {"frame": 0, "voi": "auto", "window_index": 0, "modalities": None})
            if options["frame"] != 0:
                raise NotExportable(f"LoadImage(frame={options['frame']}): the bundle reads single-frame DICOMs")
            if options["voi"] == "lut":
                raise NotExportable("LoadImage(voi='lut'): a DICOM VOI LUT Sequence has no MONAI transform")
            out += [{"_target_": "LoadImaged", **keys, "reader": "PydicomReader", "swap_ij": False,
                     "prune_metadata": False, "image_only": True},
                    {"_target_": "EnsureChannelFirstd", **keys, "channel_dim": "no_channel"},
                    {"_target_": f"{SCRIPTS}.mmvl_dicom.DicomVoid", **keys, "voi": options["voi"],
                     "window_index": int(options["window_index"]), "modalities": options["modalities"]}]
        elif kind == "ResizePad":
            options = _options(step, {"size": None, "mode": "area", "pad_value": 0.0})
            size = int(options["size"])
            mode = ResizePad.MODES.get(options["mode"])
            if mode is None:
                raise NotExportable(f"ResizePad(mode={options['mode']!r}) is not one of {sorted(ResizePad.MODES)}")
            out += [{"_target_": "Resized", **keys, "spatial_size": size, "size_mode": "longest", "mode": mode},
                    {"_target_": "SpatialPadd", **keys, "spatial_size": [size, size], "method": "symmetric",
                     "mode": "constant", "value": float(options["pad_value"])}]
        elif kind == "LoadVolume":
            options = _options(step, {"modalities": None, "allow_gaps": False, "nan_value": None})
            if options["nan_value"] is not None:
                raise NotExportable("LoadVolume(nan_value=...): replacing NaN voxels has no MONAI transform")
            out += [{"_target_": "LoadImaged", **keys, "reader": "NibabelReader", "squeeze_non_spatial_dims": True,
                     "image_only": True},
                    {"_target_": "EnsureChannelFirstd", **keys, "channel_dim": "no_channel"}]
        elif kind == "Orient":
            options = _options(step, {"axcodes": "RAS"})
            out.append({"_target_": "Orientationd", **keys, "axcodes": options["axcodes"], "labels": None})
        elif kind == "Resample":
            options = _options(step, {"spacing": (1.5, 1.5, 3.0), "mode": "bilinear"})
            out.append({"_target_": "Spacingd", **keys, "pixdim": [float(v) for v in options["spacing"]],
                        "mode": options["mode"], "padding_mode": "border"})
        elif kind == "IntensityWindow":
            options = _options(step, {"low": -1000.0, "high": 1000.0})
            out.append({"_target_": "ScaleIntensityRanged", **keys, "a_min": float(options["low"]),
                        "a_max": float(options["high"]), "b_min": 0.0, "b_max": 1.0, "clip": True})
        elif kind == "CropOrPad":
            options = _options(step, {"size": None, "pad_value": 0.0})
            out.append({"_target_": "ResizeWithPadOrCropd", **keys, "spatial_size": [int(v) for v in options["size"]],
                        "mode": "constant", "value": float(options["pad_value"])})
        elif kind == "Normalize":
            options = _options(step, {"mean": 0.5, "std": 0.5})
            out.append({"_target_": "NormalizeIntensityd", **keys, "subtrahend": float(options["mean"]),
                        "divisor": float(options["std"])})
        else:
            raise NotExportable(f"preprocess step {kind!r} has no MONAI transform in the bundle (an inference "
                                "pipeline holds LoadImage/LoadVolume, ResizePad, Orient, Resample, IntensityWindow, "
                                "CropOrPad and Normalize)")
    return out


def bundle_configs(context: ExportContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata, inference)`` JSON of the bundle (``NotExportable`` when the preprocessing has no exact MONAI
    form)."""
    import monai

    spec = context.input
    embed_dim = context.config["embedding"]["dim"]
    out_dim = embed_dim or int(context.model.image_encoder.out_dim)
    pipeline = context.loaded.preprocess.spec
    transforms = monai_transforms(pipeline)
    volume = spec["kind"] == "3d"
    reader = "nibabel" if volume else "pydicom"
    modality = "CT" if volume else "radiograph"
    metadata = {
        "schema": META_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by mmvl {mmvl.__version__}; runs without mmvl"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {reader: _version(reader), "fire": _version("fire")},
        "name": context.name,
        "task": f"{spec['kind'].upper()} image embedding in a space shared with report text (vision-language "
                "pretraining)",
        "description": "Image encoder of an mmvl vision-language model: "
                       + ("NIfTI volumes" if volume else "DICOM files") + f" under dataset_dir to L2-normalised "
                       f"embeddings, one row per file in output_dir/{EMBEDDINGS_FILE}; zero-shot scores come from "
                       "their similarity to the text embeddings of the same model (mmvl.zoo.load).",
        "authors": "mmvl export",
        "copyright": "see README.md",
        "license": context.config.get("license", "other"),
        "data_type": "nibabel" if volume else "dicom",
        "intended_use": "Research only; not a medical device.",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": modality, "num_channels": spec["in_chans"],
                "spatial_shape": list(spec["spatial_size"]), "dtype": "float32",
                "value_range": _value_range(pipeline), "is_patch_data": False,
                "channel_def": {"0": "image"}}},
            "outputs": {"pred": {
                "type": "tensor", "format": "embedding", "num_channels": out_dim, "spatial_shape": [],
                "dtype": "float32", "value_range": [-1, 1], "is_patch_data": False,
                "channel_def": {"0": "L2-normalised embedding"}}},
        },
    }
    inference = {
        "imports": ["$import os", "$import torch", "$import monai"],
        "bundle_root": ".",
        "dataset_dir": "$os.path.join(@bundle_root, 'scans')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        # the weights travel inside the TorchScript module: no model class, so no mmvl
        "network_def": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location='cpu')",
        "network": "$@network_def.to(@device).eval()",
        "datalist": {"_target_": f"{SCRIPTS}.mmvl_dicom.input_files", "dataset_dir": "@dataset_dir",
                     "kind": "nifti" if volume else "dicom"},
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "saver": {"_target_": "CSVSaver", "output_dir": "@output_dir", "filename": EMBEDDINGS_FILE},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "FromMetaTensord", "keys": IMAGE},
            {"_target_": "SaveClassificationd", "keys": "pred", "meta_keys": f"{IMAGE}_meta_dict", "saver": "@saver"},
        ]},
        # one batch: the inferer on the image, then the postprocessing of each of its rows (no ignite engine)
        "embed_batch": "$lambda batch, network=@network, inferer=@inferer, device=@device, post=@postprocessing: "
                       "[post(row) for row in monai.data.decollate_batch({'image': batch['image'], 'pred': "
                       "inferer(batch['image'].as_tensor().to(device), network).float().cpu()})]",
        "run": ["$torch.set_grad_enabled(False)", "$list(map(@embed_batch, @dataloader))"],
        "finalize": ["$@saver.finalize()"],
        "mmvl_preprocess": "preprocess.json",
    }
    return metadata, inference


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "any"


def write_torchscript(embedder: ImageEmbedder, images: torch.Tensor, path: Path, metadata: dict[str, Any],
                      inference: dict[str, Any]) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """``embedder`` traced on two probe images, checked against eager on the probe batch, a batch of one and new
    random images (the trace records one path through the Python code: a shape-dependent branch would show), and
    saved with the bundle's metadata and inference config inside (``monai.data.load_net_with_metadata`` reads them)."""
    from monai.data import save_net_with_metadata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the encoders' Python-side shape checks
        traced = torch.jit.trace(embedder, images[:2], check_trace=False)
    fresh = torch.randn(images.shape, generator=torch.Generator().manual_seed(1)) * images.std() + images.mean()
    checks = {"probe": compare(embedder(images), traced(images), "MONAI bundle models/model.ts"),
              "batch_1": compare(embedder(images[:1]), traced(images[:1]), "MONAI bundle models/model.ts (batch 1)"),
              "new_images": compare(embedder(fresh), traced(fresh), "MONAI bundle models/model.ts (new images)")}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.save's notice: MONAI bundles are TorchScript
        save_net_with_metadata(traced, str(path), include_config_vals=False, append_timestamp=False,
                               meta_values=metadata,
                               more_extra_files={"inference.json": json.dumps(inference).encode()})
    return traced, checks


def _probe_dicoms(folder: Path, modality: str) -> list[Path]:
    """Two small DICOMs covering the per-file steps: a non-square MONOCHROME1 image with a modality rescale and a
    LINEAR window, and a taller one with no window (the percentile fallback)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rng = np.random.default_rng(0)
    probes = [((37, 23), {"RescaleSlope": 2, "RescaleIntercept": -1000, "WindowCenter": 1000, "WindowWidth": 3000,
                          "PhotometricInterpretation": "MONOCHROME1"}),
              ((29, 41), {})]
    paths = []
    for index, (shape, attributes) in enumerate(probes):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"probe{index}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = modality, shape[0], shape[1], 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        for key, value in attributes.items():
            setattr(ds, key, value)
        ds.PixelData = rng.integers(0, 4096, shape).astype(np.uint16).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def _probe_volumes(folder: Path) -> list[Path]:
    """A small oblique, anisotropic NIfTI volume in Hounsfield units."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    affine = np.array([[0.0, -5.0, 0.0, 20.0], [7.0, 0.0, 0.0, -30.0], [0.0, 0.0, 9.0, 5.0], [0.0, 0.0, 0.0, 1.0]])
    path = folder / "probe.nii.gz"
    nib.save(nib.Nifti1Image((rng.random((21, 17, 11)) * 2000 - 1000).astype(np.float32), affine), str(path))
    return [path]


def check_preprocessing(context: ExportContext, transforms: list[dict[str, Any]], network: Any) -> dict[str, Any]:
    """The bundle's preprocessing (the same MONAI transforms, with :class:`DicomVoid` from mmvl's copy of the
    script) against mmvl's pipeline on probe files, image by image and through ``network``: an export whose
    bundle would preprocess differently is refused, not written."""
    import tempfile

    from monai.bundle import ConfigParser

    script = f"{SCRIPTS}.mmvl_dicom."
    local = [{**step, "_target_": step["_target_"].replace(script, "mmvl.zoo.monai_bundle_dicom.")}
             for step in transforms]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LoadImaged registers every reader; the GPU ones warn where none is found
        bundle_pipeline = ConfigParser({"preprocessing": {"_target_": "Compose", "transforms": local}}) \
            .get_parsed_content("preprocessing")
    mmvl_pipeline = context.loaded.preprocess
    with tempfile.TemporaryDirectory() as tmp:
        if mmvl_pipeline.kind == "3d":
            paths = _probe_volumes(Path(tmp))
        else:
            load = next(step for step in mmvl_pipeline.spec if step["type"] == "LoadImage")
            paths = _probe_dicoms(Path(tmp), (load.get("modalities") or ["DX"])[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PydicomReader: no ImageOrientationPatient in a radiograph
            ours = torch.stack([torch.as_tensor(bundle_pipeline({IMAGE: str(p)})[IMAGE]).float() for p in paths])
        theirs = torch.stack([torch.as_tensor(mmvl_pipeline(p)[IMAGE]) for p in paths])
    if ours.shape != theirs.shape:
        raise NotExportable(f"the bundle's preprocessing gives shape {list(ours.shape)}, mmvl's "
                            f"{list(theirs.shape)}")
    difference = float((ours - theirs).abs().max())
    if difference > 1e-4:
        raise NotExportable(f"the bundle's preprocessing differs from mmvl's by up to {difference:.3g}")
    embedder = ImageEmbedder.from_model(context.model).eval()
    return {"max_abs_diff": difference, "files": len(paths),
            **compare(embedder(theirs), network(ours), "MONAI bundle preprocessing + models/model.ts")}


@torch.no_grad()
def export_monai_bundle(context: ExportContext) -> dict[str, Any]:
    if "image" not in context.parts:
        raise NotExportable("no image encoder in this export (--parts)")
    from monai.bundle import verify_net_in_out
    from monai.data import load_net_with_metadata

    out = context.out
    metadata, inference = bundle_configs(context)  # refuses before anything is written
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    (out / INFERENCE_FILE).write_text(json.dumps(inference, indent=2) + "\n")
    (out / SCRIPTS).mkdir(exist_ok=True)
    (out / SCRIPTS / "__init__.py").write_text("")
    shutil.copyfile(Path(__file__).with_name("monai_bundle_dicom.py"), out / DICOM_SCRIPT)
    embedder = ImageEmbedder.from_model(context.model).eval()
    images = context.probe_images
    traced, checks = write_torchscript(embedder, images, out / TORCHSCRIPT_FILE, metadata, inference)
    checks["preprocessing"] = check_preprocessing(context, inference["preprocessing"]["transforms"], traced)
    torch.save(embedder.state_dict(), out / WEIGHTS_FILE)

    # MONAI logs every step's arguments, and warns of a bundle without logging.conf
    loggers = [logging.getLogger(name) for name in MONAI_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's note on trusting a bundle's config: we wrote it ourselves
            verify_net_in_out(net_id="network_def", meta_file=str(out / METADATA_FILE),
                              config_file=str(out / INFERENCE_FILE), device="cpu", bundle_root=str(out))
            scripted, meta, _ = load_net_with_metadata(str(out / TORCHSCRIPT_FILE), map_location="cpu")
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    checks["reloaded"] = compare(embedder(images), scripted(images), "MONAI bundle models/model.ts (reloaded)")
    checks["verify_net_in_out"] = "passed"
    if meta.get("network_data_format") != metadata["network_data_format"]:
        raise NotExportable("models/model.ts does not carry the bundle metadata")
    return checks
