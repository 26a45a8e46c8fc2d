"""Geometry of the twin: the shapes a case is drawn from (organ blobs, lesions, vessels, textures) and ``CasePlan``,
everything random about one case. Pure data and closed-form geometry; drawing is in ``anatomy``, painting in
``render``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


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
