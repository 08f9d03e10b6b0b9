"""mmvl.evaluation.grounding and overlays: heatmaps in the scan's geometry (2D and 3D), planted toy models whose
patch tokens light up where the test drew something, the patch_similarity interface, Grad-CAM, and the CLIs
(tools/zero_shot.py --heatmaps on a DICOM, a PNG and a DICOM series; tools/ground.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmvl.data.transforms import Pipeline
from mmvl.errors import ConfigError
from mmvl.evaluation.grounding import build_texts, iter_heatmaps, prepare_scan, token_grid
from mmvl.evaluation.overlays import write_heatmaps
from mmvl.loading import LoadedModel
from mmvl.models.encoders.base import EncoderOutput
from tests.conftest import load_tool, write_ct_series, write_dicom

PIPELINE_2D = [{"type": "LoadImage"}, {"type": "ResizePad", "size": 16}, {"type": "Normalize", "mean": 0.5,
                                                                           "std": 0.25}]
PIPELINE_3D = [{"type": "LoadVolume"}, {"type": "Orient", "axcodes": "RAS"}, {"type": "Resample", "spacing": [3, 3, 3]},
               {"type": "IntensityWindow", "low": -1000.0, "high": 1000.0}, {"type": "CropOrPad", "size": [16, 16, 16]}]


class BrightPatches(nn.Module):
    """A planted encoder: patch token n is (mean intensity of patch n, 1), after one prefix token of zeros (2D) that
    grounding must leave out; pooled is the mean of the patch tokens. So a patch's similarity with the text (1, 0)
    grows with its brightness, and the map must peak where the test drew something bright."""

    def __init__(self, patch: int, dims: int):
        super().__init__()
        self.patch, self.dims = patch, dims
        self.num_prefix_tokens = 1 if dims == 2 else 0
        self.weight = nn.Parameter(torch.ones(()))  # gradients flow, as through a real encoder
        self.out_dim = 2

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        pool = F.avg_pool2d if self.dims == 2 else F.avg_pool3d
        means = pool(images, self.patch).flatten(2).transpose(1, 2) * self.weight  # (B, N, 1), grid order
        patches = torch.cat([means, torch.ones_like(means)], dim=-1)
        self.grid = tuple(side // self.patch for side in images.shape[2:])
        tokens = torch.cat([torch.zeros(len(images), self.num_prefix_tokens, 2), patches], dim=1)
        return EncoderOutput(pooled=tokens[:, self.num_prefix_tokens:].mean(dim=1), tokens=tokens)


class Joint(nn.Module):
    """The contrastive head's part grounding uses: an image projection (identity here) and a logit scale."""

    is_contrastive = True

    def __init__(self):
        super().__init__()
        self.image_proj = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.image_proj.weight.copy_(torch.eye(2))

    def scale(self) -> torch.Tensor:
        return torch.tensor(10.0)


class Planted(nn.Module):
    """Image encoder, head, and every text embedded as (1, 0) ("bright"); a text starting with "no " as (0, 1)."""

    def __init__(self, patch: int = 4, dims: int = 2, heads: dict[str, nn.Module] | None = None):
        super().__init__()
        self.image_encoder = BrightPatches(patch, dims)
        self.contrastive_head = Joint()
        self.heads = nn.ModuleDict(heads or {})

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[0.0, 1.0] if text.startswith("no ") else [1.0, 0.0] for text in texts])


def loaded_model(model: nn.Module, spec: list[dict]) -> LoadedModel:
    return LoadedModel(model=model.eval(), preprocess=Pipeline(spec), config={}, source="planted")


def png_with_blob(path: Path) -> Path:
    """40 rows x 30 columns (ResizePad pads it left and right), dark, with a bright square that falls in patch
    (3, 1) of the 16 px input: input rows 12-16 and columns 4-8 are scan rows 30-40 and columns 5-15."""
    pixels = np.full((40, 30), 50, np.uint8)
    pixels[31:39, 6:14] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("method", ["similarity", "gradcam"])
def test_2d_map_peaks_on_the_bright_patch_in_the_scans_geometry(tmp_path, method):
    scan = png_with_blob(tmp_path / "scan.png")
    loaded = loaded_model(Planted(), PIPELINE_2D)
    prepared = prepare_scan(loaded.preprocess, scan)
    assert torch.equal(prepared.image, torch.from_numpy(loaded.preprocess(scan)["image"]))  # what the model sees
    assert prepared.geometry.window == (0, 2, 16, 12) and prepared.scan.shape == (40, 30)
    texts = build_texts(loaded.model, {"bright": {"positive": ["bright"], "negative": ["no bright"]}})
    (result,) = iter_heatmaps(loaded, [type("Item", (), {"path": str(scan), "study_id": None, "view": None,
                                                         "fields": {}, "error": None})()], texts, method=method)
    heatmap = result.maps["bright"]
    assert heatmap.shape == (40, 30)
    row, column = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    assert 30 <= row < 40 and 5 <= column < 15, (row, column)
    assert result.probability["bright"] is not None and 0 < result.probability["bright"] < 1
    if method == "similarity":  # cosine of (m, 1) with (1, 0), m = (mean - 0.5) / 0.25: -0.6 for a dark patch
        assert heatmap[0, 15] == pytest.approx((50 / 255 - 0.5) / 0.25 / np.sqrt(((50 / 255 - 0.5) / 0.25) ** 2 + 1),
                                               abs=0.01)
        assert heatmap.max() > 0.4
    files = write_heatmaps(result, tmp_path / "maps")
    assert [path.name for path in files] == ["scan_bright.png"] and Image.open(files[0]).size[0] > 200


def test_a_heads_patch_similarity_is_preferred(tmp_path):
    """The interface a local-alignment head offers: patch_similarity(image, text) -> (B, T, N)."""

    class Local(nn.Module):
        def patch_similarity(self, image: EncoderOutput, text: EncoderOutput) -> torch.Tensor:
            similarity = torch.zeros(len(image.pooled), len(text.pooled), 16)
            similarity[:, :, 0] = 1.0  # the top-left patch, wherever the image is bright
            return similarity

    class Text(nn.Module):
        def tokenize(self, texts, device):
            return {"input_ids": torch.zeros(len(texts), 3, dtype=torch.long),
                    "attention_mask": torch.ones(len(texts), 3, dtype=torch.long)}

        def forward(self, input_ids, attention_mask):
            return EncoderOutput(pooled=torch.zeros(len(input_ids), 2), tokens=torch.zeros(len(input_ids), 3, 2),
                                 attention_mask=attention_mask)

    model = Planted(heads={"local": Local()})
    model.text_encoder = Text()
    loaded = loaded_model(model, PIPELINE_2D)
    scan = png_with_blob(tmp_path / "scan.png")
    item = type("Item", (), {"path": str(scan), "study_id": None, "view": None, "fields": {}, "error": None})()
    (result,) = iter_heatmaps(loaded, [item], build_texts(model, ["bright"]))
    assert result.source == "heads.local.patch_similarity"
    row, column = np.unravel_index(np.argmax(result.maps["bright"]), (40, 30))
    assert row < 10 and column < 5  # input patch (0, 0): scan rows 0-10, columns 0-5 (columns 0-2 are padding)


def test_3d_map_lies_on_the_blob_in_world_coordinates_and_keeps_the_scans_affine(tmp_path):
    import nibabel as nib

    affine = np.array([[-2.0, 0, 0, 30], [0, 1.5, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])  # LAS, anisotropic
    volume = np.full((20, 24, 16), -800, np.int16)
    volume[3:7, 15:21, 10:14] = 1000
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "ct.nii.gz")
    loaded = loaded_model(Planted(patch=4, dims=3), PIPELINE_3D)
    prepared = prepare_scan(loaded.preprocess, tmp_path / "ct.nii.gz")
    assert torch.equal(prepared.image, torch.from_numpy(loaded.preprocess(tmp_path / "ct.nii.gz")["image"]))
    item = type("Item", (), {"path": str(tmp_path / "ct.nii.gz"), "study_id": None, "view": None, "fields": {},
                             "error": None})()
    for method in ("similarity", "gradcam"):
        (result,) = iter_heatmaps(loaded, [item], build_texts(loaded.model, ["nodule"]), method=method)
        heatmap = result.maps["nodule"]
        assert heatmap.shape == volume.shape and np.allclose(result.affine, affine)
        peak = affine @ [*np.unravel_index(np.argmax(heatmap), heatmap.shape), 1]
        blob = affine @ [4.5, 17.5, 11.5, 1]
        assert np.linalg.norm(peak[:3] - blob[:3]) < 12.0, (method, peak, blob)  # within a 12 mm patch
    files = write_heatmaps(result, tmp_path / "maps")
    assert [path.name for path in files] == ["ct_nodule.png", "ct_nodule.nii.gz"]
    written = nib.load(files[1])
    assert np.allclose(written.affine, affine) and written.shape == volume.shape
    assert np.allclose(written.get_fdata(), heatmap, atol=1e-6)


def test_token_grid_and_bad_phrases():
    encoder = nn.Module()
    assert token_grid(encoder, 16, (32, 32)) == (4, 4)  # no grid attribute: one stride for every side
    encoder.grid = (2, 8)
    assert token_grid(encoder, 16, (16, 64)) == (2, 8)
    with pytest.raises(ConfigError, match="cannot lay 7"):
        token_grid(nn.Module(), 7, (32, 32))
    with pytest.raises(ConfigError, match="positive prompts"):
        build_texts(Planted(), {"effusion": {"positive": []}})
    with pytest.raises(ConfigError, match="phrases must be"):
        build_texts(Planted(), 3)


def test_cli_heatmaps_on_a_dicom_a_png_and_a_dicom_series(tmp_path, one_thread):
    import nibabel as nib

    from tests.zoo.conftest import IMAGE_2D, IMAGE_3D, write_work_dir
    from tests.zoo.conftest import PIPELINE_2D as ZOO_2D
    from tests.zoo.conftest import PIPELINE_3D as ZOO_3D

    work2d = write_work_dir(tmp_path / "w2d", IMAGE_2D, ZOO_2D)
    work3d = write_work_dir(tmp_path / "w3d", IMAGE_3D, ZOO_3D)
    dicom = write_dicom(tmp_path / "scans" / "xray.dcm", np.random.default_rng(0).integers(0, 4000, (48, 40)))
    png = png_with_blob(tmp_path / "scans" / "photo.png")
    hu = np.full((20, 18, 12), -700.0, np.float32)
    hu[5:12, 4:10, 3:9] = 40.0
    series = write_ct_series(tmp_path / "series", hu, spacing=(8.0, 8.0, 8.0))
    zero_shot = load_tool("zero_shot")

    out = tmp_path / "maps2d"
    assert zero_shot.main([str(work2d), str(dicom), str(png), "--labels", "pleural effusion,nodule", "--out",
                           str(tmp_path / "zs.csv"), "--heatmaps", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["photo_nodule.png", "photo_pleural_effusion.png",
                                                     "xray_nodule.png", "xray_pleural_effusion.png"]

    out = tmp_path / "maps3d"
    assert zero_shot.main([str(work3d), str(tmp_path / "series"), "--labels", "nodule", "--out",
                           str(tmp_path / "zs3d.csv"), "--heatmaps", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["series_nodule.nii.gz", "series_nodule.png"]
    written = nib.load(out / "series_nodule.nii.gz")
    assert np.allclose(written.affine, series["affine"]) and written.shape == hu.shape

    ground = load_tool("ground")
    assert ground.main([str(work2d), str(png), str(tmp_path / "notes.txt"), "--phrase", "right pleural effusion",
                        "--out-dir", str(tmp_path / "ground"), "--method", "gradcam", "--device", "cpu"]) == 1
    assert [p.name for p in (tmp_path / "ground").iterdir()] == ["photo_right_pleural_effusion.png"]


def test_mmvl_grounding_rows_errors_and_the_callers_model_left_alone(tmp_path):
    import mmvl

    scan = png_with_blob(tmp_path / "scan.png")
    loaded = loaded_model(Planted(), PIPELINE_2D)
    before = loaded.preprocess
    results = mmvl.grounding(loaded, [scan, tmp_path / "gone.png"], ["bright", "no bright"],
                             reader_options={"frame": 0})
    assert loaded.preprocess is before  # reader options apply to this run only
    assert list(results[0].maps) == ["bright", "no bright"] and results[0].maps["bright"].shape == (40, 30)
    bright = np.unravel_index(np.argmax(results[0].maps["bright"]), (40, 30))
    assert 30 <= bright[0] < 40 and 5 <= bright[1] < 15  # each phrase its own map: "no bright" is (0, 1)
    assert not np.allclose(results[0].maps["no bright"], results[0].maps["bright"])
    assert results[1].error == "no such file or folder" and not results[1].maps
    with pytest.raises(ConfigError, match="method must be one of"):
        mmvl.grounding(loaded, [scan], "bright", method="saliency")


@pytest.mark.parametrize("method", ["similarity", "gradcam"])
def test_resnet3d_maps_lie_on_its_feature_grid(method):
    # the CT demo's convolutional tower: its tokens are the last feature map (a 3^3 grid for 48^3 inputs), which the
    # maps are laid on and upsampled from, like a ViT's patch grid
    from mmvl.evaluation.grounding import Texts, compute_maps
    from mmvl.registry import ENCODERS

    torch.manual_seed(0)
    model = nn.Module()
    model.image_encoder = ENCODERS.build(dict(type="resnet3d", img_size=48, widths=(4, 8, 8, 16), conv1_stride=2,
                                              no_max_pool=True, pooling="max")).eval()
    assert model.image_encoder.grid == (3, 3, 3)
    texts = Texts(["a", "b"], {}, F.normalize(torch.randn(2, 16), dim=-1), torch.full((2, 16), float("nan")))
    images = torch.randn(2, 1, 48, 48, 48)
    maps, embeddings, _ = compute_maps(model, images, texts, method)
    assert maps.shape == (2, 2, 48, 48, 48) and embeddings.shape == (2, 16)
    if method == "similarity":  # by hand: each token's cosine with each text, on the 3^3 grid, upsampled
        with torch.no_grad():
            tokens = F.normalize(model.image_encoder(images).tokens, dim=-1)
        grid = (tokens @ texts.positive.T).transpose(1, 2).reshape(2, 2, 3, 3, 3)
        expected = F.interpolate(grid, size=(48, 48, 48), mode="trilinear", align_corners=False)
        # float32 cosines of 16-d vectors through the same trilinear weights: rounding only
        torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-5)
    else:
        assert torch.isfinite(maps).all() and (maps >= 0).all() and maps.amax() > 0
