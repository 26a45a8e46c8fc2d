"""Synthetic twin of Kaggle "Medical Image Segmentation" Task001 (liver tumour): phantom abdominal CT, evalseg layout.

``generate_task`` writes ``<out>/<task-name>/`` exactly as the real dataset is laid out
(../shared/docs/DATASET.md): ``CT.zip`` (bzip2 zip of int16 NIfTI volumes in Hounsfield units, plus a
``.keepkaggle`` member), ``GroundTruth/<id>.pkl`` (label 1 = tumour, no liver label), ``metadata.json`` and
``Predictions/<method>/<id>.pkl`` from simple reference methods that score differently.

Each case is drawn from its own seeded stream (``[seed, case index]``), rendered a few slices at a time in
millimetre coordinates (anatomy keeps its size whatever the grid), blurred (partial volume), given correlated
noise and streamed into the zip slice by slice. Memory stays at a few volumes' worth (see ``build_task``).
Same seed -> byte-identical files.

Axes: volumes are (X, Y, Z) in NIfTI (i, j, k) order with a positive diagonal affine (axis codes R, A, S), as the
real Task001 files in ../shared/data/evalseg have. Like their tumours (mean position at 0.2-0.4 of the i axis),
the liver sits at low i; read literally, both headers put it on the patient's left, so a viewer that honours the
affine shows the anatomy mirrored. Nothing here reorients: training, evaluation and written masks all stay in
the files' own (i, j, k) order. The spine sits at low j; axial slices are ``volume[:, :, k]``.

CLI: ``python -m medseg.data.synthetic --out data/synthetic [--cases 40] [--size 128] [--slices 24 48]
[--seed 0] [--task-name Task900_SynthLiverTumor] [--methods threshold,perturbed] [--force]``
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg.data.evalseg_pickle import write_label_pickle
from medseg.errors import ConfigError, MedsegError
from medseg.io_utils import atomic_path, atomic_write_text

DEFAULT_TASK_NAME = "Task900_SynthLiverTumor"
DEFAULT_METHODS = ("threshold", "perturbed")
# Bump whenever the same arguments would give different bytes, so caches keyed on metadata notice.
GENERATOR_VERSION = 3
TINY_LESION_VOXELS = 50  # the checker's (and the brief's) definition of a tiny lesion: a component under 50 voxels
LESION_FREE_FRACTION = 0.25  # as in the real Task001, about a quarter of the cases hold no tumour

_FOV_MM = 350.0  # typical abdominal reconstruction field of view; in-plane spacing is FOV / size
_HU_MIN, _HU_MAX = -1024, 3071  # the range a 12-bit CT scanner stores
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # earliest zip timestamp: fixed so the archive does not depend on the clock
_NIFTI_VOX_OFFSET = 352  # 348-byte header + 4-byte "no extensions" flag
_CONNECTIVITY_26 = np.ones((3, 3, 3), bool)  # evalseg segments are 26-connected components


# ------------------------------------------------------------------------------------------------- shapes


def _ellipse_rho(x, y, cx, cy, a, b, angle: float = 0.0, harmonics: Sequence[tuple] = ()) -> np.ndarray:
    """Normalised radius of points in a rotated ellipse with a wobbled boundary: < 1 inside, 1 on the edge.

    x, y: mm, broadcastable (e.g. x (X, 1, 1), y (1, Y, 1), or scalars); cx, cy, a, b and the harmonic phases may be
    per-slice arrays (1, 1, C). harmonics: (order n, relative amplitude, phase) terms modulating the boundary radius.
    Returns the broadcast shape, e.g. (X, Y, C).
    """
    dx, dy = x - cx, y - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, c * dy - s * dx
    u, v = dx / a, dy / b
    rho = np.sqrt(u * u + v * v)
    if harmonics:
        theta = np.arctan2(v, u)
        wobble = 1.0 + sum(amp * np.cos(n * theta + phase) for n, amp, phase in harmonics)
        rho = rho / wobble
    return rho


@dataclass(frozen=True)
class Blob:
    """An organ: smooth irregular cross-sections whose size follows a bump along z.

    Present for z-fractions f in (f0, f1) of the scanned extent (limits may lie outside [0, 1]: the organ is cut by
    the scan); the centre drifts linearly from (cx0, cy0) to (cx1, cy1) mm; (a, b) are the widest semi-axes in mm;
    ``skew`` moves the widest cross-section up or down; harmonics are (n, amplitude, phase, phase drift over f0..f1).
    """

    f0: float
    f1: float
    cx0: float
    cy0: float
    cx1: float
    cy1: float
    a: float
    b: float
    angle: float
    skew: float
    harmonics: tuple[tuple[int, float, float, float], ...]

    def _t(self, f: np.ndarray | float) -> np.ndarray:
        """Position within the organ's z-span: 0 at f0, 1 at f1 (float32, shape of f)."""
        return ((np.asarray(f, np.float32) - self.f0) / (self.f1 - self.f0)).astype(np.float32)

    def scale(self, f: np.ndarray | float) -> np.ndarray:
        """Relative cross-section size at z-fractions f (any shape); 0 where absent or thinner than 5 % (tips
        that would be sub-voxel specks)."""
        t = self._t(f)
        s = np.sqrt(np.maximum(np.sin(np.pi * np.clip(t, 0, 1) ** self.skew), 0))  # sin(pi) rounds below 0
        return np.where((t > 0) & (t < 1) & (s >= 0.05), s, 0).astype(np.float32)

    def rho(self, x: np.ndarray, y: np.ndarray, f: np.ndarray | float) -> np.ndarray:
        """Normalised radius (< 1 inside) at z-fractions f (scalar or (1, 1, C)); huge where the organ is absent."""
        t, s = self._t(f), self.scale(f)
        s = np.where(s > 0, s, np.float32(1e-6))  # absent: a vanishing ellipse leaves every point far outside
        cx, cy = self.cx0 + (self.cx1 - self.cx0) * t, self.cy0 + (self.cy1 - self.cy0) * t
        harmonics = [(n, amp, phase + drift * t) for n, amp, phase, drift in self.harmonics]
        return _ellipse_rho(x, y, cx, cy, self.a * s, self.b * s, self.angle, harmonics)

    def local_radius(self, f: float) -> float:
        """Smallest semi-axis (mm) of the cross-section at z-fraction f."""
        return min(self.a, self.b) * float(self.scale(f))

    def bounds(self) -> tuple[float, float, float, float]:
        """(x_lo, x_hi, y_lo, y_hi) mm enclosing every cross-section grown by 10 %, whatever rotation and wobble."""
        reach = 1.1 * max(self.a, self.b) * (1 + sum(amp for _, amp, _, _ in self.harmonics))
        return (min(self.cx0, self.cx1) - reach, max(self.cx0, self.cx1) + reach,
                min(self.cy0, self.cy1) - reach, max(self.cy0, self.cy1) + reach)


@dataclass(frozen=True)
class Texture:
    """A smooth random field of about unit standard deviation: a sum of plane waves over mm coordinates."""

    wavevectors: np.ndarray  # (n, 3) rad/mm
    phases: np.ndarray  # (n,)

    @staticmethod
    def draw(rng: np.random.Generator, n: int, wavelength_mm: tuple[float, float]) -> Texture:
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        k = 2 * np.pi / rng.uniform(*wavelength_mm, size=(n, 1))
        return Texture(direction * k, rng.uniform(0, 2 * np.pi, size=n))

    def in_plane(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The z-independent factor: [cos A, -sin A] with A = kx x + ky y; x (X, 1, 1), y (1, Y, 1) -> (X*Y, 2n)."""
        phase = x.reshape(-1, 1, 1) * self.wavevectors[:, 0].astype(np.float32) \
            + y.reshape(1, -1, 1) * self.wavevectors[:, 1].astype(np.float32)
        return np.concatenate([np.cos(phase), -np.sin(phase)], axis=2).reshape(x.size * y.size, -1)

    def at(self, in_plane: np.ndarray, shape_xy: tuple[int, int], z: np.ndarray) -> np.ndarray:
        """Field on slices at heights z (1, 1, C) mm -> float32 (X, Y, C), from ``in_plane`` of the same grid.

        cos(A + B) = cos A cos B - sin A sin B with B = kz z + phase turns the sum over waves into one
        (X*Y, 2n) x (2n, C) product instead of a cosine per voxel and wave.
        """
        along = z.reshape(-1, 1) * self.wavevectors[:, 2].astype(np.float32) + self.phases.astype(np.float32)
        # einsum rather than @: no BLAS threads, so the sums (and the bytes written) do not depend on the machine.
        field = np.einsum("pk,ck->pc", in_plane, np.concatenate([np.cos(along), np.sin(along)], axis=1))
        return field.reshape(*shape_xy, z.size) * np.float32(math.sqrt(2.0 / len(self.phases)))


@dataclass(frozen=True)
class _Grid:
    """A case's in-plane voxel centres (mm) and the texture factors that depend on them alone, computed once."""

    x: np.ndarray  # float32 (X, 1, 1)
    y: np.ndarray  # float32 (1, Y, 1)
    texture_planes: tuple[np.ndarray, ...]  # one (X*Y, 2n) factor per texture

    @staticmethod
    def of(plan: CasePlan) -> _Grid:
        x, y = plan.grid()
        return _Grid(x, y, tuple(t.in_plane(x, y) for t in plan.textures))


@dataclass(frozen=True)
class Lesion:
    """A hypodense tumour: a rotated, wobbled ellipsoid, ``contrast`` HU darker than the liver at its core."""

    center: tuple[float, float, float]  # mm (x, y, z), snapped to a voxel centre so even a tiny one covers a voxel
    radii: tuple[float, float, float]  # semi-axes, mm
    angle: float
    harmonics: tuple[tuple[int, float, float], ...]
    contrast: float

    @property
    def reach(self) -> float:
        """Largest distance (mm) from the centre to the surface, wobble included."""
        return max(self.radii) * (1 + sum(amp for _, amp, _ in self.harmonics))


@dataclass(frozen=True)
class Vessel:
    """A hepatic vessel: a straight tube mostly along z, hypodense on non-contrast CT. Never labelled, so it is the
    false positive that separates a shape-aware model from an intensity threshold."""

    x0: float
    y0: float
    z0: float
    z1: float
    slope_x: float  # mm of in-plane drift per mm of z
    slope_y: float
    radius: float
    contrast: float


@dataclass(frozen=True)
class CasePlan:
    """Everything random about one case, drawn up front; rendering is then a pure function of the plan."""

    case_id: str
    shape: tuple[int, int, int]  # (X, Y, Z) voxels
    spacing: tuple[float, float, float]  # mm, as stored in the header (float32-exact)
    hu: dict[str, float]
    noise_std: float  # HU, after correlation
    noise_corr: float  # in-plane gaussian sigma (voxels) correlating the noise, as CT reconstruction does
    blur_sigma: tuple[float, float, float]  # voxels: partial-volume blur before the noise
    body: tuple[float, float, float]  # centre y, semi-axes a, b (mm)
    body_harmonics: tuple[tuple[int, float, float], ...]
    fat_mm: float
    wall_mm: float
    spine: tuple[float, float, float, float]  # canal centre y, canal radius, vertebral body centre y, its radius
    disc: tuple[float, float, float]  # intervertebral disc period, thickness, phase (mm)
    aorta: tuple[float, float, float]  # centre x, y, radius
    ribs: tuple[tuple[float, float, float, float], ...]  # (angle rad, angle drift over the scan, radius, z phase mm)
    rib_f0: float  # ribs appear above this z-fraction
    liver: tuple[Blob, ...]  # right lobe, optional left lobe
    liver_fat_plane: float  # outer edge of the perihepatic fat, in the lobes' normalised radius (> 1)
    gallbladder: Blob | None
    kidneys: tuple[Blob, Blob]
    spleen: Blob
    vessels: tuple[Vessel, ...]
    lesions: tuple[Lesion, ...]
    textures: tuple[Texture, Texture, Texture]  # soft-tissue mottle, visceral fat, bowel gas

    @property
    def extent_mm(self) -> float:
        return (self.shape[2] - 1) * self.spacing[2]

    def fraction(self, z: np.ndarray | float) -> np.ndarray:
        """z (mm above the first slice, any shape) as a fraction of the scanned extent (0.5 for a single slice)."""
        z = np.asarray(z, np.float32)
        return z / np.float32(self.extent_mm) if self.extent_mm > 0 else np.full_like(z, 0.5)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Voxel-centre coordinates in mm, centred in-plane: x float32 (X, 1, 1), y float32 (1, Y, 1)."""
        (nx, ny, _), (sx, sy, _) = self.shape, self.spacing
        x = ((np.arange(nx) - (nx - 1) / 2) * sx).astype(np.float32)[:, None, None]
        y = ((np.arange(ny) - (ny - 1) / 2) * sy).astype(np.float32)[None, :, None]
        return x, y

    def affine(self) -> np.ndarray:
        """4x4 RAS voxel-to-world matrix: diagonal spacing, in-plane origin at the volume centre."""
        (nx, ny, _), (sx, sy, sz) = self.shape, self.spacing
        affine = np.diag([sx, sy, sz, 1.0])
        affine[:3, 3] = [-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, 0.0]
        return affine


# ------------------------------------------------------------------------------------------------- planning


def case_ids(cases: int) -> list[str]:
    """Case ids "001", "002", "3", "004", ...: strings, some zero-padded, so readers must never cast them to int."""
    return [str(n) if n % 3 == 0 else f"{n:03d}" for n in range(1, cases + 1)]


def _task_roles(seed: int, cases: int) -> tuple[set[int], set[int]]:
    """Case indices without lesions (about a quarter; none for a single case) and lesion cases forced to hold
    a tiny lesion (a third of them, at least one), so every task has both kinds whatever the draw."""
    rng = np.random.default_rng([seed, 0x7A5C])  # task-level stream, apart from the per-case ones
    n_free = int(cases * LESION_FREE_FRACTION + 0.5) if cases > 1 else 0
    free = {int(i) for i in rng.choice(cases, size=n_free, replace=False)}
    with_lesions = [i for i in range(cases) if i not in free]
    n_tiny = max(1, math.ceil(len(with_lesions) / 3)) if with_lesions else 0
    tiny = {int(i) for i in rng.choice(with_lesions, size=n_tiny, replace=False)} if with_lesions else set()
    return free, tiny


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    # Python floats keep float32 slice arithmetic in float32 (NumPy 2 promotion rules).
    return float(rng.uniform(low, high))


def _blob(rng: np.random.Generator, f: tuple[float, float], centre: tuple[float, float], drift_mm: float,
          axes: tuple[float, float], angle: float, wobble: float) -> Blob:
    """An organ spanning z-fractions ``f``, centred at ``centre`` mm (drifting up to ``drift_mm`` along z), with
    semi-axes ``axes`` mm and boundary harmonics 2-4 of relative amplitude up to ``wobble`` / (n - 1)."""
    cx, cy = centre
    harmonics = tuple((n, _u(rng, 0, wobble / (n - 1)), _u(rng, 0, 2 * math.pi), _u(rng, -2, 2)) for n in (2, 3, 4))
    return Blob(f[0], f[1], cx, cy, cx + _u(rng, -drift_mm, drift_mm), cy + _u(rng, -drift_mm, drift_mm),
                axes[0], axes[1], angle, _u(rng, 0.6, 1.5), harmonics)


def plan_case(rng: np.random.Generator, case_id: str, *, size: int, slices: tuple[int, int],
              with_lesions: bool, force_tiny: bool) -> CasePlan:
    """Draw one case's anatomy, intensities, lesions and acquisition settings from ``rng``."""
    nz = int(rng.integers(slices[0], slices[1] + 1))
    sxy = _FOV_MM / size * _u(rng, 0.9, 1.12)
    # Thick slices for short scans (2.5-5 mm, as in the default), thinner when many slices would exceed an abdomen.
    sz = max(0.5, round(min(_u(rng, 2.5, 5.0), _u(rng, 250, 320) / nz) * 4) / 4)
    spacing = tuple(float(np.float32(v)) for v in (sxy, sxy, sz))
    fov = size * sxy

    hu = {"fat": _u(rng, -115, -85), "visceral_fat": _u(rng, -105, -75), "muscle": _u(rng, 40, 55),
          "soft": _u(rng, 15, 35), "kidney": _u(rng, 28, 38), "sinus": _u(rng, -70, -40),
          "spleen": _u(rng, 42, 52), "aorta": _u(rng, 35, 48), "gallbladder": _u(rng, 0, 20),
          "liver": _u(rng, 55, 65), "cancellous": _u(rng, 380, 460), "cortex": _u(rng, 600, 720),
          "disc": _u(rng, 70, 100), "csf": _u(rng, 5, 15), "rib": _u(rng, 450, 650), "gas": _u(rng, -900, -800)}

    a_body = min(_u(rng, 135, 165), 0.46 * fov)
    b_body = min(_u(rng, 95, 120), 0.40 * fov)
    cy = _u(rng, -15, 5)
    fat, wall = _u(rng, 8, 25) * a_body / 150, _u(rng, 6, 12) * a_body / 150
    ai, bi = a_body - fat - wall, b_body - fat - wall  # the abdominal cavity's semi-axes

    r_canal = _u(rng, 6, 8)
    y_canal = cy - bi + _u(rng, 22, 30)
    r_vb = _u(rng, 14, 19)
    y_vb = y_canal + r_canal + r_vb + 1
    r_aorta = _u(rng, 9, 12)

    right = _blob(rng, (_u(rng, -0.05, 0.2), _u(rng, 0.95, 1.25)),
                  (-_u(rng, 0.32, 0.42) * ai, cy + _u(rng, -0.05, 0.15) * bi), 10,
                  (_u(rng, 0.42, 0.52) * ai, _u(rng, 0.6, 0.72) * bi), _u(rng, -0.3, 0.3), 0.12)
    liver = (right,)
    if rng.random() < 0.8:  # the left lobe reaches across the midline, anteriorly, in the upper abdomen
        liver += (_blob(rng, (_u(rng, 0.4, 0.65), right.f1 - _u(rng, 0, 0.15)),
                        (_u(rng, -0.05, 0.2) * ai, cy + _u(rng, 0.3, 0.45) * bi), 8,
                        (_u(rng, 0.25, 0.38) * ai, _u(rng, 0.2, 0.3) * bi), _u(rng, -0.4, 0.2), 0.1),)
    gallbladder = None
    if rng.random() < 0.7:  # fluid-dense and beside the liver: a hypodense blob that is not a tumour
        gallbladder = _blob(rng, (right.f0 + _u(rng, 0, 0.1), right.f0 + _u(rng, 0.3, 0.45)),
                            (right.cx0 + _u(rng, 0.3, 0.6) * right.a, right.cy0 + _u(rng, 0.3, 0.6) * right.b), 5,
                            (_u(rng, 10, 16), _u(rng, 18, 26)), _u(rng, -0.5, 0.5), 0.05)
    kidney_f = (_u(rng, -0.3, 0.0), _u(rng, 0.4, 0.6))
    kidneys = tuple(
        _blob(rng, (kidney_f[0] - low, kidney_f[1] - low), (side * _u(rng, 0.38, 0.5) * ai, y_vb + _u(rng, -10, 5)), 5,
              (_u(rng, 18, 24), _u(rng, 26, 34)), side * _u(rng, 0.35, 0.7), 0.05)
        for side, low in ((-1, _u(rng, 0, 0.1)), (1, 0.0)))  # the right kidney sits lower, under the liver
    spleen = _blob(rng, (_u(rng, 0.35, 0.55), _u(rng, 0.95, 1.2)),
                   (_u(rng, 0.5, 0.62) * ai, cy + _u(rng, -0.45, -0.15) * bi), 8,
                   (_u(rng, 22, 32), _u(rng, 40, 55)), _u(rng, -1.0, -0.5), 0.08)

    # Four ribs a side, lateral and posterior (angles from +x, the patient's left; pi/2 is anterior).
    ribs = tuple((side_angle + _u(rng, -0.15, 0.15), _u(rng, -0.3, 0.3), _u(rng, 3.5, 5), _u(rng, 0, 30))
                 for side_angle in np.concatenate([np.linspace(2.4, 4.4, 4), np.linspace(-1.3, 0.75, 4)]).tolist())

    z_extent = (nz - 1) * spacing[2]
    vessels = tuple(_draw_vessel(rng, right, z_extent) for _ in range(int(rng.integers(3, 7))))
    blur_xy = _u(rng, 0.5, 0.9)
    plan = CasePlan(
        case_id=case_id, shape=(size, size, nz), spacing=spacing, hu=hu,
        # 10-25 HU, median 12 as on routine abdominal CT; the noisiest cases make the hard tail.
        noise_std=10 + 15 * _u(rng, 0, 1) ** 3, noise_corr=_u(rng, 0.4, 0.7),
        blur_sigma=(blur_xy, blur_xy, _u(rng, 0.3, 0.6)),
        body=(cy, a_body, b_body),
        body_harmonics=tuple((n, _u(rng, 0, 0.03), _u(rng, 0, 2 * math.pi)) for n in (2, 3, 4)),
        fat_mm=fat, wall_mm=wall,
        spine=(y_canal, r_canal, y_vb, r_vb),
        disc=(_u(rng, 28, 34), _u(rng, 6, 9), _u(rng, 0, 34)),
        aorta=(_u(rng, 5, 15), y_vb + r_vb + r_aorta + _u(rng, 2, 6), r_aorta),
        ribs=ribs, rib_f0=_u(rng, 0.25, 0.5),
        liver=liver, liver_fat_plane=_u(rng, 1.03, 1.08), gallbladder=gallbladder, kidneys=kidneys, spleen=spleen,
        vessels=vessels, lesions=(),
        textures=(Texture.draw(rng, 6, (15, 60)), Texture.draw(rng, 6, (20, 70)), Texture.draw(rng, 4, (15, 40))),
    )
    # Lesions last: placing them needs the finished liver (cut by the gallbladder, the spine, the cavity).
    return dataclasses.replace(plan, lesions=_draw_lesions(rng, plan, force_tiny)) if with_lesions else plan


def _draw_vessel(rng: np.random.Generator, lobe: Blob, z_extent: float) -> Vessel:
    """A tube through the right lobe near its hilum, running mostly along z."""
    f = _u(rng, 0.3, 0.8)
    t = (f - lobe.f0) / (lobe.f1 - lobe.f0)
    cx, cy = lobe.cx0 + (lobe.cx1 - lobe.cx0) * t, lobe.cy0 + (lobe.cy1 - lobe.cy0) * t
    z_mid, half = f * max(z_extent, 1.0), _u(rng, 20, 60)
    return Vessel(cx + _u(rng, -0.5, 0.5) * lobe.a, cy + _u(rng, -0.5, 0.5) * lobe.b, z_mid - half, z_mid + half,
                  _u(rng, -0.6, 0.6), _u(rng, -0.6, 0.6), _u(rng, 1.5, 4.5), _u(rng, 8, 18))


def _liver_rho_at(liver: Sequence[Blob], x: float, y: float, f: float) -> tuple[float, float]:
    """(normalised radius, local lobe radius mm) of the lobe that best contains point (x, y) at z-fraction f."""
    best = (math.inf, 0.0)
    for lobe in liver:
        rho = float(lobe.rho(np.float32(x), np.float32(y), f))
        if rho < best[0]:
            best = (rho, lobe.local_radius(f))
    return best


def _draw_lesions(rng: np.random.Generator, plan: CasePlan, force_tiny: bool) -> tuple[Lesion, ...]:
    """1-6 lesions centred in the liver, apart from each other (so each is its own evalseg segment).

    Diameters: the first lesion is 20-80 mm (log-uniform, median 40 mm), so every lesion case has something a model
    can find; the real Task001 ground truths in ../shared/data/evalseg give a total tumour volume per lesion case of
    4-153 mm equivalent-sphere diameter, median 37 mm. Each further lesion is small (4-9 mm: tiny at the default grid,
    where a voxel is ~27 mm^3) with probability 1/3, else 10-50 mm. ``force_tiny`` adds a small one. Contrast
    10-40 HU below the liver. Centres sit on voxel centres inside the rendered liver mask, so every lesion, however
    small, labels at least one voxel.
    """
    def log_uniform(low: float, high: float) -> float:
        return math.exp(_u(rng, math.log(low), math.log(high)))

    extra = min(4, int(rng.poisson(1.2)))
    diameters = [log_uniform(20, 80)] + [_u(rng, 4, 9) if rng.random() < 1 / 3 else log_uniform(10, 50)
                                         for _ in range(extra)]
    if force_tiny:
        diameters.insert(0, _u(rng, 4, 8))  # placed first, while the liver is still empty enough to take it
    (nx, ny, nz), spacing, liver = plan.shape, plan.spacing, plan.liver
    grid = _Grid.of(plan)
    x_grid, y_grid = grid.x, grid.y
    bounds = np.array([lobe.bounds() for lobe in liver])
    f_range = (max(0.0, liver[0].f0), min(1.0, liver[0].f1))
    liver_slices: dict[int, np.ndarray] = {}  # rendered liver masks (X, Y) of the slices tried so far

    lesions: list[Lesion] = []
    for diameter in diameters:
        r = diameter / 2
        radii = (r * _u(rng, 0.8, 1.2), r * _u(rng, 0.8, 1.2), r * _u(rng, 0.8, 1.2))
        harmonics = tuple((m, _u(rng, 0, 0.12), _u(rng, 0, 2 * math.pi)) for m in (2, 3))
        contrast = 10 + 30 * _u(rng, 0, 1) ** 0.35  # 10-40 HU, leaning to the clearer end (median 33.5)
        shape = Lesion((0.0, 0.0, 0.0), radii, _u(rng, 0, math.pi), harmonics, contrast)
        for _ in range(300):
            k = int(round(_u(rng, *f_range) * (nz - 1)))
            i = _nearest_index(_u(rng, bounds[:, 0].min(), bounds[:, 1].max()), spacing[0], nx)
            j = _nearest_index(_u(rng, bounds[:, 2].min(), bounds[:, 3].max()), spacing[1], ny)
            centre = (float(x_grid[i, 0, 0]), float(y_grid[0, j, 0]), k * spacing[2])
            rho, local = _liver_rho_at(liver, centre[0], centre[1], float(plan.fraction(centre[2])))
            # Mostly inside: a lesion may bulge past the capsule a little and is then cut by the liver mask.
            if local <= 0 or rho >= 1 - 0.7 * r / local:
                continue
            # Two voxels of liver between lesions, so 26-connectivity never merges them into one segment.
            if any(math.dist(centre, o.center) < shape.reach + o.reach + 2 * max(spacing) for o in lesions):
                continue
            if k not in liver_slices:
                z = np.full((1, 1, 1), k * spacing[2], np.float32)
                liver_slices[k] = _render_chunk(plan, grid, z)[1][:, :, 0]
            if liver_slices[k][i, j]:
                lesions.append(dataclasses.replace(shape, center=centre))
                break
    return tuple(lesions)


def _nearest_index(value: float, step: float, n: int) -> int:
    """Index of the voxel centre nearest ``value`` mm on the centred grid (i - (n - 1) / 2) * step, i in [0, n)."""
    return min(max(round(value / step + (n - 1) / 2), 0), n - 1)


# ------------------------------------------------------------------------------------------------- rendering


@dataclass
class RenderedCase:
    """image: float32 (X, Y, Z) HU; label: uint8 (X, Y, Z) tumour; liver: bool (X, Y, Z), the known liver region."""

    plan: CasePlan
    image: np.ndarray
    label: np.ndarray
    liver: np.ndarray
    _components: tuple[np.ndarray, int, tuple[slice, slice, slice]] | None = field(default=None, init=False, repr=False)

    def components(self) -> tuple[np.ndarray, int, tuple[slice, slice, slice]]:
        """26-connected tumour components, as evalseg splits segments, computed once on the tumours' bounding box
        widened by 2 voxels: (int32 labels of that box, component count, the box as slices of the volume)."""
        if self._components is None:
            box = _bbox(self.label > 0, margin=2) or (slice(0, 0),) * 3
            components, n = ndimage.label(self.label[box], structure=_CONNECTIVITY_26)
            self._components = (components, n, box)
        return self._components

    def lesion_sizes(self) -> list[int]:
        """Voxel count of each tumour component."""
        components, n, _ = self.components()
        return np.bincount(components.ravel(), minlength=n + 1)[1:].tolist()


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, slice, slice] | None:
    """Bounding box of the True voxels of bool (X, Y, Z) widened by ``margin`` voxels (clipped); None when empty."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if not hit.size:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def render_case(plan: CasePlan) -> RenderedCase:
    """Noise-free phantom with partial-volume blur, drawn a chunk of slices at a time so temporaries stay small."""
    shape = plan.shape
    image = np.empty(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    liver = np.zeros(shape, bool)
    grid = _Grid.of(plan)
    for k0, k1 in _chunks(shape):
        z = (np.arange(k0, k1) * plan.spacing[2]).astype(np.float32)[None, None, :]
        image[:, :, k0:k1], liver[:, :, k0:k1], label[:, :, k0:k1] = _render_chunk(plan, grid, z)
    # Partial volume: edges smear over neighbouring voxels (more across thick slices) before detector noise.
    # In place: scipy filters axis by axis through line buffers, so output=input is safe and costs no copy.
    ndimage.gaussian_filter(image, plan.blur_sigma, output=image, truncate=3.0)
    return RenderedCase(plan, image, label, liver)


def _chunks(shape: tuple[int, int, int], budget: int = 1 << 20) -> list[tuple[int, int]]:
    """Slice ranges [k0, k1) of about ``budget`` voxels: few numpy calls for small volumes, bounded temporaries
    (a few MB each) for large ones."""
    step = max(1, budget // (shape[0] * shape[1]))
    return [(k0, min(k0 + step, shape[2])) for k0 in range(0, shape[2], step)]


def _window(x: np.ndarray, y: np.ndarray, x_lo: float, x_hi: float, y_lo: float, y_hi: float
            ) -> tuple[slice, slice]:
    """Index ranges of grid x (X, 1, 1), y (1, Y, 1) inside [x_lo, x_hi] x [y_lo, y_hi] mm (possibly empty).
    Small structures are then computed on their own window instead of the whole slice."""
    i0, i1 = np.searchsorted(x.ravel(), [x_lo, x_hi])
    j0, j1 = np.searchsorted(y.ravel(), [y_lo, y_hi])
    return slice(int(i0), int(i1)), slice(int(j0), int(j1))


def _disc_window(x: np.ndarray, y: np.ndarray, cx: np.ndarray | float, cy: np.ndarray | float, reach: float
                 ) -> tuple[slice, slice]:
    """Window around every centre (cx, cy) (scalars or per-slice arrays) widened by ``reach`` mm."""
    cx, cy = np.asarray(cx), np.asarray(cy)
    return _window(x, y, float(cx.min()) - reach, float(cx.max()) + reach, float(cy.min()) - reach,
                   float(cy.max()) + reach)


def _render_chunk(plan: CasePlan, grid: _Grid, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial slices at heights z (1, 1, C) mm: (HU float32 (X, Y, C), liver bool (X, Y, C), tumour bool (X, Y, C)).

    Painted back to front: air, subcutaneous fat, muscle wall, cavity (mottled soft tissue, fat, gas), organs,
    liver with vessels and lesions, then bone over everything.
    """
    hu, f, x, y = plan.hu, plan.fraction(z), grid.x, grid.y
    cy, a, b = plan.body
    breath = 1.0 + 0.03 * np.sin(np.float32(2 * math.pi) * f)  # the body outline varies a little along z
    image = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), -1000.0, np.float32)

    # Scaling both axes leaves the wobble's angle unchanged: one 2D outline, divided by the per-slice scale.
    body_rho = _ellipse_rho(x, y, 0.0, cy, a, b, 0.0, plan.body_harmonics) / breath
    a = a * breath  # per-slice lateral semi-axis, against which the layer thicknesses are measured
    image[body_rho < 1] = hu["fat"]
    wall_scale = 1 - plan.fat_mm / a
    image[body_rho < wall_scale] = hu["muscle"]
    cavity = body_rho < wall_scale - plan.wall_mm / a
    mottle, fat_field, gas_field = (t.at(plane, (x.size, y.size), z)
                                    for t, plane in zip(plan.textures, grid.texture_planes))
    soft = hu["soft"] + 8.0 * mottle
    soft[fat_field > 0.8] = hu["visceral_fat"]
    soft[gas_field > 1.9] = hu["gas"]
    image[cavity] = soft[cavity]

    def paint(w: tuple[slice, slice], region: np.ndarray, value: float) -> np.ndarray:
        """Set ``value`` where ``region`` (window-sized) lies in the cavity; returns that part of the region."""
        region = region & cavity[w]
        image[w][region] = value
        return region

    def grid_in(w: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """The coordinates of window ``w``: x (X', 1, 1), y (1, Y', 1)."""
        return x[w[0]], y[:, w[1]]

    y_canal, r_canal, y_vb, r_vb = plan.spine
    for side in (-1, 1):  # paraspinal muscles either side of the spinous process
        cx = side * (r_canal + 18)
        w = _disc_window(x, y, cx, y_canal - 6, 18)
        paint(w, _ellipse_rho(*grid_in(w), cx, y_canal - 6, 18, 16) < 1, hu["muscle"])

    for kidney in plan.kidneys:
        w = _window(x, y, *kidney.bounds())
        rho = kidney.rho(*grid_in(w), f)
        paint(w, rho < 1, hu["kidney"])
        paint(w, rho < 0.35, hu["sinus"])  # renal sinus fat
    w = _window(x, y, *plan.spleen.bounds())
    paint(w, plan.spleen.rho(*grid_in(w), f) < 1, hu["spleen"])
    ax, ay, ar = plan.aorta
    w = _disc_window(x, y, ax, ay, ar)
    paint(w, _ellipse_rho(*grid_in(w), ax, ay, ar, ar) < 1, hu["aorta"])

    liver = np.zeros(image.shape, bool)
    for lobe in plan.liver:
        w = _window(x, y, *lobe.bounds())
        rho = lobe.rho(*grid_in(w), f)
        paint(w, rho < plan.liver_fat_plane, hu["visceral_fat"])  # a thin fat plane sets the liver off its neighbours
        liver[w] |= rho < 1
    liver &= cavity
    if plan.gallbladder is not None:
        w = _window(x, y, *plan.gallbladder.bounds())
        liver[w] &= ~paint(w, plan.gallbladder.rho(*grid_in(w), f) < 1, hu["gallbladder"])
    image[liver] = hu["liver"] + 2.5 * mottle[liver]

    for vessel in plan.vessels:
        along = (vessel.z0 <= z) & (z <= vessel.z1)
        if not along.any():
            continue
        dz = np.clip(z, vessel.z0, vessel.z1) - vessel.z0
        cx, cyv = vessel.x0 + vessel.slope_x * dz, vessel.y0 + vessel.slope_y * dz
        w = _disc_window(x, y, cx, cyv, vessel.radius)
        tube = _ellipse_rho(*grid_in(w), cx, cyv, vessel.radius, vessel.radius) < 1
        image[w][tube & along & liver[w]] -= vessel.contrast

    tumour = np.zeros(image.shape, bool)
    for lesion in plan.lesions:
        near = np.flatnonzero(np.abs(z.ravel() - lesion.center[2]) < lesion.radii[2] * 1.25)  # beyond the wobble
        if not near.size:
            continue
        ks = slice(int(near[0]), int(near[-1]) + 1)
        wi, wj = _disc_window(x, y, lesion.center[0], lesion.center[1], lesion.reach)
        in_plane = _ellipse_rho(x[wi], y[:, wj], lesion.center[0], lesion.center[1], lesion.radii[0],
                                lesion.radii[1], lesion.angle, lesion.harmonics)
        rho = np.sqrt(in_plane**2 + ((z[:, :, ks] - lesion.center[2]) / lesion.radii[2]) ** 2)
        inside = liver[wi, wj, ks] & (rho < 1)
        # Darkest at the core, fading towards the rim, as real lesions do; the label is the whole ellipsoid.
        image[wi, wj, ks][inside] -= lesion.contrast * (1 - 0.2 * rho[inside] ** 2)
        tumour[wi, wj, ks] |= inside

    bone = _paint_bone(plan, image, x, y, z, f)
    liver &= ~bone
    tumour &= ~bone
    return image, liver, tumour


def _paint_bone(plan: CasePlan, image: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, f: np.ndarray
                ) -> np.ndarray:
    """Vertebra (body with cortex or an intervertebral disc, arch around the canal, spinous process) and ribs.
    Paints ``image`` (X, Y, C) in place; returns the bone mask (X, Y, C) (a disc counts: nothing else may overlap)."""
    hu = plan.hu
    bone = np.zeros(image.shape, bool)
    y_canal, r_canal, y_vb, r_vb = plan.spine
    period, thickness, phase = plan.disc
    w = _disc_window(x, y, 0.0, y_vb, r_vb * 1.1)
    vb_rho = _ellipse_rho(x[w[0]], y[:, w[1]], 0.0, y_vb, r_vb * 1.1, r_vb)
    vertebra = np.broadcast_to(vb_rho < 1, image[w].shape)
    is_disc = (z + phase) % period < thickness
    image[w][vertebra & is_disc] = hu["disc"]
    image[w][vertebra & ~is_disc] = hu["cancellous"]
    image[w][vertebra & ~is_disc & (vb_rho > 1 - 2.5 / r_vb)] = hu["cortex"]
    bone[w] |= vertebra

    y_spinous = y_canal - r_canal - 10
    w = _window(x, y, -r_canal - 4, r_canal + 4, y_spinous - 11, y_canal + r_canal + 4)
    xs, ys = x[w[0]], y[:, w[1]]
    arch = (_ellipse_rho(xs, ys, 0.0, y_canal, r_canal + 4, r_canal + 4) < 1) | (
        _ellipse_rho(xs, ys, 0.0, y_spinous, 4, 11) < 1)
    image[w][np.broadcast_to(arch, image[w].shape)] = hu["cortex"]
    canal = _ellipse_rho(xs, ys, 0.0, y_canal, r_canal, r_canal) < 1
    image[w][np.broadcast_to(canal, image[w].shape)] = hu["csf"]
    bone[w] |= arch

    with_ribs = f > plan.rib_f0
    if with_ribs.any():
        cy, a, b = plan.body
        ring_a, ring_b = a - plan.fat_mm - plan.wall_mm / 2, b - plan.fat_mm - plan.wall_mm / 2
        for angle, drift, radius, phase in plan.ribs:
            theta = angle + drift * f  # ribs run obliquely, so their cross-sections move along z
            # ...and each crosses an axial slice over a band of about 12 mm per 30 mm of rib spacing.
            in_band = with_ribs & ((z + phase) % 30.0 < 12.0)
            if not in_band.any():
                continue
            cx, cyr = ring_a * np.cos(theta), cy + ring_b * np.sin(theta)
            w = _disc_window(x, y, cx, cyr, 1.8 * radius)
            # Cut obliquely, a rib shows as an oval stretched along the body wall.
            oval = _ellipse_rho(x[w[0]], y[:, w[1]], cx, cyr, 1.8 * radius, radius, angle + math.pi / 2)
            rib = in_band & (oval < 1)
            image[w][rib] = hu["rib"]
            bone[w] |= rib
    return bone


def add_noise(image: np.ndarray, plan: CasePlan, rng: np.random.Generator) -> None:
    """Add spatially correlated noise of ``plan.noise_std`` HU and round to stored CT values, in place.

    image: float32 (X, Y, Z). In-plane correlation mimics reconstruction kernels; the kernel's L2 norm rescales the
    filtered white noise back to the intended standard deviation. Noise is drawn slice-major, so the values do not
    depend on the chunking.
    """
    nx, ny, _ = image.shape
    sigma = plan.noise_corr
    delta = np.zeros((4 * math.ceil(3 * sigma) + 1,) * 2, np.float32)
    delta[delta.shape[0] // 2, delta.shape[1] // 2] = 1.0
    kernel_norm = math.sqrt(float((ndimage.gaussian_filter(delta, sigma, truncate=3.0) ** 2).sum()))
    gain = np.float32(plan.noise_std / kernel_norm)
    for k0, k1 in _chunks(image.shape):
        white = rng.standard_normal((k1 - k0, nx, ny), dtype=np.float32)
        noise = ndimage.gaussian_filter(white, (0, sigma, sigma), truncate=3.0).transpose(1, 2, 0)
        chunk = image[:, :, k0:k1]
        chunk += gain * noise
        np.clip(np.rint(chunk, out=chunk), _HU_MIN, _HU_MAX, out=chunk)


# ------------------------------------------------------------------------------------------------- reference methods


def predict_threshold(case: RenderedCase, rng: np.random.Generator) -> np.ndarray:
    """Classical baseline: inside the known liver (minus its partial-volume rim), voxels darker than the liver's
    median by more than 15 HU after in-plane smoothing, cleaned by an opening and a minimum component size.
    Vessels, the noise and faint lesions defeat it: a plausible, beatable reference. -> uint8 (X, Y, Z)."""
    out = np.zeros(case.image.shape, np.uint8)
    # Work on the liver's box; 3 voxels of margin keep the smoothing at the core identical to the whole volume's.
    box = _bbox(case.liver, margin=3)
    core = _axial_erode(case.liver[box]) if box is not None else None
    if core is None or not core.any():
        return out
    image = case.image[box]
    parenchyma = float(np.median(image[core]))  # lesions and vessels are a minority of the liver
    mask = np.zeros(core.shape, bool)
    for k0, k1 in _chunks(core.shape):
        smooth = ndimage.gaussian_filter(image[:, :, k0:k1], (1.0, 1.0, 0.0), truncate=3.0)
        mask[:, :, k0:k1] = core[:, :, k0:k1] & (smooth < parenchyma - 15.0)
    mask = _axial_dilate(_axial_erode(mask))  # opening: drops specks of noise
    components, n = ndimage.label(mask, structure=_CONNECTIVITY_26)
    keep = np.bincount(components.ravel(), minlength=n + 1) >= 10
    keep[0] = False
    out[box] = keep[components]
    return out


def predict_perturbed(case: RenderedCase, rng: np.random.Generator) -> np.ndarray:
    """A noisy copy of the ground truth, like a good but imperfect model: most tiny lesions missed, each other lesion
    eroded or dilated by one voxel in-plane, or kept. -> uint8 (X, Y, Z)."""
    components, n, box = case.components()
    out = np.zeros(case.label.shape, np.uint8)
    if n == 0:
        return out
    in_box = out[box]
    for index, lesion_box in enumerate(ndimage.find_objects(components), start=1):
        if lesion_box is None:
            continue
        padded = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in lesion_box)  # room for a dilation
        lesion = components[padded] == index
        if int(lesion.sum()) < TINY_LESION_VOXELS and rng.random() < 0.6:
            continue
        action = rng.choice(3, p=[0.4, 0.4, 0.2])
        if action == 0:
            eroded = _axial_erode(lesion)
            lesion = eroded if eroded.any() else lesion  # a lesion found stays found, however small
        elif action == 1:
            lesion = _axial_dilate(lesion)
        in_box[padded][lesion] = 1
    return out


def _axial_erode(mask: np.ndarray) -> np.ndarray:
    """Erosion of bool (X, Y, Z) by the in-plane 3x3 cross, outside counting as background (scipy's convention);
    shifted ANDs are several times faster than ndimage.binary_erosion for this one structuring element."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[[0, -1]] = False
    out[:, [0, -1]] = False
    return out


def _axial_dilate(mask: np.ndarray) -> np.ndarray:
    """Dilation of bool (X, Y, Z) by the in-plane 3x3 cross."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


# name -> method(case, rng) -> uint8 (X, Y, Z); each gets its own seeded stream, used or not.
METHODS: dict[str, Callable[[RenderedCase, np.random.Generator], np.ndarray]] = {
    "threshold": predict_threshold,
    "perturbed": predict_perturbed,
}


# ------------------------------------------------------------------------------------------------- writing


def _nifti_header(plan: CasePlan) -> bytes:
    """The 352 bytes before the voxels of an uncompressed single-file NIfTI-1 holding int16 HU."""
    header = nib.Nifti1Header()
    header.set_data_shape(plan.shape)
    header.set_data_dtype(np.int16)
    header.set_qform(plan.affine(), code=1)  # 1 = scanner coordinates, as CT exports use
    header.set_sform(plan.affine(), code=1)
    header.set_zooms(plan.spacing)
    header.set_xyzt_units("mm", "sec")
    header["vox_offset"] = _NIFTI_VOX_OFFSET
    header["descrip"] = b"medseg synthetic CT"
    return header.binaryblock + b"\x00" * (_NIFTI_VOX_OFFSET - len(header.binaryblock))


def _zip_info(name: str, compress_type: int, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = compress_type
    info.external_attr = 0o644 << 16
    info.file_size = size  # known up front, so zipfile writes zip64 headers when a member passes 2 GiB
    return info


def _write_ct_member(zf: zipfile.ZipFile, name: str, image: np.ndarray, plan: CasePlan) -> None:
    """Stream ``image`` float32 (X, Y, Z) of whole HU values into ``zf`` as an int16 NIfTI, one slice at a time."""
    header = _nifti_header(plan)
    nx, ny, nz = image.shape
    with zf.open(_zip_info(name, zipfile.ZIP_BZIP2, len(header) + 2 * nx * ny * nz), "w") as member:
        member.write(header)
        for k in range(nz):
            # NIfTI stores i fastest: the C-order bytes of the transposed slice.
            member.write(np.ascontiguousarray(image[:, :, k].T).astype("<i2").tobytes())


def _metadata(task_name: str, cases: int, size: int, slices: tuple[int, int], seed: int) -> dict:
    """metadata.json in the real Task001's shape, plus the generator's arguments for provenance."""
    return {
        "description": "Synthetic liver tumour CT: phantom twin of Kaggle Medical Image Segmentation Task001 "
                       "(medseg.data.synthetic); not patient data",
        "labels": {"0": "background", "1": "tumor"},
        "licence": "CC-BY",
        "modality": {"0": "CT"},
        "name": task_name,
        "reference": "medseg.data.synthetic",
        "release": f"synthetic-{GENERATOR_VERSION}",
        "synthetic": {"cases": cases, "generator_version": GENERATOR_VERSION, "seed": seed, "size": size,
                      "slices": list(slices)},
        "tensorImageSize": "4D",
    }


@dataclass(frozen=True)
class TaskSummary:
    """What ``build_task`` wrote."""

    task_dir: Path
    cases: int
    lesion_free: int
    tiny_lesion_cases: int  # cases with at least one 26-connected tumour component under TINY_LESION_VOXELS
    methods: tuple[str, ...]
    seconds: float

    def line(self) -> str:
        return (f"{self.task_dir}: {self.cases} cases ({self.lesion_free} lesion-free, {self.tiny_lesion_cases} with "
                f"lesions under {TINY_LESION_VOXELS} voxels), predictions of {', '.join(self.methods)}, "
                f"{self.seconds:.1f} s")


def _validate(cases: int, size: int, slices: tuple[int, int], task_name: str, methods: Sequence[str]) -> None:
    if cases < 1:
        raise ConfigError(f"cases: must be >= 1, got {cases}")
    if size < 32:
        raise ConfigError(f"size: must be >= 32 voxels, got {size}")
    if len(slices) != 2 or not 1 <= slices[0] <= slices[1]:
        raise ConfigError(f"slices: need MIN MAX with 1 <= MIN <= MAX, got {tuple(slices)}")
    if not task_name.startswith("Task") or Path(task_name).name != task_name:
        raise ConfigError(f"task_name: must be a folder name starting with 'Task' (readers discover Task*), "
                          f"got {task_name!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"methods: unknown {unknown or 'none given'}; choose from {sorted(METHODS)}")


def _occupied(target: Path) -> bool:
    return target.exists() and (not target.is_dir() or any(target.iterdir()))


def _refuse_overwrite(target: Path, force: bool) -> None:
    if _occupied(target) and not force:
        raise MedsegError(f"{target}: already exists and is not empty; pass --force (force=True) to replace it")
    if target.exists() and not target.is_dir():
        raise MedsegError(f"{target}: exists and is not a folder; remove it first")


def _swap_into_place(tmp: Path, target: Path, force: bool) -> None:
    """Move the finished folder ``tmp`` to ``target``. Replacing takes two renames (POSIX has no portable
    directory exchange), so readers see the old task, then for an instant none, then the new one: never a mix."""
    _refuse_overwrite(target, force)  # again: another process may have written it meanwhile
    if not _occupied(target):
        os.replace(tmp, target)  # rename over a missing or empty folder
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old)


def build_task(out_dir: str | os.PathLike, *, cases: int = 40, size: int = 128, slices: tuple[int, int] = (24, 48),
               seed: int = 0, task_name: str = DEFAULT_TASK_NAME, methods: Sequence[str] = DEFAULT_METHODS,
               force: bool = False) -> TaskSummary:
    """Write ``<out_dir>/<task_name>/`` (see the module docstring) one case at a time and return what was written.

    Volumes are (size, size, Z) with Z drawn per case in ``slices`` (inclusive). The task is built in a hidden
    sibling folder and renamed into place, so an interrupted run leaves nothing half-written under the task name.
    Raises MedsegError if the task folder exists and is not empty, unless ``force``.
    """
    start = time.perf_counter()
    slices = (int(slices[0]), int(slices[1]))
    methods = tuple(dict.fromkeys(methods))  # drop repeats, keep order
    _validate(cases, size, slices, task_name, methods)
    out_dir = Path(out_dir)
    target = out_dir / task_name
    _refuse_overwrite(target, force)  # before minutes of work, not after
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{task_name}.", suffix=".partial", dir=out_dir))
    try:
        lesion_free, tiny = _write_task(tmp, cases=cases, size=size, slices=slices, seed=seed, task_name=task_name,
                                        methods=methods)
        _make_readable(tmp)
        _swap_into_place(tmp, target, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TaskSummary(target, cases, lesion_free, tiny, methods, time.perf_counter() - start)


def _make_readable(root: Path) -> None:
    """mkdtemp and mkstemp (behind the atomic writes) create owner-only entries; a dataset should read like a copy."""
    os.chmod(root, 0o755)
    for path in root.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _write_task(task_dir: Path, *, cases: int, size: int, slices: tuple[int, int], seed: int, task_name: str,
                methods: tuple[str, ...]) -> tuple[int, int]:
    """Fill ``task_dir``; returns (lesion-free cases, cases with a tiny lesion) as found in the written labels."""
    atomic_write_text(task_dir / "metadata.json",
                      json.dumps(_metadata(task_name, cases, size, slices, seed), indent=4, sort_keys=True) + "\n")
    free, forced_tiny = _task_roles(seed, cases)
    n_free = n_tiny = 0
    # One writer thread streams case i into the zip (bz2 releases the GIL) while case i + 1 is drawn: the archive
    # costs about as much as everything else. At most one member is in flight, so at most two cases are in memory.
    with atomic_path(task_dir / "CT.zip") as zip_tmp, zipfile.ZipFile(zip_tmp, "w") as zf, \
            ThreadPoolExecutor(max_workers=1) as writer:
        # The real archive carries a password-protected .keepkaggle member; a plain one exercises the same skip.
        zf.writestr(_zip_info(".keepkaggle", zipfile.ZIP_STORED, 0), b"")
        pending: Future | None = None
        for index, case_id in enumerate(case_ids(cases)):
            rng = np.random.default_rng([seed, index])
            plan = plan_case(rng, case_id, size=size, slices=slices, with_lesions=index not in free,
                             force_tiny=index in forced_tiny)
            case = render_case(plan)
            add_noise(case.image, plan, rng)
            if pending is not None:
                pending.result()
            pending = writer.submit(_write_ct_member, zf, f"{case_id}.nii", case.image, plan)
            write_label_pickle(task_dir / "GroundTruth" / f"{case_id}.pkl", case.label, plan.spacing)
            sizes = case.lesion_sizes()
            n_free += not sizes
            n_tiny += any(s < TINY_LESION_VOXELS for s in sizes)
            for name in methods:
                # One stream per (case, method), keyed by name: adding a method leaves the others' output unchanged.
                method_rng = np.random.default_rng([seed, index, zlib.crc32(name.encode())])
                write_label_pickle(task_dir / "Predictions" / name / f"{case_id}.pkl",
                                   METHODS[name](case, method_rng), plan.spacing)
            del case  # the writer keeps the image alive until its member is written; the rest goes now
        if pending is not None:
            pending.result()
    return n_free, n_tiny


def generate_task(out_dir: str | os.PathLike, *, cases: int = 40, size: int = 128, slices: tuple[int, int] = (24, 48),
                  seed: int = 0, task_name: str = DEFAULT_TASK_NAME, methods: Sequence[str] = DEFAULT_METHODS,
                  force: bool = False) -> Path:
    """Write the synthetic task and return its folder, ``<out_dir>/<task_name>``. See ``build_task``."""
    return build_task(out_dir, cases=cases, size=size, slices=slices, seed=seed, task_name=task_name,
                      methods=methods, force=force).task_dir


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the task, print a one-line summary; on a MedsegError print it on one line and return 2."""
    parser = argparse.ArgumentParser(prog="python -m medseg.data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/synthetic", help="folder to hold the task folder (default %(default)s)")
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--size", type=int, default=128, help="in-plane voxels per side")
    parser.add_argument("--slices", type=int, nargs=2, default=(24, 48), metavar=("MIN", "MAX"),
                        help="slice count drawn per case in [MIN, MAX]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task-name", default=DEFAULT_TASK_NAME)
    parser.add_argument("--methods", nargs="+", default=[",".join(DEFAULT_METHODS)],
                        help=f"reference methods, comma- or space-separated, from {sorted(METHODS)}")
    parser.add_argument("--force", action="store_true", help="replace an existing task folder")
    args = parser.parse_args(argv)
    methods = [m for item in args.methods for m in item.split(",") if m]
    try:
        summary = build_task(args.out, cases=args.cases, size=args.size, slices=tuple(args.slices), seed=args.seed,
                             task_name=args.task_name, methods=methods, force=args.force)
    except MedsegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
