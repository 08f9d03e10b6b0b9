"""The entry root as a MONAI bundle: MONAI's own checks and loaders, embeddings compared with mmvl's (2D and 3D)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from mmvl import zoo

# The top-level fields MONAI's metadata schema (meta_schema_20240725.json) requires; the schema itself is a
# download, so its validation (monai.bundle.verify_metadata) does not run offline.
REQUIRED = ["schema", "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
            "task", "description", "authors", "copyright", "network_data_format"]
TENSOR_FIELDS = ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"]


@pytest.mark.parametrize("entry_fixture, shape", [("entry2d", [32, 32]), ("entry3d", [16, 16, 16])])
def test_bundle_loads_with_monai_and_matches(entry_fixture, shape, request, one_thread):
    from monai.bundle import load, verify_net_in_out
    from monai.data import load_net_with_metadata

    entry = request.getfixturevalue(entry_fixture)
    metadata = json.loads((entry / "configs" / "metadata.json").read_text())
    assert all(key in metadata for key in REQUIRED)
    image, pred = metadata["network_data_format"]["inputs"]["image"], metadata["network_data_format"]["outputs"]["pred"]
    assert all(key in image and key in pred for key in TENSOR_FIELDS)
    assert image["spatial_shape"] == shape and image["num_channels"] == 1 and pred["num_channels"] == 32
    assert image["value_range"] == [-2.0, 2.0]  # Normalize(0.5, 0.25) of [0, 1]

    images = torch.randn(3, 1, *shape, generator=torch.Generator().manual_seed(5))
    expected = zoo.load(entry).encode_image(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verify_net_in_out(net_id="network_def", meta_file=str(entry / "configs" / "metadata.json"),
                          config_file=str(entry / "configs" / "inference.json"), device="cpu")
        network = load(name=entry.name, bundle_dir=str(entry.parent), workflow_type="inference", device="cpu",
                       progress=False).eval()
        scripted, meta, _ = load_net_with_metadata(str(entry / "models" / "model.ts"), map_location="cpu")
    with torch.no_grad():
        for got in (network(images), scripted(images)):
            cosine = torch.nn.functional.cosine_similarity(expected, got, dim=-1).min().item()
            assert cosine >= 0.9999
    assert meta["network_data_format"] == metadata["network_data_format"]
    weights = torch.load(entry / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert set(weights) == set(network.state_dict())
