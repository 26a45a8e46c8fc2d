"""Rendering: a ``CasePlan`` painted into a noise-free phantom (HU, liver and tumour masks), blurred, then noised.

Slices are painted a chunk at a time in millimetre coordinates, back to front: air, subcutaneous fat, muscle wall,
cavity (mottled soft tissue, fat, gas), organs, liver with vessels and lesions, then bone over everything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from medseg.data.synthetic.shapes import CasePlan, _ellipse_rho, _Grid
from medseg.metrics import foreground_box, label_components

_HU_MIN, _HU_MAX = -1024, 3071  # the range a 12-bit CT scanner stores


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
            components, n = label_components(self.label[box])
            self._components = (components, n, box)
        return self._components
    def lesion_sizes(self) -> list[int]:
        """Voxel count of each tumour component."""
        components, n, _ = self.components()
        return np.bincount(components.ravel(), minlength=n + 1)[1:].tolist()


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, slice, slice] | None:
    """Bounding box of the True voxels of bool (X, Y, Z) widened by ``margin`` voxels (clipped); None when empty."""
    box = foreground_box(mask)
    if box is None:
        return None
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, mask.shape))


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



@dataclass(frozen=True)
class _Canvas:
    """A chunk of axial slices being painted: image float32 (X, Y, C) HU (painted in place), cavity bool (X, Y, C),
    the grid x (X, 1, 1), y (1, Y, 1) and the slices' heights z (1, 1, C) mm and z-fractions f (1, 1, C)."""

    image: np.ndarray
    cavity: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    f: np.ndarray

    def window(self, x_lo: float, x_hi: float, y_lo: float, y_hi: float) -> tuple[slice, slice]:
        return _window(self.x, self.y, x_lo, x_hi, y_lo, y_hi)

    def disc_window(self, cx: np.ndarray | float, cy: np.ndarray | float, reach: float) -> tuple[slice, slice]:
        return _disc_window(self.x, self.y, cx, cy, reach)

    def grid_in(self, w: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """The coordinates of window ``w``: x (X', 1, 1), y (1, Y', 1)."""
        return self.x[w[0]], self.y[:, w[1]]

    def paint(self, w: tuple[slice, slice], region: np.ndarray, value: float) -> np.ndarray:
        """Set ``value`` where ``region`` (window-sized) lies in the cavity; returns that part of the region."""
        region = region & self.cavity[w]
        self.image[w][region] = value
        return region


def _render_chunk(plan: CasePlan, grid: _Grid, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial slices at heights z (1, 1, C) mm: (HU float32 (X, Y, C), liver bool (X, Y, C), tumour bool (X, Y, C)).

    Painted back to front (see the module docstring); bone is painted last and cut out of the liver and tumours.
    """
    canvas, mottle = _paint_body(plan, grid, z)
    _paint_organs(plan, canvas)
    liver = _paint_liver(plan, canvas, mottle)
    _paint_vessels(plan, canvas, liver)
    tumour = _paint_lesions(plan, canvas, liver)
    bone = _paint_bone(plan, canvas)
    liver &= ~bone
    tumour &= ~bone
    return canvas.image, liver, tumour


def _paint_body(plan: CasePlan, grid: _Grid, z: np.ndarray) -> tuple[_Canvas, np.ndarray]:
    """Air, subcutaneous fat, muscle wall and the cavity's soft tissue, visceral fat and gas.
    -> (the canvas, the soft-tissue mottle float32 (X, Y, C), about unit standard deviation)."""
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
    return _Canvas(image, cavity, x, y, z, f), mottle


def _paint_organs(plan: CasePlan, canvas: _Canvas) -> None:
    """Paraspinal muscles, kidneys with their sinus fat, spleen and aorta, inside the cavity."""
    hu, f = plan.hu, canvas.f
    y_canal, r_canal, y_vb, r_vb = plan.spine
    for side in (-1, 1):  # paraspinal muscles either side of the spinous process
        cx = side * (r_canal + 18)
        w = canvas.disc_window(cx, y_canal - 6, 18)
        canvas.paint(w, _ellipse_rho(*canvas.grid_in(w), cx, y_canal - 6, 18, 16) < 1, hu["muscle"])

    for kidney in plan.kidneys:
        w = canvas.window(*kidney.bounds())
        rho = kidney.rho(*canvas.grid_in(w), f)
        canvas.paint(w, rho < 1, hu["kidney"])
        canvas.paint(w, rho < 0.35, hu["sinus"])  # renal sinus fat
    w = canvas.window(*plan.spleen.bounds())
    canvas.paint(w, plan.spleen.rho(*canvas.grid_in(w), f) < 1, hu["spleen"])
    ax, ay, ar = plan.aorta
    w = canvas.disc_window(ax, ay, ar)
    canvas.paint(w, _ellipse_rho(*canvas.grid_in(w), ax, ay, ar, ar) < 1, hu["aorta"])


def _paint_liver(plan: CasePlan, canvas: _Canvas, mottle: np.ndarray) -> np.ndarray:
    """The lobes in their fat plane, less the gallbladder (painted too), with a fainter mottle.
    -> the liver bool (X, Y, C)."""
    hu, f = plan.hu, canvas.f
    liver = np.zeros(canvas.image.shape, bool)
    for lobe in plan.liver:
        w = canvas.window(*lobe.bounds())
        rho = lobe.rho(*canvas.grid_in(w), f)
        # A thin fat plane sets the liver off its neighbours.
        canvas.paint(w, rho < plan.liver_fat_plane, hu["visceral_fat"])
        liver[w] |= rho < 1
    liver &= canvas.cavity
    if plan.gallbladder is not None:
        w = canvas.window(*plan.gallbladder.bounds())
        liver[w] &= ~canvas.paint(w, plan.gallbladder.rho(*canvas.grid_in(w), f) < 1, hu["gallbladder"])
    canvas.image[liver] = hu["liver"] + 2.5 * mottle[liver]
    return liver


def _paint_vessels(plan: CasePlan, canvas: _Canvas, liver: np.ndarray) -> None:
    """Darken the hepatic vessels' tubes where they cross the liver."""
    image, z = canvas.image, canvas.z
    for vessel in plan.vessels:
        along = (vessel.z0 <= z) & (z <= vessel.z1)
        if not along.any():
            continue
        dz = np.clip(z, vessel.z0, vessel.z1) - vessel.z0
        cx, cyv = vessel.x0 + vessel.slope_x * dz, vessel.y0 + vessel.slope_y * dz
        w = canvas.disc_window(cx, cyv, vessel.radius)
        tube = _ellipse_rho(*canvas.grid_in(w), cx, cyv, vessel.radius, vessel.radius) < 1
        image[w][tube & along & liver[w]] -= vessel.contrast


def _paint_lesions(plan: CasePlan, canvas: _Canvas, liver: np.ndarray) -> np.ndarray:
    """Darken the lesions inside the liver. -> the tumour bool (X, Y, C)."""
    image, x, y, z = canvas.image, canvas.x, canvas.y, canvas.z
    tumour = np.zeros(image.shape, bool)
    for lesion in plan.lesions:
        near = np.flatnonzero(np.abs(z.ravel() - lesion.center[2]) < lesion.radii[2] * 1.25)  # beyond the wobble
        if not near.size:
            continue
        ks = slice(int(near[0]), int(near[-1]) + 1)
        wi, wj = canvas.disc_window(lesion.center[0], lesion.center[1], lesion.reach)
        in_plane = _ellipse_rho(x[wi], y[:, wj], lesion.center[0], lesion.center[1], lesion.radii[0],
                                lesion.radii[1], lesion.angle, lesion.harmonics)
        rho = np.sqrt(in_plane**2 + ((z[:, :, ks] - lesion.center[2]) / lesion.radii[2]) ** 2)
        inside = liver[wi, wj, ks] & (rho < 1)
        # Darkest at the core, fading towards the rim, as real lesions do; the label is the whole ellipsoid.
        image[wi, wj, ks][inside] -= lesion.contrast * (1 - 0.2 * rho[inside] ** 2)
        tumour[wi, wj, ks] |= inside
    return tumour


def _paint_bone(plan: CasePlan, canvas: _Canvas) -> np.ndarray:
    """Vertebra (body with cortex or an intervertebral disc, arch around the canal, spinous process) and ribs.
    Paints the canvas in place; returns the bone mask (X, Y, C) (a disc counts: nothing else may overlap)."""
    hu, image, x, y, z = plan.hu, canvas.image, canvas.x, canvas.y, canvas.z
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
    _paint_ribs(plan, canvas, bone)
    return bone


def _paint_ribs(plan: CasePlan, canvas: _Canvas, bone: np.ndarray) -> None:
    """Rib cross-sections on the slices above ``plan.rib_f0``; marks them in ``bone`` (X, Y, C)."""
    image, z, f = canvas.image, canvas.z, canvas.f
    with_ribs = f > plan.rib_f0
    if not with_ribs.any():
        return
    cy, a, b = plan.body
    ring_a, ring_b = a - plan.fat_mm - plan.wall_mm / 2, b - plan.fat_mm - plan.wall_mm / 2
    for angle, drift, radius, phase in plan.ribs:
        theta = angle + drift * f  # ribs run obliquely, so their cross-sections move along z
        # ...and each crosses an axial slice over a band of about 12 mm per 30 mm of rib spacing.
        in_band = with_ribs & ((z + phase) % 30.0 < 12.0)
        if not in_band.any():
            continue
        cx, cyr = ring_a * np.cos(theta), cy + ring_b * np.sin(theta)
        w = canvas.disc_window(cx, cyr, 1.8 * radius)
        # Cut obliquely, a rib shows as an oval stretched along the body wall.
        oval = _ellipse_rho(*canvas.grid_in(w), cx, cyr, 1.8 * radius, radius, angle + math.pi / 2)
        rib = in_band & (oval < 1)
        image[w][rib] = plan.hu["rib"]
        bone[w] |= rib


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
