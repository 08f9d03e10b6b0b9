"""Write a synthetic 3D chest CT set (NIfTI volumes, DICOM series, CT-RATE-style reports, five labels) for mmvl.

It gives mmvl's 3D path (CT CLIP, CT MAE) data to train and test on.

``python datasets/synthetic_ct.py --out data/synthetic_ct --n 800 --size 48 --slices 32 --seed 0`` (or
``python datasets/synthetic.py --kind ct ...``) writes ``nifti/<study>.nii.gz``, ``dicom/<study>/*.dcm``,
``manifest_nifti.jsonl``, ``manifest_dicom.jsonl``, ``{train,val,test}_{nifti,dicom}.jsonl`` and a ``README.md``
dataset card. The output is byte-for-byte deterministic for a given ``(n, size, slices, seed)``, and study ``i``
does not depend on ``n``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm


def _sibling(file_name: str, module_name: str) -> ModuleType:
    """Load a script of this folder (datasets/ is not a package), once per process."""
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, Path(__file__).with_name(file_name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


# The split scheme, decimal-string formatting and report helpers are the chest X-ray generator's.
_cxr = _sibling("synthetic.py", "mmvl_datasets_synthetic")
SPLITS = _cxr.SPLITS

FINDINGS = ("lung nodule", "pleural effusion", "emphysema", "cardiomegaly", "consolidation")  # CT-RATE names
FINDING_PROBABILITY = 0.25  # each finding independently; 0.75**5 ~ 24% of studies are normal
FORMATS = ("nifti", "dicom")
MIN_SIZE = 32
MIN_SLICES = 8
SEVERITIES = ("small", "moderate", "large")
EMPHYSEMA_SEVERITIES = ("mild", "moderate", "severe")

# Acquisition geometry. The phantom is life-size; the matrix is small, so spacings are the realistic ones of a
# 512 x 512 reconstruction (0.6-0.9 mm pixels, 1.0-5.0 mm slices) scaled up: in-plane by 512 / size, through
# the slices so that a 3 mm-equivalent study of a 300 mm scan length has ``slices`` slices.
ORIENTATIONS = ("axial", "axial feet-first", "oblique", "coronal")
_ORIENTATION_P = (0.4, 0.15, 0.2, 0.25)
INSTANCE_ORDERS = ("acquisition", "reversed", "scrambled")  # how (0020,0013) InstanceNumber is assigned
_INSTANCE_ORDER_P = (0.5, 0.3, 0.2)
FOREIGN_SERIES_PROBABILITY = 0.15  # a two-image localizer series shares the study's DICOM folder
_REFERENCE_MATRIX = 512
_PIXEL_MM = (0.6, 0.9)
_SLICE_MM = (1.0, 5.0)
_REFERENCE_SLICE_MM = 3.0
_REFERENCE_SCAN_MM = 300.0
# (0028,0103) PixelRepresentation, (0028,0101) BitsStored, (0028,1052) RescaleIntercept; RescaleSlope is 1.
_ENCODINGS = {"uint12": (0, 12, -1024), "uint16": (0, 16, -1024), "int16": (1, 16, 0), "int16 offset": (1, 16, -1024)}
_HU_RANGE = (-1024, 3071)  # what a 12-bit unsigned CT stores with intercept -1024

# Hounsfield units of the phantom's tissues.
AIR_HU = -1000.0
LUNG_HU = -850.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
LIVER_HU = 58.0
FLUID_HU = 10.0
BONE_HU = 700.0
DISC_HU = 80.0
CSF_HU = 20.0
BULLA_HU = -990.0
CONSOLIDATION_HU = 35.0
_RIB_MM = 8.0  # thickness of the bony ring; ribs are ~10 mm tall

# Independent random streams per study, so that e.g. rewording a report leaves the volumes unchanged.
_STUDY_STREAM = 2  # the chest X-ray generator uses 0 (samples) and 1 (splits)
_IMPLEMENTATION_UID = generate_uid(entropy_srcs=["mmvl synthetic chest CT writer"])
_IMPLEMENTATION_VERSION = "MMVL_SYNCT_1"
_FIRST_STUDY_DATE = datetime.date(2021, 1, 1)
# Smooth parenchymal texture: random lattices in body coordinates (mm), interpolated trilinearly.
_TEXTURE_BOX = ((-200.0, 200.0), (-150.0, 150.0), (-150.0, 300.0))
_TEXTURE_STEPS = (24.0, 10.0)


# NamedTuples rather than dataclasses: see the note in synthetic.py (loaded by file path in the tests).
class Nodule(NamedTuple):
    centre: tuple[float, float, float]  # body coordinates (see Study), mm
    diameter_mm: float
    side: str
    lobe: str


class Consolidation(NamedTuple):
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    side: str
    lobe: str


class Study(NamedTuple):
    """Anatomy and findings of one study; nothing here depends on the matrix size. Body coordinates are
    DICOM patient (LPS) axes in mm, x to the patient's left, y posterior, z to the head, with the origin on the
    body axis at the top of the right hemidiaphragm; scanner coordinates are ``centre`` + body coordinates."""

    labels: dict[str, int]
    centre: tuple[float, float, float]  # scanner (LPS) position of the body origin: table height and position
    body_a: float  # half-width (x) and half-depth (y) of the trunk
    body_b: float
    body_power: float  # superellipse exponent: 2 is an ellipse, larger is boxier
    fat_mm: float  # subcutaneous fat, then chest-wall muscle, then the bony ring
    muscle_mm: float
    dome_right: float  # z of each hemidiaphragm's top; the right sits higher, over the liver
    dome_left: float
    dome_depth: float  # how far the domes fall towards the costophrenic recesses
    apex_z: float
    carina_z: float
    rib_pitch: float
    rib_phase: float  # z of the lowest rib, posteriorly
    rib_drop: float  # ribs run down towards the front
    vertebra_pitch: float
    vertebra_phase: float
    ctr: float  # cardiothoracic ratio: heart width / inner thoracic width
    texture: tuple[np.ndarray, ...]  # lattices at _TEXTURE_STEPS
    effusion_side: str = ""  # "right", "left" or "bilateral"
    effusion_severity: str = ""
    emphysema_severity: str = ""
    bullae: tuple[tuple[float, float, float, float], ...] = ()  # (x, y, z, radius)
    consolidation: Consolidation | None = None
    nodules: tuple[Nodule, ...] = ()

    @property
    def cavity_a(self) -> float:
        """Half-width of the thoracic cavity, inside the ribs."""
        return self.body_a - self.fat_mm - self.muscle_mm - _RIB_MM

    @property
    def cavity_b(self) -> float:
        return self.body_b - self.fat_mm - self.muscle_mm - _RIB_MM

    @property
    def heart_radii(self) -> tuple[float, float, float]:
        rx = self.ctr * self.cavity_a
        return rx, min(0.72 * rx, 0.5 * self.cavity_b), 0.8 * rx

    @property
    def heart_centre(self) -> tuple[float, float, float]:
        # The heart sits on the left hemidiaphragm, left of the midline and anterior.
        return 0.1 * self.cavity_a, -0.3 * self.cavity_b, self.dome_left + self.heart_radii[2] - 12.0

    @property
    def vertebra_y(self) -> float:
        return 0.72 * self.cavity_b


class Geometry(NamedTuple):
    """Acquisition of one study's main series, in scanner (LPS) coordinates; the values are already rounded
    to what the DICOM headers hold, and the NIfTI affine is built from the same numbers."""

    orientation: str
    patient_position: str  # (0018,5100) HFS or FFS
    row_cosines: tuple[float, float, float]  # (0020,0037): direction of increasing column index
    column_cosines: tuple[float, float, float]  # direction of increasing row index
    pixel_spacing: float  # square pixels, mm
    slice_spacing: float  # = slice thickness, mm
    shape: tuple[int, int, int]  # (slices, rows, columns), slices in acquisition order
    first_position: tuple[float, float, float]  # (0020,0032) of the first acquired slice
    direction: int  # +1: the acquisition runs along the slice normal, -1: against it
    instance_order: str
    encoding: str
    foreign_series: bool
    noise_hu: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosines, self.column_cosines)

    @property
    def slice_step(self) -> np.ndarray:
        return self.direction * self.slice_spacing * self.normal

    def position(self, k: int) -> tuple[float, float, float]:
        """(0020,0032) ImagePositionPatient of acquired slice ``k``: the centre of its first voxel."""
        return tuple(round(float(v), 4) for v in np.asarray(self.first_position) + k * self.slice_step)


def _uid(*parts: object) -> str:
    """A UID that is a function of ``parts`` (joined with a separator: pydicom concatenates entropy sources, so
    ("1", "12") and ("11", "2") would collide)."""
    return generate_uid(entropy_srcs=["|".join(map(str, parts))])


def _study_rngs(seed: int, index: int) -> list[np.random.Generator]:
    """Study, geometry, noise, header and report generators of study ``index``: functions of (seed, index)."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence([seed, _STUDY_STREAM, index]).spawn(5)]


# ---------------------------------------------------------------------------------------------------------
# Geometry primitives: soft masks on coordinate arrays (mm)
# ---------------------------------------------------------------------------------------------------------


def _ramp(depth: np.ndarray, edge: float) -> np.ndarray:
    """Soft indicator of ``depth > 0``, a linear ramp ``edge`` mm wide: a cheap partial-volume fraction."""
    return np.clip(depth * (1.0 / edge) + 0.5, 0.0, 1.0)


def _blend(hu: np.ndarray, value: float | np.ndarray, mask: np.ndarray) -> None:
    """Paint ``value`` over ``hu`` with opacity ``mask`` (in place)."""
    hu += (value - hu) * mask


def _ellipsoid_depth(dx, dy, dz, rx: float, ry: float, rz: float = np.inf) -> np.ndarray:
    """First-order signed distance to an ellipsoid (an elliptic cylinder when ``rz`` is infinite), positive
    inside."""
    qx, qy, qz = dx * (1.0 / rx), dy * (1.0 / ry), dz * (1.0 / rz)
    gradient = 2.0 * np.sqrt((qx * (1.0 / rx)) ** 2 + (qy * (1.0 / ry)) ** 2 + (qz * (1.0 / rz)) ** 2)
    return (1.0 - qx * qx - qy * qy - qz * qz) / (gradient + 1e-6)


def _superellipse_depth(x, y, a: float, b: float, power: float) -> np.ndarray:
    """Distance inside a superellipse |x/a|^p + |y/b|^p = 1 measured along the ray from its centre."""
    radius = np.sqrt(x * x + y * y) + 1e-6
    level = (np.abs(x) * (1.0 / a)) ** power + (np.abs(y) * (1.0 / b)) ** power
    return radius * (level ** (-1.0 / power) - 1.0)


def _capsule_depth(x, y, z, start: Sequence[float], end: Sequence[float], radius: float) -> np.ndarray:
    """Signed distance to a capsule (the segment ``start``-``end`` thickened by ``radius``), positive inside."""
    axis = np.subtract(end, start, dtype=np.float64)
    ox, oy, oz = x - start[0], y - start[1], z - start[2]
    t = np.clip((ox * axis[0] + oy * axis[1] + oz * axis[2]) * (1.0 / float(axis @ axis)), 0.0, 1.0)
    return radius - np.sqrt((ox - t * axis[0]) ** 2 + (oy - t * axis[1]) ** 2 + (oz - t * axis[2]) ** 2)


def _trilinear(grid: np.ndarray, step: float, x, y, z) -> np.ndarray:
    """Trilinear interpolation of a lattice laid over _TEXTURE_BOX with knots every ``step`` mm."""
    indices, fractions = [], []
    for coordinate, (low, _), knots in zip((x, y, z), _TEXTURE_BOX, grid.shape):
        u = np.clip((coordinate - low) * (1.0 / step), 0.0, knots - 1.001)
        index = u.astype(np.intp)
        indices.append(index)
        fractions.append((u - index).astype(np.float32))
    value = np.zeros(np.shape(x), np.float32)
    for corner in np.ndindex(2, 2, 2):
        weight = np.ones_like(value)
        for fraction, bit in zip(fractions, corner):
            weight *= fraction if bit else 1.0 - fraction
        value += weight * grid[indices[0] + corner[0], indices[1] + corner[1], indices[2] + corner[2]]
    return value


# ---------------------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------------------

_SIDE_SIGN = {"right": -1.0, "left": 1.0}  # LPS: the patient's left is +x


def _hemithorax_frame(study: Study, side: str) -> tuple[float, float, float, float]:
    """In-plane ellipse of one pleural space: (x centre, y centre, half-width, half-depth)."""
    a, b = study.cavity_a, study.cavity_b
    return _SIDE_SIGN[side] * 0.5 * a, 0.05 * b, 0.47 * a, 0.88 * b


def _dome(study: Study, side: str, x, y) -> np.ndarray:
    """z of one hemidiaphragm: highest under the lung's middle, falling into the costophrenic recesses."""
    cx, _, half_width, half_depth = _hemithorax_frame(study, side)
    top = study.dome_right if side == "right" else study.dome_left
    spread = ((x - cx) * (1.0 / half_width)) ** 2 + ((y + 0.1 * study.cavity_b) * (1.0 / half_depth)) ** 2
    return top - study.dome_depth * np.clip(spread, 0.0, 1.5)


def _hemithorax(study: Study, side: str, x, y, z, edge: float) -> np.ndarray:
    """Soft mask of one pleural space (lung and whatever fills it): an elliptic cylinder that narrows to the
    apex, above its hemidiaphragm."""
    cx, cy, half_width, half_depth = _hemithorax_frame(study, side)
    taper_from = 0.45 * study.apex_z
    above = np.clip(z - taper_from, 0.0, None) * (1.0 / (study.apex_z - taper_from))
    scale = np.sqrt(np.clip(1.0 - above * above, 1e-4, 1.0))
    depth = _ellipsoid_depth(x - cx, y - cy, 0.0, half_width * scale, half_depth * scale)
    return _ramp(depth, edge) * _ramp(z - _dome(study, side, x, y), edge)


def _aorta(study: Study) -> tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...]:
    """Ascending aorta, arch and descending aorta as three segments (radius 14 mm)."""
    hx, hy, hz = study.heart_centre
    arch_z = study.carina_z + 25.0
    ascending = (-8.0, hy + 10.0, hz + 0.6 * study.heart_radii[2])
    descending = (22.0, study.vertebra_y - 24.0, arch_z)
    return (
        (ascending, (-8.0, hy + 10.0, arch_z)),
        ((-8.0, hy + 10.0, arch_z), descending),
        (descending, (22.0, study.vertebra_y - 24.0, -400.0)),
    )


def _airways(study: Study) -> tuple[tuple[tuple[float, float, float], tuple[float, float, float], float], ...]:
    """Trachea and main bronchi: (start, end, lumen radius)."""
    y = study.vertebra_y - 42.0
    carina = (0.0, y, study.carina_z)
    return (
        ((0.0, y, 1000.0), carina, 9.0),
        (carina, (-24.0, y + 8.0, study.carina_z - 22.0), 6.0),  # ending in the mediastinum: no hilar lumps
        (carina, (26.0, y + 8.0, study.carina_z - 26.0), 5.5),
    )


def _mediastinum(study: Study, x, y, z, edge: float) -> np.ndarray:
    """Soft mask of everything between the lungs: a midline band (oesophagus, azygos), the wider upper
    mediastinum, and margins around the heart, aorta, airways and spine. Lungs are cut away from it."""
    b = study.cavity_b
    heart_top = study.heart_centre[2] + study.heart_radii[2]
    band = _ramp(22.0 - np.abs(x - 5.0), edge) * _ramp(y + 0.5 * b, edge)
    upper = _ramp(32.0 - np.abs(x - 5.0), edge) * _ramp(z - heart_top + 10.0, edge) * _ramp(0.6 * b - y, edge)
    mask = np.maximum(band, upper)
    hx, hy, hz = study.heart_centre
    rx, ry, rz = study.heart_radii
    mask = np.maximum(mask, _ramp(_ellipsoid_depth(x - hx, y - hy, z - hz, rx, ry, rz) + 6.0, edge))
    for start, end in _aorta(study):
        mask = np.maximum(mask, _ramp(_capsule_depth(x, y, z, start, end, 18.0), edge))
    for start, end, radius in _airways(study):
        mask = np.maximum(mask, _ramp(_capsule_depth(x, y, z, start, end, radius + 8.0), edge))
    spine = _ellipsoid_depth(x, y - study.vertebra_y, 0.0, 19.0, 16.0) + 6.0
    return np.maximum(mask, _ramp(spine, edge))


def _ribs(study: Study, x, y, z, ring_depth, edge: float) -> np.ndarray:
    """Ribs as segments of the bony ring (``ring_depth`` 0 to _RIB_MM), one every ``rib_pitch`` mm, running
    down towards the front; costal cartilage (soft tissue) near the sternum."""
    ring = _ramp(ring_depth, edge) * _ramp(_RIB_MM - ring_depth, edge)
    front = np.clip(y * (1.0 / study.cavity_b), -1.0, 1.0)
    t = (z + study.rib_drop * (1.0 - front) * 0.5 - study.rib_phase) * (1.0 / study.rib_pitch)
    number = np.round(t)
    rib = _ramp(5.0 - np.abs(t - number) * study.rib_pitch, edge) * ((number >= 0) & (number < 12))
    cartilage = (y < -0.3 * study.cavity_b) & (np.abs(x) < 0.35 * study.cavity_a)
    return ring * rib * ~cartilage


def _lung_value(study: Study, x, y, z) -> np.ndarray:
    """Parenchyma: smooth texture, denser posteriorly (dependent, supine); emphysema lowers it in patches."""
    coarse = _trilinear(study.texture[0], _TEXTURE_STEPS[0], x, y, z)
    fine = _trilinear(study.texture[1], _TEXTURE_STEPS[1], x, y, z)
    dependent = 40.0 * np.clip(y * (1.0 / study.cavity_b), -1.0, 1.0)
    value = LUNG_HU + 18.0 * coarse + 10.0 * fine + dependent
    if study.emphysema_severity:
        depth = {"mild": 60.0, "moderate": 80.0, "severe": 100.0}[study.emphysema_severity]
        value = value - 30.0 - depth * np.clip(fine + 0.4, 0.0, 1.6)
    return value


def _fluid(study: Study, side: str, x, y, z, edge: float) -> np.ndarray:
    """Dependent pleural fluid of one side: the posterior part of the pleural space, deeper towards the base,
    its surface climbing along the lateral wall (a meniscus)."""
    cx, cy, half_width, half_depth = _hemithorax_frame(study, side)
    fraction = {"small": 0.16, "moderate": 0.26, "large": 0.38}[study.effusion_severity]
    top = study.dome_right if side == "right" else study.dome_left
    fraction = fraction * (1.0 + 0.4 * np.clip((top + 60.0 - z) * (1.0 / 120.0), 0.0, 1.0))
    lateral = ((x - cx) * (1.0 / half_width)) ** 2
    level = cy + half_depth * (1.0 - 2.0 * fraction) - 0.3 * half_depth * fraction * lateral
    return _hemithorax(study, side, x, y, z, edge) * _ramp(y - level, edge)


def _effusion_sides(study: Study) -> tuple[str, ...]:
    if not study.effusion_side:
        return ()
    return ("right", "left") if study.effusion_side == "bilateral" else (study.effusion_side,)


def phantom_hu(study: Study, x, y, z, edge: float = 1.0) -> np.ndarray:
    """Noise-free Hounsfield units at body coordinates ``x, y, z`` (mm, float32 arrays); edges are soft over
    ``edge`` mm (about a voxel, as partial volume would make them)."""
    hu = np.full(np.shape(x), AIR_HU, np.float32)
    depth = _superellipse_depth(x, y, study.body_a, study.body_b, study.body_power)
    _blend(hu, FAT_HU, _ramp(depth, edge))
    wall = study.fat_mm + study.muscle_mm
    _blend(hu, SOFT_TISSUE_HU, _ramp(depth - study.fat_mm, edge))
    _blend(hu, BONE_HU, _ribs(study, x, y, z, depth - wall, edge))
    # Inside the ribs: mediastinal fat above the diaphragm, liver (right) and spleen / stomach below it.
    dome = np.where(x < 0.0, _dome(study, "right", x, y), _dome(study, "left", x, y))
    abdomen = np.where(x < 0.0, LIVER_HU, SOFT_TISSUE_HU)
    _blend(hu, FAT_HU + (abdomen - FAT_HU) * _ramp(dome - z, edge), _ramp(depth - wall - _RIB_MM, edge))

    mediastinum = _mediastinum(study, x, y, z, edge)
    lung = np.maximum(_hemithorax(study, "right", x, y, z, edge), _hemithorax(study, "left", x, y, z, edge))
    lung *= 1.0 - mediastinum
    _blend(hu, _lung_value(study, x, y, z), lung)
    for bx, by, bz, radius in study.bullae:
        bulla = _ramp(radius - np.sqrt((x - bx) ** 2 + (y - by) ** 2 + (z - bz) ** 2), edge)
        _blend(hu, BULLA_HU, bulla * lung)
    fluid = np.zeros_like(hu)
    for side in _effusion_sides(study):
        fluid = np.maximum(fluid, _fluid(study, side, x, y, z, edge) * (1.0 - mediastinum))
    _blend(hu, FLUID_HU, fluid)
    if study.consolidation is not None:
        (cx, cy, cz), (rx, ry, rz) = study.consolidation.centre, study.consolidation.radii
        region = _ramp(_ellipsoid_depth(x - cx, y - cy, z - cz, rx, ry, rz), edge)
        _blend(hu, CONSOLIDATION_HU, region * lung * (1.0 - fluid))
    for nodule in study.nodules:
        (nx, ny, nz), radius = nodule.centre, nodule.diameter_mm / 2.0
        _blend(hu, SOFT_TISSUE_HU, _ramp(radius - np.sqrt((x - nx) ** 2 + (y - ny) ** 2 + (z - nz) ** 2), edge))

    hx, hy, hz = study.heart_centre
    rx, ry, rz = study.heart_radii
    heart = _ellipsoid_depth(x - hx, y - hy, z - hz, rx, ry, rz)
    _blend(hu, FAT_HU, _ramp(heart + 5.0, edge) * (1.0 - fluid))  # epicardial fat
    _blend(hu, SOFT_TISSUE_HU, _ramp(heart, edge))
    for start, end in _aorta(study):
        _blend(hu, SOFT_TISSUE_HU, _ramp(_capsule_depth(x, y, z, start, end, 14.0), edge))
    for start, end, radius in _airways(study):
        _blend(hu, SOFT_TISSUE_HU, _ramp(_capsule_depth(x, y, z, start, end, radius + 2.5), edge))
    for start, end, radius in _airways(study):
        _blend(hu, AIR_HU, _ramp(_capsule_depth(x, y, z, start, end, radius), edge))

    # Spine: vertebral bodies with discs between them, the arch around the canal, the spinous process.
    vy = study.vertebra_y
    t = (z - study.vertebra_phase) * (1.0 / study.vertebra_pitch)
    disc = _ramp(2.5 - np.abs(t - np.round(t)) * study.vertebra_pitch, edge)
    _blend(hu, BONE_HU + (DISC_HU - BONE_HU) * disc, _ramp(_ellipsoid_depth(x, y - vy, 0.0, 19.0, 16.0), edge))
    canal_y = vy + 27.0
    canal = np.sqrt(x * x + (y - canal_y) ** 2)
    spinous_end = min(canal_y + 45.0, study.body_b - study.fat_mm - 5.0)
    spinous = np.minimum(5.0 - np.abs(x), np.minimum(y - canal_y, spinous_end - y))
    _blend(hu, BONE_HU, np.maximum(_ramp(15.0 - canal, edge), _ramp(spinous, edge)))
    _blend(hu, CSF_HU, _ramp(9.0 - canal, edge))
    b = study.cavity_b
    sternum_top, sternum_bottom = (0.0, -b - 3.0, study.apex_z - 40.0), (0.0, -b - 3.0, hz - 0.5 * rz)
    _blend(hu, BONE_HU, _ramp(_capsule_depth(x, y, z, sternum_top, sternum_bottom, 7.0), edge))
    return hu


def _lobe(study: Study, side: str, y: float, z: float) -> str:
    """Lobe of a point in one lung: the oblique fissure runs from high posteriorly to low anteriorly, the right
    horizontal fissure cuts off the middle lobe in front."""
    _, cy, _, half_depth = _hemithorax_frame(study, side)
    top = study.dome_right if side == "right" else study.dome_left
    height = (z - top) / (study.apex_z - top)
    back = float(np.clip((y - cy) / half_depth, -1.0, 1.0))
    if height < 0.35 + 0.3 * back:
        return f"{side} lower lobe"
    if side == "right" and height < 0.55:
        return "right middle lobe"
    return f"{side} upper lobe"


# ---------------------------------------------------------------------------------------------------------
# Sampling a study
# ---------------------------------------------------------------------------------------------------------


def _lung_candidates(study: Study, rng: np.random.Generator, count: int) -> np.ndarray:
    """Random points (count x 3) spread over the box that holds both lungs."""
    a, b = study.cavity_a, study.cavity_b
    return np.stack(
        [rng.uniform(-a, a, count), rng.uniform(-b, b, count), rng.uniform(study.dome_left - 30, study.apex_z, count)],
        axis=1,
    ).astype(np.float32)


def _aerated(study: Study, points: np.ndarray) -> np.ndarray:
    """Whether each point (..., 3) lies in air-filled lung (noise-free HU below -650)."""
    return phantom_hu(study, points[..., 0], points[..., 1], points[..., 2]) < -650.0


_SPHERE_DIRECTIONS = (
    np.array([d for d in np.ndindex(3, 3, 3) if d != (1, 1, 1)], dtype=np.float32) - 1.0
)  # the 26 neighbours' directions
_SPHERE_DIRECTIONS /= np.linalg.norm(_SPHERE_DIRECTIONS, axis=1, keepdims=True)


def _clear(study: Study, candidates: np.ndarray, radius: float) -> np.ndarray:
    """Which candidate points (count x 3) have aerated lung at the centre and all around at ``radius`` mm."""
    rim = candidates[:, None, :] + radius * _SPHERE_DIRECTIONS
    return _aerated(study, candidates) & _aerated(study, rim).all(axis=1)


def _place_nodules(study: Study, rng: np.random.Generator, count: int) -> tuple[Nodule, ...]:
    """Nodule centres with aerated lung all around to 32 mm (at least 20 mm beyond the nodule), so that a nodule
    is a blob inside lung, away from walls, vessels, fluid, consolidation, bullae and the other nodules.

    Diameters are 20-30 mm (the top of the nodule range; 30 mm and over is a mass): at the CT demo's 8 mm voxels
    that is 2.5-3.75 voxels across, and smaller nodules (the 12-28 mm drawn before) left no trace a probe or a
    small 3D ViT could find (benchmarks/README.md, bench_findings_visible.py)."""
    candidates = _lung_candidates(study, rng, 384)
    diameters = rng.uniform(20.0, 30.0, count).round()
    nodules: list[Nodule] = []
    for diameter in diameters:
        for clearance in (max(32.0, diameter / 2 + 20), diameter / 2 + 8, diameter / 2):  # relaxed when crowded
            ok = _clear(study, candidates, clearance)
            for bx, by, bz, radius in study.bullae:
                ok &= np.linalg.norm(candidates - (bx, by, bz), axis=1) > radius + clearance
            for other in nodules:
                ok &= np.linalg.norm(candidates - other.centre, axis=1) > other.diameter_mm / 2 + clearance
            if ok.any():
                break
        if not ok.any():
            continue
        x, y, z = (float(v) for v in candidates[int(np.argmax(ok))])
        side = "right" if x < 0 else "left"
        nodules.append(Nodule((x, y, z), float(diameter), side, _lobe(study, side, y, z)))
    return tuple(nodules)


def sample_study(seed: int, index: int) -> Study:
    """Labels, anatomy and findings of study ``index`` (independent of the matrix size and of ``n``)."""
    rng = _study_rngs(seed, index)[0]
    labels = {name: int(rng.random() < FINDING_PROBABILITY) for name in FINDINGS}
    body_a = rng.uniform(140.0, 170.0)
    apex_z = rng.uniform(200.0, 240.0)
    study = Study(
        labels=labels,
        centre=(rng.uniform(-10.0, 10.0), rng.uniform(-30.0, 10.0), rng.uniform(-450.0, -150.0)),
        body_a=body_a,
        body_b=body_a * rng.uniform(0.66, 0.76),
        body_power=rng.uniform(2.2, 2.8),
        fat_mm=rng.uniform(6.0, 18.0),
        muscle_mm=rng.uniform(8.0, 12.0),
        dome_right=0.0,
        dome_left=-rng.uniform(8.0, 20.0),
        dome_depth=rng.uniform(35.0, 55.0),
        apex_z=apex_z,
        carina_z=apex_z - rng.uniform(80.0, 100.0),
        rib_pitch=rng.uniform(22.0, 26.0),
        rib_phase=-rng.uniform(70.0, 90.0),
        rib_drop=rng.uniform(40.0, 60.0),
        vertebra_pitch=rng.uniform(24.0, 28.0),
        vertebra_phase=rng.uniform(0.0, 28.0),
        ctr=rng.uniform(0.58, 0.66) if labels["cardiomegaly"] else rng.uniform(0.38, 0.46),
        texture=tuple(
            rng.standard_normal([int((high - low) / step) + 2 for low, high in _TEXTURE_BOX]).astype(np.float32)
            for step in _TEXTURE_STEPS
        ),
    )
    study = study._replace(centre=tuple(round(float(v), 1) for v in study.centre))
    if labels["pleural effusion"]:
        study = study._replace(
            effusion_side=str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.35, 0.25])),
            effusion_severity=str(rng.choice(SEVERITIES)),
        )
    if labels["emphysema"]:  # bullae in the upper lungs, fewer and smaller when mild
        severity = int(rng.integers(len(EMPHYSEMA_SEVERITIES)))
        study = study._replace(emphysema_severity=EMPHYSEMA_SEVERITIES[severity])
        candidates = _lung_candidates(study, rng, 256)
        upper = _aerated(study, candidates) & (candidates[:, 2] > 0.45 * study.apex_z)
        chosen = candidates[upper][: 2 + 2 * severity + int(rng.integers(2))]
        radii = rng.uniform(8.0 + 3.0 * severity, 16.0 + 5.0 * severity, len(chosen)).round()
        study = study._replace(bullae=tuple((*map(float, p), float(r)) for p, r in zip(chosen, radii)))
    if labels["consolidation"]:
        candidates = _lung_candidates(study, rng, 256)
        clear = _clear(study, candidates, 15.0)
        # A segmental-to-lobar consolidation, 60-100 mm across: with 48-80 mm (the earlier 24-40 mm radii) a
        # probe at the demo's 8 mm voxels told it from normal lung barely above chance (AUROC ~0.6).
        radii = tuple(float(r) for r in rng.uniform(30.0, 50.0, 3).round())
        x, y, z = (float(v) for v in candidates[int(np.argmax(clear))])
        side = "right" if x < 0 else "left"
        study = study._replace(consolidation=Consolidation((x, y, z), radii, side, _lobe(study, side, y, z)))
    if labels["lung nodule"]:  # placed last, in the lung the other findings leave aerated
        # One to three nodules: several nodules are common in CT-RATE's "lung nodule" positives, and more than one
        # blob of 2.5-3.75 voxels makes the finding easier to see at the demo's resolution.
        count = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
        study = study._replace(nodules=_place_nodules(study, rng, count))
    # A finding with no room left in the lungs is dropped, so that a positive label is always visible (never
    # happened in 1500 studies: there are hundreds of candidate positions).
    if labels["consolidation"] and not clear.any():
        labels["consolidation"], study = 0, study._replace(consolidation=None)
    labels["lung nodule"] = int(bool(study.nodules))
    return study


def _rotation(x_degrees: float, y_degrees: float) -> np.ndarray:
    ax, ay = np.deg2rad(x_degrees), np.deg2rad(y_degrees)
    about_x = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    about_y = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return about_y @ about_x


def sample_geometry(study: Study, seed: int, index: int, size: int, slices: int) -> Geometry:
    """Orientation, spacing, extent and encoding of study ``index``'s main series for a ``size`` x ``size``
    matrix; ``slices`` is the slice count of a 3 mm-equivalent study (thinner studies have more)."""
    rng = _study_rngs(seed, index)[1]
    orientation = ORIENTATIONS[int(rng.choice(len(ORIENTATIONS), p=_ORIENTATION_P))]
    rows, columns = np.eye(3)[0], np.eye(3)[1]
    if orientation == "axial feet-first":
        rows = -rows  # seen from the feet with the patient feet first, the patient's right is on the right
    elif orientation == "oblique":  # a tilted axial stack
        tilt = _rotation(rng.choice([-1, 1]) * rng.uniform(6.0, 15.0), rng.uniform(-5.0, 5.0))
        rows, columns = tilt @ rows, tilt @ columns
    elif orientation == "coronal":
        columns = -np.eye(3)[2]  # rows of the image run to the feet
    rows, columns = np.round(rows, 6) + 0.0, np.round(columns, 6) + 0.0
    normal = np.cross(rows, columns)

    # The reconstruction field of view is set to the body (0.6-0.9 mm at 512 x 512, at least the body + 30 mm).
    reference_pixel = rng.uniform(max(_PIXEL_MM[0], (2 * study.body_a + 30) / _REFERENCE_MATRIX), _PIXEL_MM[1])
    pixel = round(reference_pixel * _REFERENCE_MATRIX / size, 4)
    through_scale = _REFERENCE_SCAN_MM / (slices * _REFERENCE_SLICE_MM)
    spacing = round(rng.uniform(*_SLICE_MM) * through_scale, 4)
    # Scan range: the lungs with a margin (axial), or the body's depth (coronal).
    bottom, top = study.dome_left - study.dome_depth - 40.0, study.apex_z + 25.0
    scan_centre = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), (bottom + top) / 2 + rng.uniform(-10, 10)])
    if orientation == "coronal":
        extent = 2 * study.body_b + 20.0
    else:  # a tilted stack must be longer for its slices' edges to reach the lung apices and bases
        rise = size * pixel * (abs(rows[2]) + abs(columns[2]))
        extent = ((top - bottom) * rng.uniform(1.0, 1.08) + rise) / abs(normal[2])
    count = max(int(np.ceil(extent / spacing)), 4)
    direction = int(rng.choice([-1, 1]))
    step = direction * spacing * normal
    centre = np.asarray(study.centre) + scan_centre
    first = centre - (size - 1) / 2 * pixel * (rows + columns) - (count - 1) / 2 * step
    return Geometry(
        orientation=orientation,
        patient_position="FFS" if orientation == "axial feet-first" else "HFS",
        row_cosines=tuple(float(v) for v in rows),
        column_cosines=tuple(float(v) for v in columns),
        pixel_spacing=pixel,
        slice_spacing=spacing,
        shape=(count, size, size),
        first_position=tuple(round(float(v), 4) for v in first),
        direction=direction,
        instance_order=INSTANCE_ORDERS[int(rng.choice(len(INSTANCE_ORDERS), p=_INSTANCE_ORDER_P))],
        encoding=str(rng.choice(list(_ENCODINGS))),
        foreign_series=bool(rng.random() < FOREIGN_SERIES_PROBABILITY),
        noise_hu=float(rng.uniform(8.0, 18.0)),
    )


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def _body_coordinates(study: Study, geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body coordinates (mm) of the sub-planes of every voxel, ``(sub, slices, rows, columns)`` each: a slice
    averages the phantom over its thickness, with sub-planes no further apart than a pixel."""
    count, rows, columns = geometry.shape
    sub = int(np.clip(np.ceil(geometry.slice_spacing / geometry.pixel_spacing), 1, 6))
    k = np.arange(count)[:, None, None] + ((np.arange(sub) + 0.5) / sub - 0.5)[:, None, None, None]
    r, c = np.arange(rows)[:, None], np.arange(columns)
    origin = np.asarray(geometry.first_position) - np.asarray(study.centre)
    step, pixel = geometry.slice_step, geometry.pixel_spacing
    x, y, z = (
        (origin[i] + c * pixel * geometry.row_cosines[i] + r * pixel * geometry.column_cosines[i] + k * step[i]).astype(
            np.float32
        )
        for i in range(3)
    )
    return x, y, z


def _render(study: Study, geometry: Geometry, rng: np.random.Generator) -> np.ndarray:
    """int16 HU volume (slices in acquisition order, rows, columns). Each slice averages the phantom over its
    thickness (sub-planes no further apart than a pixel), then noise is added; ``rng`` only adds noise."""
    x, y, z = _body_coordinates(study, geometry)
    hu = phantom_hu(study, x, y, z, edge=geometry.pixel_spacing).mean(axis=0)
    hu += geometry.noise_hu * rng.standard_normal(hu.shape, dtype=np.float32)
    return np.clip(np.rint(hu), *_HU_RANGE).astype(np.int16)


def finding_masks(study: Study, geometry: Geometry) -> dict[str, np.ndarray]:
    """Boolean masks ``(slices, rows, columns)`` of what :func:`phantom_hu` draws for each finding the study holds,
    averaged over each slice's thickness like the volume and kept where that passes one half. ``lung nodule``: the
    spheres; ``pleural effusion``: the fluid outside the mediastinum; ``cardiomegaly``: the heart; ``consolidation``:
    its region inside the lung and above the fluid; ``emphysema``: its bullae (the diffuse low attenuation around
    them has no edge to draw)."""
    x, y, z = _body_coordinates(study, geometry)
    edge = geometry.pixel_spacing
    parts: dict[str, np.ndarray] = {}
    mediastinum = _mediastinum(study, x, y, z, edge)
    fluid = np.zeros_like(x)
    for side in _effusion_sides(study):
        fluid = np.maximum(fluid, _fluid(study, side, x, y, z, edge) * (1.0 - mediastinum))
    if study.effusion_side:
        parts["pleural effusion"] = fluid
    lung = np.maximum(_hemithorax(study, "right", x, y, z, edge), _hemithorax(study, "left", x, y, z, edge))
    lung *= 1.0 - mediastinum
    if study.bullae:
        bullae = np.zeros_like(x)
        for bx, by, bz, radius in study.bullae:
            bullae = np.maximum(bullae, _ramp(radius - np.sqrt((x - bx) ** 2 + (y - by) ** 2 + (z - bz) ** 2), edge))
        parts["emphysema"] = bullae * lung
    if study.consolidation is not None:
        (cx, cy, cz), (rx, ry, rz) = study.consolidation.centre, study.consolidation.radii
        parts["consolidation"] = _ramp(_ellipsoid_depth(x - cx, y - cy, z - cz, rx, ry, rz), edge) * lung * (1 - fluid)
    if study.nodules:
        nodules = np.zeros_like(x)
        for nodule in study.nodules:
            (nx, ny, nz), radius = nodule.centre, nodule.diameter_mm / 2.0
            nodules = np.maximum(nodules, _ramp(radius - np.sqrt((x - nx) ** 2 + (y - ny) ** 2 + (z - nz) ** 2), edge))
        parts["lung nodule"] = nodules
    if study.labels["cardiomegaly"]:
        hx, hy, hz = study.heart_centre
        parts["cardiomegaly"] = _ramp(_ellipsoid_depth(x - hx, y - hy, z - hz, *study.heart_radii), edge)
    return {label: part.mean(axis=0) > 0.5 for label, part in parts.items()}


def nifti_affine(geometry: Geometry) -> np.ndarray:
    """NIfTI voxel (i, j, k) -> RAS+ mm, where i runs along the DICOM columns and j along the rows, both reversed,
    and k over the slices in acquisition order. RAS is DICOM's LPS with x and y negated.

    Why reversed: a head-first axial stack in DICOM order is a half-turn from RAS, where NIfTI-1's float32 qform
    quaternion loses precision once the stack is tilted (millimetres at the far corner); reversed, it is near the
    identity, and every orientation used here keeps the qform as exact as the sform."""
    _, rows, columns = geometry.shape
    row_step = np.multiply(geometry.row_cosines, geometry.pixel_spacing)  # one column to the right
    column_step = np.multiply(geometry.column_cosines, geometry.pixel_spacing)  # one row down
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, 0] = lps_to_ras @ -row_step
    affine[:3, 1] = lps_to_ras @ -column_step
    affine[:3, 2] = lps_to_ras @ geometry.slice_step
    affine[:3, 3] = lps_to_ras @ (
        np.asarray(geometry.first_position) + (columns - 1) * row_step + (rows - 1) * column_step
    )
    return affine


def _write_nifti(path: Path, volume: np.ndarray, geometry: Geometry, dtype: type = np.int16,
                 description: bytes = b"mmvl synthetic chest CT, HU") -> None:
    """int16 HU with scl_slope 1 / scl_inter 0, voxel axes as in nifti_affine, qform and sform both that
    scanner-anatomical affine (code 1); nibabel's gzip writer is deterministic (no timestamp). Masks are written
    the same way as uint8 (1 inside), so they share the volume's voxel grid and affine."""
    affine = nifti_affine(geometry)
    data = volume[:, ::-1, ::-1].transpose(2, 1, 0)  # (slice, row, column) -> (column, row, slice), reversed
    image = nib.Nifti1Image(data, affine, header=nib.Nifti1Header(endianness="<"))
    image.set_data_dtype(dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    image.header.set_slope_inter(1.0, 0.0)
    image.header["descrip"] = description
    nib.save(image, path)


# ---------------------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------------------


# Localizer planes: (row, column) direction cosines of an AP (coronal) and a lateral (sagittal) image.
_LOCALIZER_PLANES = (((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)), ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)))


def _file_names(rng: np.random.Generator, count: int) -> list[str]:
    """Random (UUID-shaped) file names, so that name order says nothing about slice position."""
    return [f"{uuid.UUID(bytes=rng.bytes(16), version=4)}.dcm" for _ in range(count)]


def _instance_numbers(geometry: Geometry, rng: np.random.Generator) -> np.ndarray:
    count = geometry.shape[0]
    if geometry.instance_order == "reversed":
        return np.arange(count, 0, -1)
    if geometry.instance_order == "scrambled":
        return rng.permutation(count) + 1
    return np.arange(1, count + 1)


def _study_header(study_id: str, index: int, entropy: list, rng: np.random.Generator) -> FileDataset:
    """Patient and study attributes shared by every file of a study, with obviously fake identifiers."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    ds = FileDataset(study_id, {}, file_meta=meta, preamble=b"\0" * 128)
    study_date = _FIRST_STUDY_DATE + datetime.timedelta(days=int(rng.integers(0, 3 * 365)))
    age = int(rng.integers(35, 91))
    birth_date = study_date - datetime.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    ds.AccessionNumber = f"SYNCTACC{int(rng.integers(10**7, 10**8))}"
    ds.Modality = "CT"
    ds.Manufacturer = "mmvl synthetic phantom"
    ds.InstitutionName = f"Synthetic Chest Institute {int(rng.integers(1, 10))} (fictitious)"
    ds.ReferringPhysicianName = f"SYNTH^REFERRER{int(rng.integers(1, 100)):02d}"
    ds.StudyDescription = "CT CHEST WITHOUT CONTRAST (SYNTHETIC)"
    ds.PatientName = f"SYNTH^CT^{index:06d}"
    ds.PatientID = f"SYNCTPID{int(rng.integers(10**7, 10**8))}"
    ds.PatientBirthDate = birth_date.strftime("%Y%m%d")
    ds.PatientSex = str(rng.choice(["F", "M"]))
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.KVP = "120"
    ds.StudyInstanceUID = _uid(*entropy, "study")
    ds.FrameOfReferenceUID = _uid(*entropy, "frame of reference")
    ds.PositionReferenceIndicator = ""
    ds.StudyID = f"S{int(rng.integers(10**6, 10**7))}"
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = ["40", "-600"]  # mediastinal and lung presets
    ds.WindowWidth = ["400", "1500"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    return ds


def _write_series(
    folder: Path,
    ds: FileDataset,
    slices: np.ndarray,
    positions: Sequence[Sequence[float]],
    geometry: Geometry,
    series: dict,
    names: Sequence[str],
    instance_numbers: Sequence[int],
    entropy: list,
) -> None:
    """One file per slice. ``series`` holds the attributes that differ between series (UID, number, ...);
    ``geometry`` gives the encoding."""
    representation, bits_stored, intercept = _ENCODINGS[geometry.encoding]
    for keyword, value in series.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = slices.shape[1:]
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = representation
    ds.RescaleIntercept = str(intercept)
    stored = slices.astype(np.int32) - intercept  # (0028,1052): HU = stored * 1 + intercept
    dtype = "<i2" if representation else "<u2"
    for k, (name, number) in enumerate(zip(names, instance_numbers)):
        uid = _uid(*entropy, series["SeriesInstanceUID"], "instance", k, number)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = int(number)
        ds.ImagePositionPatient = [_cxr._ds_text(v) for v in positions[k]]
        ds.PixelData = stored[k].astype(dtype).tobytes()
        ds["PixelData"].VR = "OW"
        ds.save_as(folder / name, enforce_file_format=True)


def _write_dicom(
    folder: Path,
    volume: np.ndarray,
    study: Study,
    geometry: Geometry,
    seed: int,
    size: int,
    slices: int,
    index: int,
    study_id: str,
    rng: np.random.Generator,
) -> str:
    """The main series (and, for some studies, a localizer series) of one study; returns the main series UID."""
    if folder.exists():  # files of an earlier run with other parameters would mix with this series
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    entropy = ["mmvl-synthetic-ct", seed, size, slices, index]
    ds = _study_header(study_id, index, entropy, rng)
    series_uid = _uid(*entropy, "series")
    count = geometry.shape[0]
    kind = "REFORMATTED" if geometry.orientation == "coronal" else "AXIAL"
    main_series = {
        "SeriesInstanceUID": series_uid,
        "SeriesNumber": 2,
        "SeriesDescription": f"CHEST {geometry.orientation.upper()} {geometry.slice_spacing:.1f}MM",
        "ImageType": ["ORIGINAL", "PRIMARY", kind] if kind == "AXIAL" else ["DERIVED", "SECONDARY", kind],
        "PatientPosition": geometry.patient_position,
        "ImageOrientationPatient": [_cxr._ds_text(v) for v in (*geometry.row_cosines, *geometry.column_cosines)],
        "PixelSpacing": [_cxr._ds_text(geometry.pixel_spacing)] * 2,
        "SliceThickness": _cxr._ds_text(geometry.slice_spacing),
        "ReconstructionDiameter": _cxr._ds_text(geometry.pixel_spacing * size),
    }
    positions = [geometry.position(k) for k in range(count)]
    numbers = _instance_numbers(geometry, rng)
    _write_series(folder, ds, volume, positions, geometry, main_series, _file_names(rng, count), numbers, entropy)
    if geometry.foreign_series:
        # A localizer series: a coronal and a sagittal image through the scan centre with a larger field of
        # view but the same matrix and InstanceNumbers 1 and 2, so that only (0020,000E) tells the series apart.
        pixel = round(520.0 / size, 4)
        centre = np.asarray(geometry.position(0)) + (count - 1) / 2 * geometry.slice_step
        centre += (size - 1) / 2 * geometry.pixel_spacing * np.add(geometry.row_cosines, geometry.column_cosines)
        localizer_uid = _uid(*entropy, "localizer")
        for number, (rows, columns) in enumerate(_LOCALIZER_PLANES, start=1):
            first = centre - (size - 1) / 2 * pixel * np.add(rows, columns)
            plane = geometry._replace(
                row_cosines=rows,
                column_cosines=columns,
                pixel_spacing=pixel,
                slice_spacing=pixel,
                shape=(1, size, size),
                first_position=tuple(round(float(v), 4) for v in first),
            )
            attributes = {
                "SeriesInstanceUID": localizer_uid,
                "SeriesNumber": 1,
                "SeriesDescription": "TOPOGRAM",
                "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
                "ImageOrientationPatient": [_cxr._ds_text(v) for v in (*rows, *columns)],
                "PixelSpacing": [_cxr._ds_text(pixel)] * 2,
                "SliceThickness": _cxr._ds_text(pixel),
                "ReconstructionDiameter": _cxr._ds_text(pixel * size),
            }
            image = _render(study, plane, rng)
            names = _file_names(rng, 1)
            _write_series(folder, ds, image, [plane.first_position], plane, attributes, names, [number], entropy)
    return series_uid


# ---------------------------------------------------------------------------------------------------------
# Reports (CT-RATE style: FINDINGS then IMPRESSION, positive findings stated, others negated or not mentioned)
# ---------------------------------------------------------------------------------------------------------

_pick, _capital = _cxr._pick, _cxr._capital
_INDICATIONS = (
    "Cough.",
    "Dyspnea.",
    "Fever and cough.",
    "Chest pain.",
    "Follow-up.",
    "Smoking history.",
    "Weight loss.",
    "Preoperative evaluation.",
)
_NORMAL_IMPRESSIONS = (
    "No significant pathology in the thorax.",
    "Normal non-contrast chest CT.",
    "No acute cardiopulmonary abnormality.",
    "No evidence of acute thoracic pathology.",
    "No significant pathological finding was detected in the thorax.",
)


def _cardiomegaly_sentences(study: Study, rng: np.random.Generator) -> tuple[str, str]:
    severity = "mild" if study.ctr < 0.62 else "moderate"
    finding = _pick(
        rng,
        (
            "The heart is enlarged.",
            f"The heart is {severity}ly enlarged.",
            "Cardiomegaly is present.",
            "Cardiomegaly was observed.",
            f"{_capital(severity)} cardiomegaly.",
            f"Heart size is increased, with a cardiothoracic ratio of about {study.ctr:.2f}.",
        ),
    )
    impression = _pick(
        rng, ("Cardiomegaly.", f"{_capital(severity)} cardiomegaly.", "Enlarged heart.", "Cardiomegaly is observed.")
    )
    return finding, impression


def _effusion_sentences(study: Study, rng: np.random.Generator) -> tuple[str, str]:
    severity, side = study.effusion_severity, study.effusion_side
    if side == "bilateral":
        finding = _pick(
            rng,
            (
                f"There are {severity} bilateral pleural effusions.",
                f"{_capital(severity)} pleural effusions on both sides, layering posteriorly.",
                f"Bilateral pleural fluid, {severity} in volume.",
                f"Bilateral pleural effusion was observed, {severity} in amount.",
            ),
        )
        impression = _pick(
            rng,
            (f"{_capital(severity)} bilateral pleural effusions.", "Bilateral pleural effusions.",
             "Bilateral pleural effusion."),
        )
        return finding, impression
    finding = _pick(
        rng,
        (
            f"There is a {severity} {side} pleural effusion, layering posteriorly.",
            f"{_capital(severity)} pleural effusion on the {side}.",
            f"{_capital(severity)} {side}-sided pleural effusion.",
            f"Pleural fluid of {severity} volume in the {side} hemithorax, with a dependent distribution.",
            f"A {severity} pleural effusion was observed in the {side} hemithorax.",
        ),
    )
    impression = _pick(
        rng,
        (f"{_capital(severity)} {side} pleural effusion.", f"Pleural effusion on the {side}.",
         f"{_capital(side)} pleural effusion."),
    )
    return finding, impression


def _emphysema_sentences(study: Study, rng: np.random.Generator) -> tuple[str, str]:
    severity = study.emphysema_severity
    largest = int(2 * max(radius for *_, radius in study.bullae)) if study.bullae else 0
    bullae = f"bullae up to {largest} mm" if largest else "bullous areas"
    finding = _pick(
        rng,
        (
            f"{_capital(severity)} centrilobular emphysema in both lungs, with {bullae} in the upper lobes.",
            f"Emphysematous changes of {severity} degree, predominantly in the upper lobes, with {bullae}.",
            f"There is {severity} emphysema with subpleural bullae in the upper zones.",
            f"Areas of low attenuation consistent with {severity} emphysema are seen in both lungs.",
            f"{_capital(severity)} centrilobular emphysematous changes are observed in both lungs, with {bullae}.",
        ),
    )
    impression = _pick(
        rng,
        (
            f"{_capital(severity)} emphysema.",
            "Bullous emphysema.",
            "Emphysema.",
            f"{_capital(severity)} centrilobular emphysema with upper-lobe bullae.",
        ),
    )
    return finding, impression


def _consolidation_sentences(study: Study, rng: np.random.Generator) -> tuple[str, str]:
    lobe = study.consolidation.lobe
    across = int(round(2 * max(study.consolidation.radii), -1))
    finding = _pick(
        rng,
        (
            f"Consolidation is present in the {lobe}.",
            f"There is an area of consolidation in the {lobe}, about {across} mm across.",
            f"Airspace consolidation in the {lobe}, compatible with pneumonia.",
            f"Consolidation areas were observed in the {lobe}.",
        ),
    )
    impression = _pick(
        rng,
        (
            f"Consolidation in the {lobe}, likely pneumonia; clinical correlation is recommended.",
            f"{_capital(lobe)} consolidation.",
            f"Consolidation in the {lobe}.",
        ),
    )
    return finding, impression


def _nodule_sentences(study: Study, rng: np.random.Generator) -> tuple[str, str]:
    nodules = sorted(study.nodules, key=lambda nodule: -nodule.diameter_mm)
    largest = nodules[0]
    size, lobe = f"{largest.diameter_mm:.0f} mm", largest.lobe
    if len(nodules) == 2:
        other = nodules[1]
        finding = _pick(
            rng,
            (
                f"Two solid nodules are present, in the {lobe} ({size}) and the {other.lobe} "
                f"({other.diameter_mm:.0f} mm).",
                f"There are two pulmonary nodules: {size} in the {lobe} and {other.diameter_mm:.0f} mm in the "
                f"{other.lobe}.",
            ),
        )
        impression = _pick(
            rng,
            (
                f"Two pulmonary nodules, the largest {size} in the {lobe}; follow-up CT is recommended.",
                "Two pulmonary nodules.",
                "Bilateral pulmonary nodules." if nodules[0].side != other.side else "Pulmonary nodules.",
            ),
        )
        return finding, impression
    if len(nodules) > 2:
        listed = ", ".join(f"{nodule.diameter_mm:.0f} mm in the {nodule.lobe}" for nodule in nodules)
        finding = _pick(
            rng,
            (
                f"Multiple solid pulmonary nodules are observed: {listed}.",
                f"There are {len(nodules)} pulmonary nodules ({listed}).",
                f"Nodules were observed in the lungs, measuring {listed}.",
            ),
        )
        impression = _pick(
            rng,
            (
                f"Multiple pulmonary nodules, the largest {size} in the {lobe}; follow-up CT is recommended.",
                "Multiple pulmonary nodules.",
                "Multiple solid nodules in the lungs.",
            ),
        )
        return finding, impression
    finding = _pick(
        rng,
        (
            f"A {size} solid nodule is seen in the {lobe}.",
            f"There is a solid pulmonary nodule measuring {size} in the {lobe}.",
            f"A {size} nodule in the {lobe}.",
            f"A well-circumscribed nodule of {size} in diameter is observed in the {lobe}.",
            f"A nodule measuring {size} was observed in the {lobe}.",
        ),
    )
    impression = _pick(
        rng,
        (
            f"{size} nodule in the {lobe}; follow-up CT is recommended.",
            f"Solid pulmonary nodule in the {lobe} ({size}).",
            f"Pulmonary nodule in the {lobe}.",
        ),
    )
    return finding, impression


def _report(study: Study, rng: np.random.Generator) -> str:
    """Free text whose positive statements match the volume and whose other findings are negated or left out.
    A sentence never mixes a negation with a positive finding."""
    labels = study.labels
    findings = [
        _pick(
            rng,
            (
                "Trachea and both main bronchi are patent.",
                "The trachea and main bronchi are normal in calibre.",
                "Trachea and both main bronchi are open.",  # CT-RATE's opening sentence
            ),
        )
    ]
    impressions: list[str] = []

    def state(name: str, sentences, negatives: Sequence[str], omit: float = 0.0) -> None:
        if labels[name]:
            finding, impression = sentences(study, rng)
            findings.append(finding)
            impressions.append(impression)
        elif rng.random() >= omit:
            findings.append(_pick(rng, negatives))

    state(
        "cardiomegaly",
        _cardiomegaly_sentences,
        (
            "Heart size is normal.",
            "Heart contour and size are normal.",
            "No cardiomegaly.",
            "The heart is not enlarged.",
            "Mediastinal main vascular structures, heart contour and size are normal.",
        ),
    )
    findings.append(
        _pick(
            rng,
            (
                "No pathologically enlarged lymph nodes in the mediastinum or hila.",
                "Mediastinal vascular structures are of normal calibre.",
                "The thoracic aorta is of normal diameter.",
                "No lymph node in pathological size and appearance was detected in the mediastinum or hila.",
            ),
        )
    )
    state(
        "pleural effusion",
        _effusion_sentences,
        (
            "No pleural effusion.",
            "No pleural effusion or thickening.",
            "Pleural spaces are free of fluid.",
            "Pleural effusion-thickening was not detected.",
        ),
    )
    lungs = ("emphysema", "consolidation", "lung nodule")
    if not any(labels[name] for name in lungs) and rng.random() < 0.3:
        findings.append("Both lungs are clear, with no consolidation, nodule or emphysema.")
    else:
        state(
            "emphysema",
            _emphysema_sentences,
            ("No emphysema.", "There is no emphysematous change.", "No emphysematous change was observed."),
            omit=0.3,
        )
        state("consolidation", _consolidation_sentences, ("No consolidation.", "There is no focal consolidation."))
        state(
            "lung nodule",
            _nodule_sentences,
            (
                "No pulmonary nodule.",
                "No nodule or mass is seen in either lung.",
                "There is no suspicious nodule.",
                "No mass or nodule was detected in both lungs.",
            ),
        )
    findings.append(
        _pick(
            rng,
            (
                "Upper abdominal organs included in the sections are unremarkable.",
                "No lytic or destructive bone lesion.",
                "Degenerative changes of the thoracic spine.",
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
    if rng.random() < 0.6:
        lines.append(f"CLINICAL INFORMATION: {_pick(rng, _INDICATIONS)}")
    if rng.random() < 0.6:
        lines.append(
            _pick(
                rng, ("TECHNIQUE: Non-contrast CT of the chest.", "TECHNIQUE: Chest CT without intravenous contrast.")
            )
        )
    lines.append(f"FINDINGS: {' '.join(findings)}")
    lines.append(f"IMPRESSION: {impression_text}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Writing the set
# ---------------------------------------------------------------------------------------------------------


def _check_arguments(n: int, size: int, slices: int, seed: int, formats: Sequence[str]) -> tuple[str, ...]:
    for name, value in (("n", n), ("size", size), ("slices", slices), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (number of studies to write), got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels so that the findings stay visible, got {size}")
    if slices < MIN_SLICES:
        raise ValueError(f"slices must be >= {MIN_SLICES} (slice count of a 3 mm-equivalent study), got {slices}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy SeedSequence entropy), got {seed}")
    formats = tuple(dict.fromkeys(formats))
    if not formats or not set(formats) <= set(FORMATS):
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {formats!r}")
    return formats


def _range(values: Sequence[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def _dataset_card(n: int, size: int, slices: int, seed: int, formats: Sequence[str], counts: dict) -> str:
    split_counts = ", ".join(f"{split} {counts['split'][split]}" for split in SPLITS)
    finding_counts = ", ".join(f"{name} {counts['finding'][name]}" for name in FINDINGS)
    orientation_counts = ", ".join(f"{name} {counts['orientation'][name]}" for name in ORIENTATIONS)
    return f"""# Synthetic chest CT set (mmvl)

Crude, fully synthetic non-contrast chest CT volumes with CT-RATE-style free-text reports, written by
`datasets/synthetic_ct.py --n {n} --size {size} --slices {slices} --seed {seed} --formats {",".join(formats)}`
for mmvl's 3D demo and tests. No real patient data went into it; the patient identifiers in the DICOM headers
are fake and are there only so that tests can check they never leak into manifests.

- `nifti/<study>.nii.gz`: int16 Hounsfield units (scl_slope 1, scl_inter 0); voxel axes: the DICOM columns and
  rows, both reversed, then the slices in acquisition order; qform = sform = the RAS+ scanner affine (code 1).
  Reorient with the affine, e.g. `nibabel.as_closest_canonical`, before comparing volumes.
- `dicom/<study>/*.dcm`: the same voxels as a CT Image Storage series, one file per slice, explicit VR little
  endian, 12- or 16-bit stored values, signed or unsigned, RescaleIntercept -1024 or 0 (HU = stored + intercept).
  File names are random and InstanceNumber may run with, against or across the slice order: sort by
  ImagePositionPatient along the normal of ImageOrientationPatient. Some folders also hold a two-image
  localizer series: group by SeriesInstanceUID first (their manifest rows name the main series in `series_uid`).
- `manifest_nifti.jsonl`, `manifest_dicom.jsonl`: one row per study (`image`, `report`, `labels`, `split`,
  `study_id`); `train|val|test_nifti|dicom.jsonl` hold the rows of one split (80/10/10).
- `masks/<study>_<label>.nii.gz`: where each finding present in a study is drawn (uint8, 1 inside), in the NIfTI
  volume's voxel grid and affine; a row's `masks` maps its labels to them (both manifests; a DICOM series is read
  in another voxel order, so map a mask onto it through the affines). Nodules: the spheres; effusion: the fluid;
  cardiomegaly: the heart; consolidation: its region in the lung; emphysema: its bullae only.
- Deterministic: the same `(n, size, slices, seed)` gives the same bytes, and study `i` does not depend on `n`.

Split sizes: {split_counts}. Positive studies: {finding_counts}. Orientations: {orientation_counts}.

## Geometry

Life-size anatomy on a small matrix: {size} x {size} pixels of {_range(counts["pixel"])} mm (0.6-0.9 mm at
512 x 512, the field of view fitted to the body), slices {_range(counts["spacing"])} mm apart and as thick
(1.0-5.0 mm-equivalent; {min(counts["slices"])}-{max(counts["slices"])} slices, each averaging the phantom over
its thickness). Spacing differs between studies, so resample to a common spacing before batching. Orientations:
axial head-first, axial feet-first (rows run to the patient's right), axial tilted by 6-15 degrees, coronal;
the acquisition runs head-to-feet or feet-to-head.

Tissues (HU, before noise of 8-18 HU): air -1000, lung about -850 (smooth texture, denser posteriorly),
fat -100, muscle, heart and vessels 40, liver 58, pleural fluid 10, bone (spine, sternum, ribs) 700.

## Labels

Each finding is drawn independently with probability {FINDING_PROBABILITY}; about a quarter of studies are normal.

- `lung nodule`: one to three solid spheres (20-30 mm) in aerated lung; the report gives sizes and lobes.
- `pleural effusion`: dependent (posterior) fluid, right, left or bilateral, small to large.
- `emphysema`: lower, patchy lung attenuation and upper-lobe bullae (-990 HU), mild to severe.
- `cardiomegaly`: cardiothoracic ratio 0.58-0.66 (normal 0.38-0.46).
- `consolidation`: a soft-tissue-density region (35 HU, 60-100 mm across) of one lobe.

The labels are ground truth of the phantom, for evaluation (zero-shot classification, probing); the reports
state the same findings with varied wording, laterality, lobe and size, and negate or omit the others.
"""


def generate_ct(
    out: str | Path,
    n: int = 800,
    size: int = 48,
    slices: int = 32,
    seed: int = 0,
    formats: Sequence[str] = FORMATS,
    *,
    progress: bool = False,
) -> dict[str, Path]:
    """Write ``n`` synthetic chest CT studies under ``out``; returns ``{format: manifest path}``.

    ``size`` is the in-plane matrix, ``slices`` the slice count of a 3 mm-equivalent study; ``progress`` shows
    a tqdm bar (unless the environment sets ``MMVL_NO_PROGRESS=1``). Other studies of an earlier, larger run in
    ``out`` are left alone; the manifests list only this run's studies.
    """
    formats = _check_arguments(n, size, slices, seed, formats)
    out = Path(out)
    for name in formats:
        (out / name).mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(n - 1)))
    splits = _cxr._splits(seed, n)
    rows: dict[str, list[dict]] = {name: [] for name in formats}
    counts: dict = {"orientation": Counter(), "pixel": [], "spacing": [], "slices": []}
    quiet = not progress or os.environ.get("MMVL_NO_PROGRESS") == "1"
    for index in tqdm(range(n), desc="writing CT", unit="study", disable=quiet):
        _, _, noise_rng, header_rng, report_rng = _study_rngs(seed, index)
        study = sample_study(seed, index)
        geometry = sample_geometry(study, seed, index, size, slices)
        volume = _render(study, geometry, noise_rng)
        study_id = f"ct{index:0{digits}d}"
        common = {"report": _report(study, report_rng), "labels": dict(study.labels), "split": splits[index]}
        common["study_id"] = study_id
        masks = {}
        for label, mask in finding_masks(study, geometry).items():
            masks[label] = f"masks/{study_id}_{label.replace(' ', '_')}.nii.gz"
            (out / "masks").mkdir(exist_ok=True)
            _write_nifti(out / masks[label], mask.astype(np.uint8), geometry, np.uint8,
                         f"mmvl synthetic chest CT, {label} mask".encode())
        if "nifti" in formats:
            image = f"nifti/{study_id}.nii.gz"
            _write_nifti(out / image, volume, geometry)
            rows["nifti"].append({"image": image, **common, "masks": masks})
        if "dicom" in formats:
            image = f"dicom/{study_id}"
            series_uid = _write_dicom(
                out / image, volume, study, geometry, seed, size, slices, index, study_id, header_rng
            )
            row = {"image": image, **common}
            if geometry.foreign_series:
                row["series_uid"] = series_uid
            rows["dicom"].append({**row, "masks": masks})
        counts["orientation"][geometry.orientation] += 1
        counts["pixel"].append(geometry.pixel_spacing)
        counts["spacing"].append(geometry.slice_spacing)
        counts["slices"].append(geometry.shape[0])

    def write_jsonl(path: Path, selected: list[dict]) -> None:
        path.write_text("".join(json.dumps(row) + "\n" for row in selected), encoding="utf-8")

    manifests = {}
    for name, format_rows in rows.items():
        manifests[name] = out / f"manifest_{name}.jsonl"
        write_jsonl(manifests[name], format_rows)
        for split in SPLITS:
            write_jsonl(out / f"{split}_{name}.jsonl", [row for row in format_rows if row["split"] == split])
    first_rows = next(iter(rows.values()))
    counts["split"] = Counter(row["split"] for row in first_rows)
    counts["finding"] = Counter(name for row in first_rows for name in FINDINGS if row["labels"][name])
    (out / "README.md").write_text(_dataset_card(n, size, slices, seed, formats, counts), encoding="utf-8")
    return manifests


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/synthetic_ct", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--n", type=int, default=800,
        help="number of studies (default: %(default)s: 640 train, 80 val, 80 test, the CT demo's set)",
    )
    parser.add_argument("--size", type=int, default=48, help="in-plane matrix (default: %(default)s)")
    parser.add_argument(
        "--slices", type=int, default=32, help="slice count of a 3 mm-equivalent study (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--formats", default=",".join(FORMATS), help="comma-separated subset of nifti,dicom (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        manifests = generate_ct(
            args.out,
            n=args.n,
            size=args.size,
            slices=args.slices,
            seed=args.seed,
            formats=[name.strip() for name in args.formats.split(",") if name.strip()],
            progress=True,
        )
    except ValueError as err:
        parser.error(str(err))
    rows = [json.loads(line) for line in next(iter(manifests.values())).read_text(encoding="utf-8").splitlines()]
    splits = Counter(row["split"] for row in rows)
    print(f"studies written: {len(rows)} (" + ", ".join(f"{split} {splits[split]}" for split in SPLITS) + ")")
    for name in FINDINGS:
        positives = sum(row["labels"][name] for row in rows)
        print(f"  {name:<17} {positives:5d} positive ({positives / len(rows):.0%})")
    print(f"  {'no finding':<17} {sum(not any(row['labels'].values()) for row in rows):5d}")
    for name, path in manifests.items():
        print(f"manifest ({name}): {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
