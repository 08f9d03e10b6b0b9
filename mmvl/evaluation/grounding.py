"""Grounding heatmaps: where in a scan a text (a label's positive prompts, or a phrase) is, from any contrastive model,
as a map in the scan's own geometry (behind ``mmvl.grounding``).

Two methods:

- ``"similarity"`` (default): the cosine similarity of each patch token, projected into the joint image-text space by
  the contrastive head's image projection, with the text embedding (the mean of the text's prompts, re-normalised):
  BioViL's phrase grounding and the similarity maps of MaskCLIP/RadZero. A head that knows better offers
  ``patch_similarity(image, text) -> (B, T, N)`` (see :data:`PATCH_SIMILARITY`), and is then preferred.
- ``"gradcam"``: Grad-CAM (Selvaraju et al. 2017) on the image-text cosine similarity, with the encoder's output
  tokens as the feature maps: ``relu(sum_c mean_n(d s / d A_nc) A_nc)``. For models trained without local
  alignment, whose patch tokens are not in the joint space.

A map is computed on the encoder's patch grid, upsampled (bi/trilinear) to the model input, then the
preprocessing's geometry is undone: 2D, the ``ResizePad`` window is cut out and resized to the image's rows and
columns; 3D, the map is resampled (trilinear) from the model input's voxel grid to the scan's through both affines
(``Orient``, ``Resample`` and ``CropOrPad`` all move the affine), so a NIfTI of the map with the scan's affine lies
on the scan. Scan voxels outside the model's field of view (cropped away) get the map's minimum.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmvl.data.inputs import InputItem, scan_items
from mmvl.data.transforms import Pipeline, ResizePad, to_numpy
from mmvl.errors import ConfigError, DataError
from mmvl.evaluation.zero_shot import text_prototypes, zero_shot_probabilities

METHODS = ("similarity", "gradcam")
# The optional head method a grounding map prefers (e.g. a local-alignment head): ``patch_similarity(image, text)``
# with ``image`` the image encoder's EncoderOutput for B images and ``text`` the text encoder's EncoderOutput for T
# tokenized texts (``attention_mask`` set), returning ``(B, T, N)``: a similarity per patch token (N patch tokens in
# the encoder's grid order, prefix tokens left out), larger where the text is. Maps of a text's prompts are averaged.
PATCH_SIMILARITY = "patch_similarity"


# ---------------------------------------------------------------------------------------------------------
# The scan and its geometry through preprocessing
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ScanGeometry:
    """How the model input sits on the scan. ``kind``: ``"2d"`` or ``"3d"``; ``scan_shape``: the scan's spatial
    shape as read ((rows, columns) or (X, Y, Z)); ``input_shape``: the model input's. 2D: ``window`` (top, left,
    rows, columns) is where the resized scan lies in the padded input. 3D: ``scan_affine`` and ``input_affine`` map
    voxel indices to RAS mm."""

    kind: str
    scan_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    window: tuple[int, int, int, int] | None = None
    scan_affine: np.ndarray | None = None
    input_affine: np.ndarray | None = None


@dataclass
class PreparedScan:
    """A scan read and preprocessed: ``image`` (the model input, ``(C, ...)`` float32, equal to ``pipeline(path)``),
    ``scan`` (the scan as read, before any resizing: 2D ``(rows, columns)`` in [0, 1], 3D ``(X, Y, Z)`` in file
    units), its ``geometry`` and the reader's ``meta``."""

    image: torch.Tensor
    scan: np.ndarray
    geometry: ScanGeometry
    meta: dict[str, Any]


def prepare_scan(pipeline: Pipeline, path: str | os.PathLike, **fields: Any) -> PreparedScan:
    """Run ``pipeline`` on one scan, keeping the scan as read and the geometry of every step (see module doc)."""
    if pipeline.split < len(pipeline.transforms):
        raise ConfigError(f"grounding needs a deterministic preprocessing; this one has random steps from step "
                          f"{pipeline.split} ({pipeline.spec[pipeline.split].get('type')})")
    kind = pipeline.kind
    sample: dict[str, Any] = {"path": os.fspath(path), **fields}
    sample = pipeline.transforms[0](sample, None)
    scan = to_numpy(sample["image"])[0].copy()
    meta = dict(sample.get("meta", {}))
    window = None
    affine = getattr(sample["image"], "affine", None)
    for step, transform in zip(pipeline.spec[1:], pipeline.transforms[1:]):
        before = tuple(to_numpy(sample["image"]).shape[1:]) if kind == "2d" else None
        sample = transform(sample, None)
        affine = getattr(sample["image"], "affine", affine)
        if kind == "2d":
            after = tuple(to_numpy(sample["image"]).shape[1:])
            if after == before:
                continue
            if not isinstance(transform, ResizePad) or window is not None or before != scan.shape:
                raise ConfigError(f"grounding cannot undo the 2D step {step} (it changes the image's shape); maps "
                                  "are mapped back through one ResizePad")
            scale = transform.size / max(before)
            resized = tuple(int(round(side * scale)) for side in before)
            top, left = (max(transform.size - side, 0) // 2 for side in resized)
            window = (top, left, *resized)
    image = torch.from_numpy(np.ascontiguousarray(to_numpy(sample["image"])))
    input_shape = tuple(image.shape[1:])
    if kind == "3d":
        geometry = ScanGeometry("3d", tuple(scan.shape), input_shape,
                                scan_affine=np.asarray(meta["affine"], dtype=np.float64),
                                input_affine=np.asarray(to_numpy(affine), dtype=np.float64))
    else:
        geometry = ScanGeometry("2d", tuple(scan.shape), input_shape,
                                window=window or (0, 0, *input_shape))
    return PreparedScan(image=image, scan=scan, geometry=geometry, meta=meta)


def to_scan(maps: torch.Tensor, geometry: ScanGeometry) -> np.ndarray:
    """Maps on the model input's grid, ``(T, *input_shape)``, resampled onto the scan: ``(T, *scan_shape)``."""
    maps = maps.detach().float().cpu()
    if geometry.kind == "2d":
        top, left, rows, columns = geometry.window
        cut = maps[:, top:top + rows, left:left + columns]
        return F.interpolate(cut[None], size=geometry.scan_shape, mode="bilinear", align_corners=False)[0].numpy()
    from scipy.ndimage import map_coordinates

    # scan voxel -> RAS mm -> input voxel; done a slab of the scan's last axis at a time to bound memory
    to_input = np.linalg.inv(geometry.input_affine) @ geometry.scan_affine
    shape = geometry.scan_shape
    out = np.empty((len(maps), *shape), dtype=np.float32)
    grid = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"), 0).reshape(2, -1)
    slab = max(1, int(4_000_000 // max(grid.shape[1], 1)))
    for start in range(0, shape[2], slab):
        ks = np.arange(start, min(start + slab, shape[2]))
        voxels = np.concatenate([np.repeat(grid, len(ks), axis=1), np.tile(ks, grid.shape[1])[None],
                                 np.ones((1, grid.shape[1] * len(ks)))], axis=0)
        where = (to_input @ voxels)[:3]
        for index, volume in enumerate(maps.numpy()):
            values = map_coordinates(volume, where, order=1, mode="constant", cval=np.nan)
            out[index, :, :, start:start + len(ks)] = values.reshape(shape[0], shape[1], len(ks))
    for index in range(len(out)):  # outside the model's field of view: the map's minimum
        outside = np.isnan(out[index])
        if outside.any():
            out[index][outside] = float(maps[index].min())
    return out


# ---------------------------------------------------------------------------------------------------------
# Maps on the patch grid
# ---------------------------------------------------------------------------------------------------------
def token_grid(encoder: nn.Module, n_patches: int, input_shape: Sequence[int]) -> tuple[int, ...]:
    """The patch grid of ``n_patches`` tokens: the encoder's ``grid`` when it has that many cells, else the grid
    of one stride dividing every side of the input (a Swin's last stage)."""
    grid = tuple(getattr(encoder, "grid", ()) or ())
    if grid and math.prod(grid) == n_patches:
        return grid
    for stride in range(1, max(input_shape) + 1):
        candidate = tuple(math.ceil(side / stride) for side in input_shape)
        if math.prod(candidate) == n_patches:
            return candidate
    raise ConfigError(f"cannot lay {n_patches} image tokens on a grid over an input of {tuple(input_shape)}")


def patch_tokens(encoder: nn.Module, output: Any) -> torch.Tensor:
    """``(B, N, D)`` patch tokens in the space of the pooled feature: prefix (class, register) tokens left out and,
    for a timm ViT that pools with a ``fc_norm`` (average pooling), that norm applied to each token as it is to
    their mean."""
    if output.keep_index is not None:
        raise ConfigError("grounding needs every patch token; the encoder dropped some (token_drop at inference?)")
    patches = output.tokens[:, int(getattr(encoder, "num_prefix_tokens", 0) or 0):]
    norm = getattr(getattr(encoder, "model", None), "fc_norm", None)
    if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
        patches = norm(patches)
    return patches


def _projection(model: nn.Module) -> nn.Module | None:
    from mmvl.models.embedders import image_projection

    return image_projection(model)


def _embed(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    projection = _projection(model)
    return F.normalize(projection(pooled) if projection is not None else pooled, dim=-1)


def local_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first head offering :data:`PATCH_SIMILARITY` (e.g. a local-alignment head), with its name, or None."""
    heads = getattr(model, "heads", None)
    for name, head in (heads.items() if isinstance(heads, nn.ModuleDict) else ()):
        if callable(getattr(head, PATCH_SIMILARITY, None)):
            return name, head
    return None


@dataclass
class Texts:
    """What each map is of: ``names`` (a label or the phrase), their ``prompts`` (positive, and negative for a
    probability), and the mean embedding of each side, ``(T, D)`` (negative NaN where there are none)."""

    names: list[str]
    prompts: dict[str, dict[str, list[str]]]
    positive: torch.Tensor
    negative: torch.Tensor


def build_texts(model: nn.Module, phrases: str | Sequence[str] | Mapping[str, Any]) -> Texts:
    """``phrases``: one phrase, a list of phrases, or ``{name: prompts}`` where prompts are a phrase, a list of
    positive prompts, or ``{"positive": [...], "negative": [...]}`` (a label's zero-shot prompts: the map is of the
    positive ones; with negatives a pairwise probability is given too)."""
    if isinstance(phrases, str):
        phrases = [phrases]
    if isinstance(phrases, Mapping):
        entries = dict(phrases)
    elif isinstance(phrases, Sequence) and all(isinstance(p, str) for p in phrases):
        entries = {phrase: [phrase] for phrase in phrases}
    else:
        raise ConfigError(f"grounding: phrases must be a phrase, a list of phrases or a dict of name -> prompts, got "
                          f"{type(phrases).__name__}")
    prompts: dict[str, dict[str, list[str]]] = {}
    for name, entry in entries.items():
        if isinstance(entry, str):
            entry = {"positive": [entry]}
        elif isinstance(entry, Sequence):
            entry = {"positive": list(entry)}
        if not isinstance(entry, Mapping) or not entry.get("positive") or not all(
                isinstance(text, str) and text.strip() for text in [*entry["positive"], *entry.get("negative", [])]):
            raise ConfigError(f"grounding: '{name}' needs one or more non-empty positive prompts, got {entry!r:.120}")
        prompts[str(name)] = {"positive": list(entry["positive"]), "negative": list(entry.get("negative") or [])}
    if not prompts:
        raise ConfigError("grounding: no phrases given")
    positive, negative = text_prototypes(model, prompts)
    return Texts(list(prompts), prompts, positive.float(), negative.float())


def similarity_maps(model: nn.Module, images: torch.Tensor, texts: Texts) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(maps (B, T, *grid), image embeddings (B, D), source)``: per patch, the similarity of the projected patch
    token with each text's mean embedding, or the ``patch_similarity`` of a head that offers one (averaged over a
    text's positive prompts)."""
    encoder = model.image_encoder
    with torch.no_grad():
        output = encoder(images)
        embeddings = _embed(model, output.pooled).float()
        found = local_head(model)
        if found is not None:
            name, head = found
            per_text = []
            for text in texts.names:
                prompts = texts.prompts[text]["positive"]
                tokens = model.text_encoder.tokenize(prompts, images.device)
                text_out = model.text_encoder(tokens["input_ids"], tokens["attention_mask"])
                per_text.append(getattr(head, PATCH_SIMILARITY)(output, text_out).float().mean(dim=1))
            maps, source = torch.stack(per_text, dim=1), f"heads.{name}.{PATCH_SIMILARITY}"
        else:
            patches = _embed(model, patch_tokens(encoder, output)).float()
            maps = patches @ texts.positive.to(patches.device).T  # (B, N, T)
            maps, source = maps.transpose(1, 2), "patch tokens through the contrastive image projection, cosine"
    grid = token_grid(encoder, maps.shape[-1], images.shape[2:])
    return maps.reshape(*maps.shape[:2], *grid), embeddings, source


def gradcam_maps(model: nn.Module, images: torch.Tensor, texts: Texts) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(maps (B, T, *grid), image embeddings (B, D), source)``: Grad-CAM of the image-text cosine similarity on
    the encoder's patch tokens (see module doc)."""
    encoder = model.image_encoder
    with torch.enable_grad():
        output = encoder(images)
        if not output.tokens.requires_grad:
            raise ConfigError("Grad-CAM needs gradients through the image encoder (is it frozen with "
                              "requires_grad=False everywhere?)")
        embeddings = _embed(model, output.pooled).float()
        scores = embeddings @ texts.positive.to(embeddings.device).T  # (B, T)
        prefix = int(getattr(encoder, "num_prefix_tokens", 0) or 0)
        maps = []
        for index in range(scores.shape[1]):
            (grads,) = torch.autograd.grad(scores[:, index].sum(), output.tokens, retain_graph=True,
                                           allow_unused=True)
            if grads is None:
                raise ConfigError(f"Grad-CAM: the pooled feature of {type(encoder).__name__} is not computed from "
                                  "its output tokens; use method='similarity'")
            activations, grads = output.tokens[:, prefix:].detach(), grads[:, prefix:]
            weights = grads.mean(dim=1, keepdim=True)  # (B, 1, D): each channel's mean gradient over the patches
            maps.append(F.relu((weights * activations).sum(-1)))
    maps = torch.stack(maps, dim=1).float()
    grid = token_grid(encoder, maps.shape[-1], images.shape[2:])
    return maps.reshape(*maps.shape[:2], *grid), embeddings.detach(), "Grad-CAM on the image-text cosine similarity"


def to_input(maps: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """``(B, T, *grid)`` maps upsampled to the model input, ``(B, T, *input_shape)`` (bi/trilinear)."""
    mode = "bilinear" if len(input_shape) == 2 else "trilinear"
    return F.interpolate(maps.float(), size=tuple(input_shape), mode=mode, align_corners=False)


# ---------------------------------------------------------------------------------------------------------
# Running over scans
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ScanHeatmaps:
    """The maps of one scan: ``maps[name]`` in the scan's geometry (2D ``(rows, columns)``, 3D ``(X, Y, Z)``, the
    voxels of ``scan`` with ``geometry.scan_affine``); ``similarity[name]`` the image-text cosine similarity and
    ``probability[name]`` the pairwise zero-shot probability (None without negative prompts). ``error`` names why
    a scan could not be read (no maps then)."""

    path: str
    study_id: str = ""
    view: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    similarity: dict[str, float] = field(default_factory=dict)
    probability: dict[str, float | None] = field(default_factory=dict)
    scan: np.ndarray | None = None
    geometry: ScanGeometry | None = None
    method: str = "similarity"
    source: str = ""

    @property
    def affine(self) -> np.ndarray | None:
        return None if self.geometry is None else self.geometry.scan_affine


def compute_maps(model: nn.Module, images: torch.Tensor, texts: Texts, method: str = "similarity"
                 ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Maps on the model input, ``(B, T, *input_shape)``, the image embeddings and what the maps are."""
    if method not in METHODS:
        raise ConfigError(f"grounding: method must be one of {METHODS}, got {method!r}")
    compute = similarity_maps if method == "similarity" else gradcam_maps
    maps, embeddings, source = compute(model, images, texts)
    return to_input(maps, images.shape[2:]), embeddings, source


def iter_heatmaps(loaded: Any, items: Sequence[InputItem], texts: Texts, method: str = "similarity",
                  batch_size: int = 8, device: Any = None) -> Iterator[ScanHeatmaps]:
    """:class:`ScanHeatmaps` of every item, in order (unreadable ones with their ``error``), ``batch_size`` scans
    through the model at a time."""
    net = loaded.model
    device = device if device is not None else next(net.parameters()).device
    scale = float(net.contrastive_head.scale().detach())
    has_negative = ~torch.isnan(texts.negative).any(dim=1)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        results, prepared = [], []
        for item in chunk:
            result = ScanHeatmaps(path=item.path, study_id=item.study_id or "", view=item.view or "",
                                  fields=dict(item.fields), error=item.error or "", method=method)
            if not result.error:
                try:
                    prepared.append((result, prepare_scan(loaded.preprocess, item.path, **item.fields)))
                except DataError as err:
                    result.error = err.problem
            results.append(result)
        if prepared:
            images = torch.stack([scan.image for _, scan in prepared]).to(device)
            maps, embeddings, source = compute_maps(net, images, texts, method)
            similarity = (embeddings @ texts.positive.to(embeddings.device).T).cpu()
            probability = torch.full_like(similarity, float("nan"))
            if has_negative.any():
                columns = has_negative.nonzero()[:, 0]
                probability[:, columns] = zero_shot_probabilities(
                    embeddings.cpu(), texts.positive[columns], texts.negative[columns], scale).cpu()
            for index, (result, scan) in enumerate(prepared):
                on_scan = to_scan(maps[index], scan.geometry)
                result.maps = {name: on_scan[t] for t, name in enumerate(texts.names)}
                result.similarity = {name: float(similarity[index, t]) for t, name in enumerate(texts.names)}
                result.probability = {name: None if math.isnan(value := float(probability[index, t])) else value
                                      for t, name in enumerate(texts.names)}
                result.scan, result.geometry, result.source = scan.scan, scan.geometry, source
        yield from results


def grounding_items(loaded: Any, inputs: Any = (), manifest: Any = None, data_root: Any = None,
                    allow_outside_root: bool = False, limit: int | None = None) -> list[InputItem]:
    """The scans ``mmvl.grounding`` runs on: files/folders (as zero-shot finds them) and manifest rows."""
    return scan_items(loaded, inputs, manifest, data_root, allow_outside_root, limit, what="grounding")
