"""Write a synthetic chest X-ray set (DICOM files, free-text reports, four labels) for mmvl demos and tests.

``python datasets/synthetic.py --out data/synthetic_cxr --n 800 --size 128 --seed 0`` writes
``images/*.dcm``, ``manifest.jsonl``, ``train/val/test.jsonl`` and a ``README.md`` dataset card. The output is
byte-for-byte deterministic for a given ``(n, size, seed)``, and sample ``i`` does not depend on ``n``.
``--kind ct`` writes the 3D chest CT set of ``datasets/synthetic_ct.py`` instead (its options follow).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from tqdm import tqdm

FINDINGS = ("pleural effusion", "cardiomegaly", "pneumothorax", "nodule")
FINDING_PROBABILITY = 0.3  # each finding independently; 0.7**4 ~ 24% of studies are normal
SPLITS = ("train", "val", "test")
SPLIT_BLOCK = 10  # every block of 10 consecutive indices holds 8 train, 1 val, 1 test
MIN_SIZE = 32
NARROW_ASPECT = 0.875  # some images are size x round(0.875 * size) so that resize-with-pad is exercised
NARROW_PROBABILITY = 0.25
SEVERITIES = ("small", "moderate", "large")

# Independent random streams per sample, so that e.g. rewording a report leaves the images unchanged.
_SAMPLE_STREAM, _SPLIT_STREAM = 0, 1
_IMPLEMENTATION_UID = generate_uid(entropy_srcs=["mmvl synthetic chest X-ray writer"])
# (0002,0012/0013) fixed here, or pydicom would write its own version into every file meta header.
_IMPLEMENTATION_VERSION = "MMVL_SYNTH_1"
_FIRST_STUDY_DATE = datetime.date(2021, 1, 1)

# Display intensities of the phantom after the intended reader's mapping (0 = black, 1 = white).
_AIR = -0.15  # below the window: clipping matters
_SOFT_TISSUE = 0.58
_LUNG = 0.2
_PNEUMOTHORAX_AIR = 0.04
_FLUID = 0.62
_MEDIASTINUM = 0.76
_HEART = 0.8
_NODULE_CONTRAST = 0.5

# Patient right is image left (PA view, (0020,0020) PatientOrientation "L\F"), so x < 0 is the right lung.
_SIDE_SIGN = {"right": -1.0, "left": 1.0}


# NamedTuples rather than dataclasses: a dataclass with string annotations needs its module in sys.modules,
# which is not the case when a test loads this script with importlib.util.spec_from_file_location.
class _Nodule(NamedTuple):
    x: float  # anatomical coordinates (see _Case)
    y: float
    radius_fraction: float  # radius as a fraction of the image height
    side: str
    lobe: str
    diameter_cm: float


class _Case(NamedTuple):
    """Everything drawn for one sample. Coordinates: x, y in [-1, 1] in units of half the image height,
    x to the image right (patient left), y down; the anatomy is drawn in these units before the per-image
    scale / shift / rotation jitter."""

    labels: dict[str, int]
    modality: str
    photometric: str
    bits_stored: int
    rescale_slope: float
    rescale_intercept: int
    window_fraction: float  # window width as a fraction of the stored range
    window_low_fraction: float  # where the window starts within the room left for it
    narrow: bool
    field_of_view_mm: float
    scale: float
    shift_x: float
    shift_y: float
    angle: float
    lung_cx: float
    lung_cy: float
    lung_a: float
    lung_b: float
    diaphragm_y: float
    dome: float
    heart_cx: float
    heart_cy: float
    ctr: float  # cardiothoracic ratio: heart width / thoracic width
    rib_phase: float
    marking_phase: float
    gain: float
    offset: float
    gradient: float
    noise_sigma: float
    texture_coarse: np.ndarray  # knots of the smooth lung mottling
    texture_fine: np.ndarray
    effusion_side: str = ""  # "right", "left" or "bilateral"
    effusion_severity: str = ""
    pneumothorax_side: str = ""
    pneumothorax_severity: str = ""
    nodules: tuple[_Nodule, ...] = ()

    @property
    def heart_a(self) -> float:
        """Half-width of the heart: ``ctr`` times the half-width of the thorax (outer lung edges)."""
        return self.ctr * (self.lung_cx + self.lung_a)

    @property
    def heart_b(self) -> float:
        """Half-height of the heart; an enlarged heart is a little taller too."""
        return 0.24 * (1.0 + 0.8 * (self.ctr - 0.42))


def _sample_rngs(seed: int, index: int) -> list[np.random.Generator]:
    """Anatomy, pixel-noise, header and report generators of sample ``index``: functions of (seed, index)."""
    return [
        np.random.default_rng(child)
        for child in np.random.SeedSequence([seed, _SAMPLE_STREAM, index]).spawn(4)
    ]


def _splits(seed: int, n: int) -> list[str]:
    """Split of each sample: a seeded permutation of each block of ``SPLIT_BLOCK`` consecutive indices puts
    8 in train, 1 in val and 1 in test, so the split is 80/10/10 and sample i's split does not depend on n."""
    splits = []
    for block in range((n + SPLIT_BLOCK - 1) // SPLIT_BLOCK):
        order = np.random.default_rng([seed, _SPLIT_STREAM, block]).permutation(SPLIT_BLOCK)
        block_splits = ["train"] * SPLIT_BLOCK
        block_splits[order[0]], block_splits[order[1]] = "val", "test"
        splits.extend(block_splits)
    return splits[:n]


# ---------------------------------------------------------------------------------------------------------
# Geometry: soft masks evaluated on coordinate arrays (used for rendering and for placing nodules)
# ---------------------------------------------------------------------------------------------------------


def _inside(distance: np.ndarray, edge: float) -> np.ndarray:
    """Soft indicator of ``distance > 0``: a linear ramp ``2.5 * edge`` wide (cheaper than a logistic and
    as good once there is noise on top)."""
    return np.clip(distance * (1.0 / (2.5 * edge)) + 0.5, 0.0, 1.0)


def _bump(offset: np.ndarray, half_width: float) -> np.ndarray:
    """Smooth compactly supported profile, 1 at ``offset == 0`` and 0 beyond ``half_width``."""
    z = np.clip(1.0 - (offset * (1.0 / half_width)) ** 2, 0.0, 1.0)
    return z * z


def _ellipse_distance(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """First-order signed distance to an ellipse boundary, positive inside."""
    dx, dy = (x - cx) * (1.0 / a), (y - cy) * (1.0 / b)
    return (1.0 - dx * dx - dy * dy) / (2.0 * np.sqrt((dx * (1.0 / a)) ** 2 + (dy * (1.0 / b)) ** 2) + 1e-6)


def _lung_envelope(case: _Case, side: str, x: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
    """Hemithorax ellipse of one lung, without the diaphragm cut (effusions fill it from below)."""
    sign = _SIDE_SIGN[side]
    return _inside(_ellipse_distance(x, y, sign * case.lung_cx, case.lung_cy, case.lung_a, case.lung_b), edge)


def _diaphragm(case: _Case, side: str, x: np.ndarray) -> np.ndarray:
    """Height of the hemidiaphragm dome; the right one sits a little higher, as in most chests."""
    sign = _SIDE_SIGN[side]
    base = case.diaphragm_y - (0.04 if side == "right" else 0.0)
    across = np.clip(((x - sign * case.lung_cx) * (1.0 / (1.1 * case.lung_a))) ** 2, 0.0, 1.0)
    return base - case.dome * (1.0 - across)


def _lung(case: _Case, side: str, x: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
    return _lung_envelope(case, side, x, y, edge) * _inside(_diaphragm(case, side, x) - y, edge)


def _collapsed_lung_distance(case: _Case, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance to the edge of the collapsed lung of a pneumothorax: the lung ellipse shrunk towards
    the hilum / lung base, which opens an apical and lateral gap (larger for larger pneumothoraces)."""
    sign = _SIDE_SIGN[case.pneumothorax_side]
    across, down = {"small": (0.88, 0.82), "moderate": (0.76, 0.7), "large": (0.62, 0.58)}[
        case.pneumothorax_severity
    ]
    # Shrinking towards a point behind the mediastinum keeps the collapsed lung attached at the hilum.
    anchor_x, anchor_y = sign * 0.05, case.diaphragm_y - 0.05
    cx = anchor_x + across * (sign * case.lung_cx - anchor_x)
    cy = anchor_y + down * (case.lung_cy - anchor_y)
    return _ellipse_distance(x, y, cx, cy, across * case.lung_a, down * case.lung_b)


def _fluid_top(case: _Case, side: str, x: np.ndarray) -> np.ndarray:
    """Upper border of a pleural effusion: a meniscus that climbs along the lateral chest wall."""
    height = {"small": 0.16, "moderate": 0.32, "large": 0.52}[case.effusion_severity]
    level = case.diaphragm_y - (0.04 if side == "right" else 0.0) - height
    lateral = np.clip((np.abs(x) - 0.12) * (1.0 / (case.lung_cx + case.lung_a - 0.12)), 0.0, 1.0)
    return level - 0.2 * lateral**2


def _effusion_sides(case: _Case) -> tuple[str, ...]:
    if not case.labels["pleural effusion"]:
        return ()
    return ("right", "left") if case.effusion_side == "bilateral" else (case.effusion_side,)


def _heart(case: _Case, x: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
    """Heart shadow: an ellipse whose left (image right) border bulges towards the apex, lower down."""
    widening = 1.0 + 0.12 * np.clip((y - case.heart_cy) * (1.0 / case.heart_b), -1.0, 1.0) * (
        x > case.heart_cx
    )
    squeezed = case.heart_cx + (x - case.heart_cx) / widening
    return _inside(
        _ellipse_distance(squeezed, y, case.heart_cx, case.heart_cy, case.heart_a, case.heart_b), edge
    )


def _mediastinum(case: _Case, x: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
    """Central shadow above the heart, wider downwards, with the aortic knob on the patient's left."""
    band = _inside(0.11 + 0.03 * np.clip(y + 0.2, 0.0, 1.0) - np.abs(x - 0.01), edge)
    band = band * _inside(case.heart_cy - y, 3.0 * edge)
    knob = _inside(_ellipse_distance(x, y, 0.13, case.lung_cy - 0.36, 0.08, 0.07), edge)
    return np.maximum(band, knob)


def _aerated_lung(case: _Case, x: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
    """Lung that still holds air and shows markings: no pneumothorax gap, no fluid, not behind the heart."""
    aerated = np.zeros(np.broadcast(x, y).shape, dtype=np.float32)
    for side in ("right", "left"):
        lung = _lung(case, side, x, y, edge)
        if case.labels["pneumothorax"] and side == case.pneumothorax_side:
            lung = lung * _inside(_collapsed_lung_distance(case, x, y), edge)
        if side in _effusion_sides(case):
            lung = lung * _inside(_fluid_top(case, side, x) - y, edge)
        aerated = np.maximum(aerated, lung)
    return aerated * (1.0 - _heart(case, x, y, edge)) * (1.0 - _mediastinum(case, x, y, edge))


def _lobe(side: str, y: float, case: _Case) -> str:
    top = case.lung_cy - case.lung_b
    relative = (y - top) / (case.diaphragm_y - top)
    if relative < 0.42:
        return "upper lobe"
    if relative < 0.66:
        return "middle lobe" if side == "right" else "lingula"
    return "lower lobe"


def _place_nodules(case: _Case, rng: np.random.Generator, count: int) -> tuple[_Nodule, ...]:
    """Nodule centres drawn in continuous coordinates (so labels and positions do not depend on ``size``),
    kept where the whole disc lies in aerated lung and away from the other nodules."""
    candidates = np.stack([rng.uniform(-0.75, 0.75, 512), rng.uniform(-0.75, 0.55, 512)], axis=1)
    radii = rng.uniform(0.035, 0.05, count)  # fraction of the image height: 2.2-3.2 px at 64 px
    angles = np.linspace(0.0, 2.0 * np.pi, 8, endpoint=False)
    centre_ok = _aerated_lung(case, candidates[:, 0], candidates[:, 1], 1e-3) > 0.5
    centres: list[tuple[float, float, float]] = []
    for radius_fraction in radii:
        radius = 2.0 * radius_fraction * 1.3  # in half-height units, with a margin
        rim_x = candidates[:, :1] + radius * np.cos(angles)
        rim_y = candidates[:, 1:] + radius * np.sin(angles)
        ok = centre_ok & np.all(_aerated_lung(case, rim_x, rim_y, 1e-3) > 0.5, axis=1)
        for x, y, _ in centres:
            ok &= np.hypot(candidates[:, 0] - x, candidates[:, 1] - y) > 4 * radius
        if not ok.any():  # a crowded chest (large effusion and pneumothorax): relax to the centre only
            ok = centre_ok
        if not ok.any():
            continue
        x, y = candidates[int(np.argmax(ok))]
        centres.append((float(x), float(y), float(radius_fraction)))
    if not centres:  # never happens with the ranges above, but a positive label must be visible
        centres.append((-case.lung_cx, case.lung_cy - 0.3, 0.035))
    nodules = []
    for x, y, radius_fraction in centres:
        side = "right" if x < 0 else "left"
        # The field of view spans the image height.
        diameter_cm = round(2.0 * radius_fraction * case.field_of_view_mm / 10.0, 1)
        nodules.append(_Nodule(x, y, radius_fraction, side, _lobe(side, y, case), diameter_cm))
    return tuple(nodules)


def _sample_case(rng: np.random.Generator, labels: dict[str, int] | None = None) -> _Case:
    """Labels, severities, pose, anatomy and encoding of one study; nothing here depends on the image size.
    ``labels`` (a real report's reading) replace the drawn ones; the stream of draws is the same either way.
    A label of -1 (the report is uncertain) is drawn as present."""
    drawn = {name: int(rng.random() < FINDING_PROBABILITY) for name in FINDINGS}
    labels = drawn if labels is None else {name: int(labels[name]) for name in FINDINGS}
    case = _Case(
        labels=labels,
        modality=str(rng.choice(["DX", "CR"])),
        photometric="MONOCHROME1" if rng.random() < 0.5 else "MONOCHROME2",
        bits_stored=int(rng.integers(12, 17)),
        rescale_slope=float(rng.choice([0.5, 1.0, 2.0])),
        rescale_intercept=int(rng.integers(-1024, 1)),
        window_fraction=float(rng.uniform(0.45, 0.7)),
        window_low_fraction=float(rng.uniform(0.0, 1.0)),
        narrow=bool(rng.random() < NARROW_PROBABILITY),
        field_of_view_mm=float(rng.uniform(270.0, 300.0)),
        scale=float(rng.uniform(0.92, 1.04)),
        shift_x=float(rng.uniform(-0.04, 0.04)),
        shift_y=float(rng.uniform(-0.04, 0.04)),
        angle=float(np.deg2rad(rng.uniform(-3.0, 3.0))),
        lung_cx=float(rng.uniform(0.38, 0.42)),
        lung_cy=float(rng.uniform(0.1, 0.14)),
        lung_a=float(rng.uniform(0.28, 0.31)),
        lung_b=float(rng.uniform(0.84, 0.9)),
        diaphragm_y=float(rng.uniform(0.56, 0.62)),
        dome=float(rng.uniform(0.09, 0.14)),
        heart_cx=float(rng.uniform(0.08, 0.12)),
        heart_cy=float(rng.uniform(0.22, 0.27)),
        ctr=float(rng.uniform(0.58, 0.68) if labels["cardiomegaly"] else rng.uniform(0.36, 0.44)),
        rib_phase=float(rng.uniform(-0.02, 0.02)),
        marking_phase=float(rng.uniform(0.0, 2.0 * np.pi)),
        gain=float(rng.uniform(0.9, 1.1)),
        offset=float(rng.uniform(-0.04, 0.04)),
        gradient=float(rng.uniform(-0.04, 0.04)),
        noise_sigma=float(rng.uniform(0.015, 0.035)),
        texture_coarse=rng.standard_normal((12, 12)).astype(np.float32),
        texture_fine=rng.standard_normal((20, 20)).astype(np.float32),
    )
    if labels["pleural effusion"]:
        case = case._replace(
            effusion_side=str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.4, 0.2])),
            effusion_severity=str(rng.choice(SEVERITIES)),
        )
    if labels["pneumothorax"]:
        case = case._replace(
            pneumothorax_side=str(rng.choice(["right", "left"])),
            pneumothorax_severity=str(rng.choice(SEVERITIES)),
        )
    if labels["nodule"]:  # placed after the other findings, in the lung they leave aerated
        case = case._replace(nodules=_place_nodules(case, rng, int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))))
    return case


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def _interpolation_matrix(coordinates: np.ndarray, knots: int) -> np.ndarray:
    """Linear-interpolation weights (len(coordinates) x knots) of knots spread evenly over [-1, 1]."""
    position = np.clip((coordinates + 1.0) * (0.5 * (knots - 1)), 0.0, knots - 1.0)
    return np.clip(1.0 - np.abs(position[:, None] - np.arange(knots)), 0.0, None).astype(np.float32)


def _smooth_noise(grid: np.ndarray, grid_x: np.ndarray, grid_y: np.ndarray) -> np.ndarray:
    """Bilinear upsampling of a coarse random ``grid`` laid over the image (separable, so two small matrix
    products): smooth texture that looks the same at every image size."""
    return (
        _interpolation_matrix(grid_y, grid.shape[0]) @ grid @ _interpolation_matrix(grid_x, grid.shape[1]).T
    )


def _ribs(case: _Case, x: np.ndarray, y: np.ndarray, px: float) -> np.ndarray:
    """Posterior rib arcs: each leaves the spine, rises a little, then curves down towards the chest wall."""
    lateral = np.abs(x) - 0.08
    curve = -0.12 * lateral + 0.75 * lateral**2
    spacing, first = 0.155, -0.82 + case.rib_phase
    t = (y - curve - first) * (1.0 / spacing)
    number = np.round(t)
    profile = _bump((t - number) * spacing, max(0.03, 1.3 * px))
    return profile * ((number >= 0) & (number <= 8) & (lateral > 0))


def _clavicles(x: np.ndarray, y: np.ndarray, px: float) -> np.ndarray:
    """Two bone bars rising laterally from the sternal notch."""
    lateral = np.clip(np.abs(x), 0.08, 0.78)
    centre = -0.68 - 0.25 * (lateral - 0.08)
    return _bump(y - centre, max(0.045, 2.0 * px)) * ((np.abs(x) > 0.06) & (np.abs(x) < 0.8))


class _Grid(NamedTuple):
    """Pixel coordinates of one image: ``grid_x``/``grid_y`` along the columns/rows and ``image_x`` in image
    units, ``x``/``y`` in the anatomy's frame (after the pose jitter), one pixel ``px`` and the soft ``edge``."""

    grid_x: np.ndarray
    grid_y: np.ndarray
    image_x: np.ndarray
    x: np.ndarray
    y: np.ndarray
    px: float
    edge: float


def _grid(case: _Case, rows: int, columns: int) -> _Grid:
    half = rows / 2.0
    grid_x = ((np.arange(columns) - (columns - 1) / 2.0) / half).astype(np.float32)
    grid_y = ((np.arange(rows) - (rows - 1) / 2.0) / half).astype(np.float32)
    image_x, image_y = np.meshgrid(grid_x, grid_y)
    # Per-image pose jitter: map image coordinates back into the anatomy's frame.
    cos, sin = np.cos(case.angle) / case.scale, np.sin(case.angle) / case.scale
    ux, uy = image_x - case.shift_x, image_y - case.shift_y
    x, y = cos * ux + sin * uy, cos * uy - sin * ux
    px = 1.0 / (half * case.scale)  # one pixel in anatomical units
    return _Grid(grid_x, grid_y, image_x, x, y, px, 0.8 * px)


def _effusion_fluid(case: _Case, side: str, x: np.ndarray, y: np.ndarray, edge: float) -> tuple[np.ndarray, np.ndarray]:
    """Opacity of one side's pleural fluid and its depth below the meniscus."""
    depth = y - _fluid_top(case, side, x)
    below_dome = _inside(_diaphragm(case, side, x) + 0.08 - y, 3.0 * edge)  # the posterior recess
    return _lung_envelope(case, side, x, y, edge) * _inside(depth, 2.5 * edge) * below_dome, depth


def _nodule_disc(nodule: _Nodule, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance inside a nodule's disc (positive inside), in anatomical units."""
    return 2.0 * nodule.radius_fraction - np.sqrt((x - nodule.x) ** 2 + (y - nodule.y) ** 2)


def finding_masks(case: _Case, rows: int, columns: int) -> dict[str, np.ndarray]:
    """Boolean ``(rows, columns)`` masks, on the DICOM pixel grid, of what :func:`_render` draws for each finding the
    case holds: where a soft edge passes half opacity. ``pleural effusion``: the fluid where it stays visible (not
    under the heart or mediastinum, which are drawn over it); ``cardiomegaly``: the cardiac silhouette;
    ``pneumothorax``: the gap between the chest wall and the collapsed lung's pleural line; ``nodule``: every disc."""
    x, y, edge = (grid := _grid(case, rows, columns)).x, grid.y, grid.edge
    heart = _heart(case, x, y, edge)
    masks: dict[str, np.ndarray] = {}
    if case.labels["pleural effusion"]:
        fluid = np.zeros_like(x)
        for side in _effusion_sides(case):
            fluid = np.maximum(fluid, _effusion_fluid(case, side, x, y, edge)[0])
        masks["pleural effusion"] = fluid * (1.0 - heart) * (1.0 - _mediastinum(case, x, y, edge)) > 0.5
    if case.labels["cardiomegaly"]:
        masks["cardiomegaly"] = heart > 0.5
    if case.labels["pneumothorax"]:
        collapsed = _inside(_collapsed_lung_distance(case, x, y), edge)
        masks["pneumothorax"] = _lung(case, case.pneumothorax_side, x, y, edge) * (1.0 - collapsed) > 0.5
    if case.nodules:
        masks["nodule"] = np.any([_nodule_disc(nodule, x, y) > 0 for nodule in case.nodules], axis=0)
    return masks


def _render(case: _Case, rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """Display image (0 = black, 1 = white, not yet clipped) of one case; ``rng`` only adds pixel noise."""
    grid_x, grid_y, image_x, x, y, px, edge = _grid(case, rows, columns)

    body_x, body_y = np.abs(x * (1 / 0.9)), np.abs((y - 0.3) * (1 / 1.35))
    body = _inside(1.0 - (body_x * body_x * body_x + body_y * body_y * body_y), 2.0 * edge)
    image = _AIR + (_SOFT_TISSUE - _AIR) * body
    # Soft tissue is thinner towards the flanks; liver and spleen make the upper abdomen denser.
    image -= 0.25 * np.clip(np.abs(x) - 0.62, 0.0, None) * body
    image += 0.1 * _inside(y - case.diaphragm_y + 0.08, 4.0 * edge) * body

    # Lung fields: dark, with vessels radiating from the hila and smooth mottling.
    markings = 0.04 * _smooth_noise(case.texture_coarse, grid_x, grid_y)
    markings += 0.025 * _smooth_noise(case.texture_fine, grid_x, grid_y)
    for side in ("right", "left"):
        sign = _SIDE_SIGN[side]
        dx, dy = sign * (x - sign * 0.17), y - (case.lung_cy - 0.05)
        radius = np.sqrt(dx * dx + dy * dy) + 1e-3
        # Rays from the hilum are lines of constant dy / radius: stripes in it read as branching vessels.
        vessels = 0.5 + 0.5 * np.cos(case.marking_phase + 9.0 * np.pi * dy / radius + 6.0 * radius)
        fade = np.clip(1.0 - radius * (1.0 / 0.75), 0.0, 1.0)
        markings += (dx > -0.05) * (0.12 * _bump(radius, 0.2) + 0.08 * vessels * fade * fade)
    ribs = _ribs(case, x, y, px)
    lung_value = _LUNG + markings + 0.05 * ribs
    for side in ("right", "left"):
        lung = _lung(case, side, x, y, edge)
        value = lung_value
        if case.labels["pneumothorax"] and side == case.pneumothorax_side:
            distance = _collapsed_lung_distance(case, x, y)
            collapsed = _inside(distance, edge)
            gap_value = _PNEUMOTHORAX_AIR + 0.015 * ribs  # no lung markings beyond the pleural line
            pleural_line = 0.3 * _bump(distance, max(0.015, 1.1 * px))
            value = collapsed * lung_value + (1.0 - collapsed) * gap_value + pleural_line
        image = image * (1.0 - lung) + value * lung
    image += 0.03 * ribs * body  # chest-wall ribs, fainter than over the air-filled lung

    for side in _effusion_sides(case):
        fluid, depth = _effusion_fluid(case, side, x, y, edge)
        value = _FLUID + 0.12 * np.clip(depth * 5.0, 0.0, 1.0)  # denser towards the base
        image = image * (1.0 - fluid) + value * fluid

    # Mediastinum and heart, then spine, trachea and clavicles over them.
    mediastinum = _mediastinum(case, x, y, edge)
    image = image * (1.0 - mediastinum) + _MEDIASTINUM * mediastinum
    heart = _heart(case, x, y, edge)
    image = image * (1.0 - heart) + _HEART * heart
    spine_y = y[:, columns // 2 : columns // 2 + 1]  # the spine runs down the middle: one cosine per row
    vertebrae = 0.5 + 0.5 * np.cos((2.0 * np.pi / 0.14) * (spine_y + 1.0))
    image += _inside(0.065 - np.abs(x), edge) * (0.07 + 0.05 * vertebrae)
    trachea = _inside(0.035 - np.abs(x), edge) * _inside(case.lung_cy - 0.3 - y, 3.0 * edge)
    image -= 0.25 * trachea
    image += 0.22 * _clavicles(x, y, px) * body

    for nodule in case.nodules:
        radius = 2.0 * nodule.radius_fraction
        distance = _nodule_disc(nodule, x, y)
        image += _NODULE_CONTRAST * _inside(distance, edge) * (0.85 + 0.15 * np.clip(distance / radius, 0, 1))

    image = case.offset + case.gain * image + case.gradient * image_x
    return image + case.noise_sigma * rng.standard_normal(image.shape, dtype=np.float32)


def _encode(display: np.ndarray, case: _Case) -> tuple[np.ndarray, float, float]:
    """Stored values and the (0028,1050/1051) window that the intended reader maps back to ``display``:
    display = clip((stored * slope + intercept - (center - width / 2)) / width, 0, 1), inverted for
    MONOCHROME1 (stored values high = dark)."""
    max_stored = 2**case.bits_stored - 1
    width_stored = 2 * int(case.window_fraction * max_stored / 2)  # even, so the centre is exact
    # Leave room for display values in [-0.2, 1.2] on both sides of the window.
    room = max_stored - 1.4 * width_stored
    low_stored = int(0.2 * width_stored + case.window_low_fraction * room)
    shown = 1.0 - display if case.photometric == "MONOCHROME1" else display
    stored = np.clip(np.rint(low_stored + shown * width_stored), 0, max_stored).astype(np.uint16)
    width = width_stored * case.rescale_slope
    center = (low_stored + width_stored // 2) * case.rescale_slope + case.rescale_intercept
    return stored, center, width


# ---------------------------------------------------------------------------------------------------------
# DICOM header
# ---------------------------------------------------------------------------------------------------------


def _ds_text(value: float) -> str:
    """A decimal string (VR DS, at most 16 characters) without float noise."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _write_dicom(
    path: Path,
    stored: np.ndarray,
    center: float,
    width: float,
    case: _Case,
    seed: int,
    size: int,
    index: int,
    rng: np.random.Generator,
) -> None:
    """One DX / CR image with deterministic UIDs, dates and obviously fake identifiers."""
    sop_class = (
        DigitalXRayImageStorageForPresentation if case.modality == "DX" else ComputedRadiographyImageStorage
    )
    entropy = ["mmvl-synthetic-cxr", str(seed), str(size), str(index)]
    study_uid = generate_uid(entropy_srcs=[*entropy, "study"])
    series_uid = generate_uid(entropy_srcs=[*entropy, "series"])
    sop_uid = generate_uid(entropy_srcs=[*entropy, "instance"])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)

    study_date = _FIRST_STUDY_DATE + datetime.timedelta(days=int(rng.integers(0, 3 * 365)))
    age = int(rng.integers(20, 91))
    birth_date = study_date - datetime.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    study_time = f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"

    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
    ds.AccessionNumber = f"SYNACC{int(rng.integers(10**7, 10**8))}"
    ds.Modality = case.modality
    if case.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "mmvl synthetic phantom"
    ds.InstitutionName = "Synthetic General Hospital (fictitious)"
    ds.ReferringPhysicianName = f"SYNTH^REFERRER{int(rng.integers(1, 100)):02d}"
    ds.StudyDescription = "CHEST PA (SYNTHETIC)"
    ds.SeriesDescription = "PA"
    ds.PatientName = f"SYNTH^PATIENT{index:06d}"
    ds.PatientID = f"SYNPID{int(rng.integers(10**7, 10**8))}"
    ds.PatientBirthDate = birth_date.strftime("%Y%m%d")
    ds.PatientSex = str(rng.choice(["F", "M"]))
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"S{int(rng.integers(10**6, 10**7))}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]  # columns run to the patient's left, rows to the feet
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    # (0028,xxxx) Image Pixel module: unsigned 16-bit words holding BitsStored significant bits.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = case.photometric
    ds.Rows, ds.Columns = stored.shape
    spacing = _ds_text(round(case.field_of_view_mm / size, 4))
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = case.bits_stored
    ds.HighBit = case.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = _ds_text(center)  # in rescaled units, (0028,1052/1053) applied first
    ds.WindowWidth = _ds_text(width)
    ds.RescaleIntercept = _ds_text(case.rescale_intercept)
    ds.RescaleSlope = _ds_text(case.rescale_slope)
    ds.RescaleType = "US"  # unspecified units: a radiograph has no Hounsfield scale
    ds.add_new(0x7FE00010, "OW", stored.astype("<u2").tobytes())
    ds.save_as(path, enforce_file_format=True)


# ---------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------

_INDICATIONS = (
    "Cough.",
    "Shortness of breath.",
    "Chest pain.",
    "Fever.",
    "Preoperative evaluation.",
    "Dyspnea on exertion.",
    "Follow-up.",
    "Hypoxia.",
)
_NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "Normal chest radiograph.",
    "No radiographic evidence of acute cardiopulmonary disease.",
)
_NUMBER_WORDS = {2: "two", 3: "three"}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _nodule_location(nodule: _Nodule) -> str:
    return f"{nodule.side} {nodule.lobe}" if nodule.lobe != "lingula" else "lingula"


def _effusion_sentences(case: _Case, rng: np.random.Generator) -> tuple[str, str]:
    """(findings sentence, impression line) of a pleural effusion."""
    severity, side = case.effusion_severity, case.effusion_side
    severity_title = _capital(severity)
    if side == "bilateral":
        finding = _pick(
            rng,
            (
                f"There are {severity} bilateral pleural effusions.",
                f"{severity_title} bilateral pleural effusions, blunting both costophrenic angles.",
                f"Bilateral pleural fluid, {severity} in amount, with meniscus-shaped basal opacities.",
            ),
        )
        impression = _pick(
            rng,
            (
                f"{severity_title} bilateral pleural effusions.",
                "Bilateral pleural effusions.",
                f"{severity_title} bilateral effusions.",
            ),
        )
        return finding, impression
    finding = _pick(
        rng,
        (
            f"There is a {severity} {side} pleural effusion.",
            f"{severity_title} {side} pleural effusion with blunting of the {side} costophrenic angle.",
            f"Blunting of the {side} costophrenic angle with a meniscus, consistent with a {severity} "
            "pleural effusion.",
            f"A {severity} amount of {side} pleural fluid layers at the {side} lung base.",
            f"{severity_title} {side} effusion obscuring the {side} hemidiaphragm.",
        ),
    )
    impression = _pick(
        rng,
        (
            f"{severity_title} {side} pleural effusion.",
            f"{_capital(side)} pleural effusion.",
            f"{_capital(side)} pleural fluid collection, {severity}.",
        ),
    )
    return finding, impression


def _cardiomegaly_sentences(case: _Case, rng: np.random.Generator) -> tuple[str, str]:
    severity = "mild" if case.ctr < 0.62 else "moderate"
    adverb = "mildly" if severity == "mild" else "moderately"
    finding = _pick(
        rng,
        (
            "The heart is enlarged.",
            f"The heart is {adverb} enlarged.",
            "The cardiac silhouette is enlarged.",
            f"{_capital(severity)} cardiomegaly.",
            f"Cardiomegaly, with a cardiothoracic ratio of approximately {case.ctr:.2f}.",
            f"There is {severity} enlargement of the cardiac silhouette.",
        ),
    )
    impression = _pick(
        rng,
        (
            "Cardiomegaly.",
            f"{_capital(severity)} cardiomegaly.",
            "Enlarged cardiac silhouette.",
            "Cardiomegaly; correlate with echocardiography if clinically indicated.",
        ),
    )
    return finding, impression


def _pneumothorax_sentences(case: _Case, rng: np.random.Generator) -> tuple[str, str]:
    severity, side = case.pneumothorax_severity, case.pneumothorax_side
    severity_title = _capital(severity)
    where = "apical" if severity == "small" else "apicolateral"
    finding = _pick(
        rng,
        (
            f"There is a {severity} {side} {where} pneumothorax.",
            f"A {severity} {side} pneumothorax is present, with a visible visceral pleural line at the apex.",
            f"{severity_title} {side} pneumothorax.",
            f"A {side} {where} pleural line is seen with absent lung markings peripherally, consistent "
            f"with a {severity} pneumothorax.",
            f"Visible {side} pleural line with lucency beyond it, compatible with a {severity} pneumothorax.",
            f"{severity_title} {side} {where} pleural air collection with a sharp visceral pleural line.",
        ),
    )
    impression = _pick(
        rng,
        (
            f"{severity_title} {side} pneumothorax.",
            f"{_capital(side)} pneumothorax, {severity}.",
            f"{severity_title} {side} {where} pneumothorax; findings communicated to the referring team.",
        ),
    )
    return finding, impression


def _nodule_sentences(case: _Case, rng: np.random.Generator) -> tuple[str, str]:
    largest = max(case.nodules, key=lambda nodule: nodule.diameter_cm)
    where = _nodule_location(largest)
    size = f"{largest.diameter_cm:.1f} cm"
    if len(case.nodules) > 1:
        places = [f"the {place}" for place in sorted({_nodule_location(nodule) for nodule in case.nodules})]
        located = places[0] if len(places) == 1 else f"{', '.join(places[:-1])} and {places[-1]}"
        count = _NUMBER_WORDS[len(case.nodules)]
        finding = _pick(
            rng,
            (
                f"There are {count} pulmonary nodules, in {located}, the largest measuring {size}.",
                f"{_capital(count)} rounded nodular opacities are seen in {located}, up to {size}.",
            ),
        )
        impression = _pick(
            rng,
            (
                f"Multiple pulmonary nodules, the largest {size} in the {where}; CT chest is recommended.",
                f"{_capital(count)} pulmonary nodules, up to {size}.",
            ),
        )
        return finding, impression
    finding = _pick(
        rng,
        (
            f"There is a {size} nodule in the {where}.",
            f"A {size} rounded nodular opacity is seen in the {where}.",
            f"{size} pulmonary nodule in the {where}.",
            f"A well-circumscribed {size} rounded opacity projects over the {where}.",
            f"A {size} nodule is noted in the {where}.",
        ),
    )
    impression = _pick(
        rng,
        (
            f"{_capital(where)} nodule ({size}); CT chest is recommended for further characterization.",
            f"Pulmonary nodule in the {where}.",
            f"{size} {where} nodule; follow-up CT recommended.",
            f"{_capital(where)} pulmonary nodule measuring {size}.",
        ),
    )
    return finding, impression


def _report(case: _Case, rng: np.random.Generator) -> str:
    """A free-text report whose positive statements match the image and whose other findings are negated
    (or not mentioned). Negations never share a sentence with a positive finding."""
    labels = case.labels
    findings: list[str] = []
    impressions: list[str] = []

    if labels["cardiomegaly"]:
        finding, impression = _cardiomegaly_sentences(case, rng)
        findings.append(finding)
        impressions.append(impression)
        if rng.random() < 0.4:
            findings.append("The mediastinal contours are otherwise unremarkable.")
    else:
        findings.append(
            _pick(
                rng,
                (
                    "Heart size is normal.",
                    "The cardiac silhouette is within normal limits.",
                    "Normal heart size.",
                    "The cardiomediastinal silhouette is within normal limits.",
                    "Cardiomediastinal contours are normal.",
                ),
            )
        )

    lungs_clear = not (labels["nodule"] or labels["pleural effusion"] or labels["pneumothorax"])
    if labels["nodule"]:
        finding, nodule_impression = _nodule_sentences(case, rng)
        findings.append(finding)
        findings.append(_pick(rng, ("The lungs are otherwise clear.", "No focal consolidation.")))
    elif lungs_clear:
        findings.append(
            _pick(rng, ("The lungs are clear.", "Lungs are clear bilaterally.", "No focal consolidation."))
        )
        if rng.random() < 0.3:
            findings.append("No suspicious pulmonary nodule.")
    else:
        findings.append(_pick(rng, ("No focal consolidation.", "No focal airspace opacity.")))

    if labels["pneumothorax"]:
        finding, ptx_impression = _pneumothorax_sentences(case, rng)
        findings.append(finding)
        impressions.insert(0, ptx_impression)  # the most urgent finding comes first
    if labels["pleural effusion"]:
        finding, effusion_impression = _effusion_sentences(case, rng)
        findings.append(finding)
        impressions.insert(1 if labels["pneumothorax"] else 0, effusion_impression)
    if not labels["pneumothorax"] and not labels["pleural effusion"]:
        findings.append(
            _pick(
                rng,
                (
                    "No pleural effusion or pneumothorax.",
                    "There is no pleural effusion or pneumothorax.",
                    "No pleural effusion. No pneumothorax.",
                    "The costophrenic angles are sharp. No pneumothorax.",
                ),
            )
        )
    elif not labels["pneumothorax"]:
        findings.append(
            _pick(rng, ("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."))
        )
    elif not labels["pleural effusion"]:
        findings.append(
            _pick(
                rng,
                (
                    "No pleural effusion.",
                    "There is no pleural effusion.",
                    "The costophrenic angles are sharp.",
                ),
            )
        )
    if labels["nodule"]:
        impressions.append(nodule_impression)

    if rng.random() < 0.6:
        findings.append(
            _pick(
                rng,
                (
                    "No acute osseous abnormality.",
                    "The visualized osseous structures are intact.",
                    "Mild degenerative changes of the thoracic spine.",
                ),
            )
        )

    if not impressions:
        impression_text = _pick(rng, _NORMAL_IMPRESSIONS)
    elif len(impressions) == 1 or rng.random() < 0.5:
        impression_text = " ".join(impressions)
    else:
        impression_text = "\n".join(f"{number}. {line}" for number, line in enumerate(impressions, start=1))

    lines = []
    if rng.random() < 0.7:
        lines.append(_pick(rng, ("EXAMINATION: Chest radiograph, PA view.", "EXAM: CHEST (PA)")))
    if rng.random() < 0.7:
        lines.append(f"INDICATION: {_pick(rng, _INDICATIONS)}")
    if rng.random() < 0.5:
        lines.append(_pick(rng, ("COMPARISON: None.", "COMPARISON: None available.")))
    lines.append(f"FINDINGS: {' '.join(findings)}")
    lines.append(f"IMPRESSION: {impression_text}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Writing the set
# ---------------------------------------------------------------------------------------------------------


def _make_sample(seed: int, index: int, size: int, real: _RealReport | None = None,
                 ) -> tuple[_Case, np.ndarray, str, np.random.Generator]:
    """Case, display image (unclipped), report and header generator of sample ``index``; with ``real``, the
    image draws what that report says and the report is its text."""
    anatomy_rng, noise_rng, header_rng, report_rng = _sample_rngs(seed, index)
    case = _sample_case(anatomy_rng, None if real is None else real.labels)
    columns = int(round(size * NARROW_ASPECT)) if case.narrow else size
    display = _render(case, size, columns, noise_rng)
    return case, display, _report(case, report_rng) if real is None else real.text, header_rng


# ---------------------------------------------------------------------------------------------------------
# Real report text: the even-numbered Indiana University reports (datasets/iu_xray.py)
# ---------------------------------------------------------------------------------------------------------
REPORT_SOURCES = ("template", "iu_xray")
# What the phantom can draw, read from a report by mmvl's labeller (mmvl.evaluation.labeller).
DRAWABLE = {"pleural effusion": ("Pleural Effusion",), "cardiomegaly": ("Cardiomegaly",),
            "pneumothorax": ("Pneumothorax",), "nodule": ("Lung Lesion", "Lung Nodule")}


class _RealReport(NamedTuple):
    report_id: int
    text: str  # FINDINGS / IMPRESSION as in the XML (placeholders kept: training cleans them, as on real data)
    labels: dict[str, int]  # 1 present, 0 absent or not mentioned, -1 the report is uncertain


def _reading(text: str) -> dict[str, int]:
    """The drawable findings of a report: present if the labeller reads any of its observations as positive,
    uncertain (-1) if only as uncertain, else absent."""
    from mmvl.evaluation.labeller import NEGATIVE, POSITIVE, UNCERTAIN, label_observations

    read = label_observations(text, [name for names in DRAWABLE.values() for name in names])
    labels = {}
    for finding, names in DRAWABLE.items():
        values = [read[name] for name in names]
        labels[finding] = 1 if POSITIVE in values else -1 if UNCERTAIN in values else NEGATIVE  # or not mentioned
    return labels


def iu_reports(source: str | os.PathLike | None = None) -> list[_RealReport]:
    """The even-numbered IU reports with a findings or impression section, in report-number order, each with its
    reading. ``source``: an Open-I folder or ``.tgz`` (default: the copy inside an installed torchxrayvision)."""
    iu_xray = _sibling("iu_xray")
    reports = []
    for report in iu_xray.read_reports(source, parity="even"):  # the odd ones are kept for an independent check
        findings, impression = (report.sections.get(name, "").strip() for name in ("findings", "impression"))
        if not report.text():
            continue
        text = "\n".join(f"{name.upper()}: {body}" for name, body in (("findings", findings),
                                                                      ("impression", impression)) if body)
        reports.append(_RealReport(report.report_id, text, _reading(report.text())))
    return reports


def _write_mask(path: Path, mask: np.ndarray) -> None:
    """An 8-bit grayscale PNG, 255 inside and 0 outside, one pixel per DICOM pixel (Pillow writes no timestamp)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path, optimize=False)


def _check_arguments(n: int, size: int, seed: int) -> None:
    for name, value in (("n", n), ("size", size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (number of images to write), got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels so that the findings stay visible, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy SeedSequence entropy), got {seed}")


def _dataset_card(n: int, size: int, seed: int, counts: dict[str, Counter]) -> str:
    split_counts = ", ".join(f"{split} {counts['split'][split]}" for split in SPLITS)
    finding_counts = ", ".join(f"{name} {counts['finding'][name]}" for name in FINDINGS)
    return f"""# Synthetic chest X-ray set (mmvl)

Crude, fully synthetic frontal chest radiographs with free-text reports, written by
`datasets/synthetic.py --n {n} --size {size} --seed {seed}` for mmvl's demo and tests.
No real patient data went into it; the patient identifiers in the DICOM headers are fake
("SYNTH^PATIENT...") and are there only so that tests can check they never leak into manifests.

- `images/*.dcm`: DX or CR DICOM files, 16-bit words with 12-16 bits stored, MONOCHROME1 or
  MONOCHROME2, non-trivial RescaleSlope / RescaleIntercept and a WindowCenter / WindowWidth. Read them
  as: rescale, window to [0, 1] and clip, then invert MONOCHROME1. Patient right is image left.
- `manifest.jsonl`: one row per image: `image` (relative to this folder), `report`, `labels`, `split`,
  `study_id`, `masks`. `train.jsonl`, `val.jsonl`, `test.jsonl` hold the same rows split 80/10/10.
- `masks/<index>_<label>.png`: where each finding present in a study is drawn, 255 inside and 0 outside, on the
  DICOM's pixel grid (same rows and columns); a row's `masks` maps its labels to them (a label without a mask is
  not drawn). Effusion: the fluid where it stays visible (not behind the heart); cardiomegaly: the cardiac
  silhouette; pneumothorax: the gap outside the collapsed lung; nodule: every disc. For grounding evaluation
  (`tools/evaluate.py --task grounding`) and segmentation.
- Deterministic: the same `(n, size, seed)` gives the same bytes, and image `i` does not depend on `n`.

Split sizes: {split_counts}. Positive studies: {finding_counts}.

## Labels

Each finding is drawn independently with probability {FINDING_PROBABILITY}; about a quarter of studies
are normal.

- `pleural effusion`: bright fluid with a meniscus at one or both lung bases (small, moderate or large).
- `cardiomegaly`: heart shadow with a cardiothoracic ratio of 0.58-0.68 (normal: 0.36-0.44).
- `pneumothorax`: an apical / lateral gap on one side, darker than lung and without lung markings,
  bounded by a visible pleural line (small, moderate or large).
- `nodule`: one to three bright discs (radius 3.5-5% of the image height) in aerated lung.

The labels are ground truth of the phantom and are for evaluation only (zero-shot classification,
probing); the reports state the same findings with varied wording, laterality and severity.
"""


def generate(
    out: str | Path, n: int = 800, size: int = 128, seed: int = 0, *, progress: bool = False,
    reports: str = "template", reports_source: str | os.PathLike | None = None,
) -> Path:
    """Write ``n`` synthetic studies of ``size`` pixels under ``out``; returns the ``manifest.jsonl`` path.

    ``progress`` shows a tqdm bar (unless the environment sets ``MMVL_NO_PROGRESS=1``). Files of an
    earlier, larger run in ``out`` are left alone; the manifests list only this run's images.

    ``reports="iu_xray"``: study ``i`` gets the ``i``-th even-numbered Indiana University report (real radiology
    language, :func:`iu_reports`; ``reports_source`` as there) and its image draws the findings mmvl's labeller
    reads in it (:data:`DRAWABLE`; laterality and severity stay random). Rows add ``report_id``; a finding the
    report is uncertain about is drawn and labelled -1 (unknown: left out of AUROCs).
    """
    _check_arguments(n, size, seed)
    if reports not in REPORT_SOURCES:
        raise ValueError(f"reports must be one of {REPORT_SOURCES}, got {reports!r}")
    real = iu_reports(reports_source) if reports == "iu_xray" else None
    if real is not None and n > len(real):
        raise ValueError(f"n={n} but only {len(real)} even-numbered IU reports have findings or an impression")
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(n - 1)))
    rows: list[dict] = []
    splits = _splits(seed, n)
    quiet = not progress or os.environ.get("MMVL_NO_PROGRESS") == "1"
    for index in tqdm(range(n), desc="writing DICOM", unit="img", disable=quiet):
        case, display, report, header_rng = _make_sample(seed, index, size, None if real is None else real[index])
        stored, center, width = _encode(display, case)
        relative = f"images/{index:0{digits}d}.dcm"
        _write_dicom(out / relative, stored, center, width, case, seed, size, index, header_rng)
        masks = {}
        for label, mask in finding_masks(case, *display.shape).items():
            masks[label] = f"masks/{index:0{digits}d}_{label.replace(' ', '_')}.png"
            _write_mask(out / masks[label], mask)
        rows.append(
            {
                "image": relative,
                "report": report,
                "labels": dict(case.labels),
                "split": splits[index],
                "study_id": f"syn{index:0{digits}d}",
                **({} if real is None else {"report_id": real[index].report_id}),
                "masks": masks,
            }
        )

    def write_jsonl(path: Path, selected: list[dict]) -> None:
        path.write_text("".join(json.dumps(row) + "\n" for row in selected), encoding="utf-8")

    manifest = out / "manifest.jsonl"
    write_jsonl(manifest, rows)
    for split in SPLITS:
        write_jsonl(out / f"{split}.jsonl", [row for row in rows if row["split"] == split])
    counts = {
        "split": Counter(row["split"] for row in rows),
        "finding": Counter(name for row in rows for name in FINDINGS if row["labels"][name] == 1),
    }
    card = _dataset_card(n, size, seed, counts)
    if real is not None:
        card += _IU_CARD
    (out / "README.md").write_text(card, encoding="utf-8")
    return manifest


_IU_CARD = """
## Reports: real text (`--reports iu_xray`)

Each study's report is an even-numbered Indiana University chest X-ray report (Open-I, CC BY-NC-ND 4.0; the
`NLMCXR_reports.tgz` of torchxrayvision), in report-number order, FINDINGS and IMPRESSION as written (the `XXXX`
de-identification placeholders are removed when mmvl reads the text). The image draws what mmvl's labeller
(`mmvl.evaluation.labeller`) reads in the report: pleural effusion, cardiomegaly, pneumothorax, and a nodule for
Lung Lesion / Lung Nodule; laterality, severity and size are random, not read. A finding the report is uncertain
about is drawn and labelled -1 (unknown). `report_id` is the report's `pmcId`. Real reports are mostly normal,
so positives are far rarer than in the template set (see the counts above).
"""


def _sibling(script: str) -> ModuleType:
    """``datasets/<script>.py``, loaded by path: datasets/ is not a package."""
    name = f"mmvl_datasets_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{script}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _synthetic_ct() -> ModuleType:
    return _sibling("synthetic_ct")


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    kind = argparse.ArgumentParser(add_help=False)
    kind.add_argument(
        "--kind",
        choices=("cxr", "ct"),
        default="cxr",
        help="cxr: 2D chest X-rays (this script); ct: 3D chest CT, see datasets/synthetic_ct.py --help",
    )
    known, rest = kind.parse_known_args(argv)
    if known.kind == "ct":
        _synthetic_ct().main(rest)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[kind])
    parser.add_argument("--out", default="data/synthetic_cxr", help="output folder (default: %(default)s)")
    parser.add_argument("--n", type=int, default=800, help="number of images (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="image height in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--reports", choices=REPORT_SOURCES, default="template",
                        help="template: generated wording; iu_xray: the even-numbered Indiana University reports, "
                        "each study's image drawing what the report says (default: %(default)s)")
    parser.add_argument("--reports-source", help="iu_xray: an Open-I folder or NLMCXR_reports.tgz (default: the copy "
                        "inside an installed torchxrayvision)")
    args = parser.parse_args(argv)
    try:
        manifest = generate(args.out, n=args.n, size=args.size, seed=args.seed, progress=True,
                            reports=args.reports, reports_source=args.reports_source)
    except ValueError as err:
        parser.error(str(err))
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    splits = Counter(row["split"] for row in rows)
    print(f"studies written: {len(rows)} (" + ", ".join(f"{split} {splits[split]}" for split in SPLITS) + ")")
    for name in FINDINGS:
        positives = sum(row["labels"][name] == 1 for row in rows)
        print(f"  {name:<17} {positives:5d} positive ({positives / len(rows):.0%})")
    normal = sum(not any(row["labels"].values()) for row in rows)
    uncertain = sum(-1 in row["labels"].values() for row in rows)
    if uncertain:
        print(f"  {'uncertain':<17} {uncertain:5d} (a finding labelled -1: drawn, left out of AUROCs)")
    print(f"  {'no finding':<17} {normal:5d}")
    print(f"manifest: {manifest}")


if __name__ == "__main__":
    main(sys.argv[1:])
