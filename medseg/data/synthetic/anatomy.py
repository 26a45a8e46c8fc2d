"""Planning: every random choice of a case, drawn up front from its own stream into a ``CasePlan``.

``RANGES`` is the one table of the twin's anatomy and acquisition: each row is a named range drawn uniformly
unless its comment says otherwise. The draws happen in a fixed order (``plan_case``): reordering them, or adding
one, changes the bytes of every case, so bump ``GENERATOR_VERSION`` (``writer``) when you do.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medseg.data.synthetic.render import _render_chunk
from medseg.data.synthetic.shapes import Blob, CasePlan, Lesion, Texture, Vessel, _Grid

TINY_LESION_VOXELS = 50  # the checker's (and the brief's) definition of a tiny lesion: a component under 50 voxels
LESION_FREE_FRACTION = 0.25  # as in the real Task001, about a quarter of the cases hold no tumour

_FOV_MM = 350.0  # typical abdominal reconstruction field of view; in-plane spacing is FOV / size

# (low, high) of every range the twin draws. Units: HU; mm; "x cavity a/b": a fraction of the abdominal cavity's
# lateral / antero-posterior semi-axis; "f": a fraction of the scanned z extent (limits outside [0, 1] cut the organ
# at the edge of the scan); rad: angles from +x, the patient's left. Organ "drift": mm the centre moves over the
# organ's z span; "wobble": boundary harmonics n = 2-4 of relative amplitude up to high / (n - 1).
RANGES: dict[str, tuple[float, float]] = {
    # acquisition
    "spacing.xy_scale": (0.9, 1.12),  # in-plane spacing = FOV / size times this
    "spacing.z": (2.5, 5.0),  # mm, slice thickness (thinner when the slices would not fit in scan_length)
    "scan_length": (250, 320),  # mm, the longest z extent many thin slices may cover
    # Hounsfield units, non-contrast CT (drawn in this order)
    "hu.fat": (-115, -85),  # subcutaneous fat
    "hu.visceral_fat": (-105, -75),  # fat between the organs and the plane around the liver
    "hu.muscle": (40, 55),  # abdominal wall, paraspinal muscles
    "hu.soft": (15, 35),  # bowel and other soft tissue filling the cavity, mottled by +-8 HU
    "hu.kidney": (28, 38),
    "hu.sinus": (-70, -40),  # renal sinus fat
    "hu.spleen": (42, 52),
    "hu.aorta": (35, 48),  # unenhanced blood
    "hu.gallbladder": (0, 20),  # bile: hypodense but not a tumour
    "hu.liver": (55, 65),  # parenchyma, mottled by +-2.5 HU
    "hu.cancellous": (380, 460),  # vertebral body
    "hu.cortex": (600, 720),  # vertebral cortex, arch and spinous process
    "hu.disc": (70, 100),  # intervertebral disc
    "hu.csf": (5, 15),  # spinal canal
    "hu.rib": (450, 650),
    "hu.gas": (-900, -800),  # bowel gas
    # body outline, fat and muscle layers
    "body.a": (135, 165),  # mm, lateral semi-axis, at most 0.46 of the field of view
    "body.b": (95, 120),  # mm, antero-posterior semi-axis, at most 0.40 of the field of view
    "body.cy": (-15, 5),  # mm, centre's offset along y from the middle of the image
    "body.fat": (8, 25),  # mm of subcutaneous fat for a 150 mm lateral semi-axis (scaled with the body)
    "body.wall": (6, 12),  # mm of muscle wall, likewise
    "body.wobble": (0, 0.03),  # relative amplitude of each outline harmonic n = 2-4
    # spine and aorta
    "spine.canal_radius": (6, 8),  # mm
    "spine.canal_depth": (22, 30),  # mm from the back of the cavity to the canal's centre
    "spine.body_radius": (14, 19),  # mm, vertebral body (1.1 times wider than deep), 1 mm in front of the canal
    "spine.disc_period": (28, 34),  # mm from one intervertebral disc to the next
    "spine.disc_thickness": (6, 9),  # mm
    "spine.disc_phase": (0, 34),  # mm
    "aorta.radius": (9, 12),  # mm
    "aorta.x": (5, 15),  # mm left of the midline
    "aorta.gap": (2, 6),  # mm in front of the vertebral body
    # liver, right lobe
    "liver_right.f0": (-0.05, 0.2),  # f, lower tip
    "liver_right.f1": (0.95, 1.25),  # f, dome
    "liver_right.cx": (0.32, 0.42),  # x cavity a, to the patient's right (-x)
    "liver_right.cy": (-0.05, 0.15),  # x cavity b, from the body's centre
    "liver_right.drift": (-10, 10),
    "liver_right.a": (0.42, 0.52),  # x cavity a
    "liver_right.b": (0.6, 0.72),  # x cavity b
    "liver_right.angle": (-0.3, 0.3),  # rad
    "liver_right.wobble": (0, 0.12),
    # liver, left lobe (chance CHANCES["liver_left"]): across the midline, anteriorly, in the upper abdomen
    "liver_left.f0": (0.4, 0.65),  # f
    "liver_left.f1_below_right": (0, 0.15),  # f below the right lobe's dome
    "liver_left.cx": (-0.05, 0.2),  # x cavity a
    "liver_left.cy": (0.3, 0.45),  # x cavity b, anterior
    "liver_left.drift": (-8, 8),
    "liver_left.a": (0.25, 0.38),  # x cavity a
    "liver_left.b": (0.2, 0.3),  # x cavity b
    "liver_left.angle": (-0.4, 0.2),  # rad
    "liver_left.wobble": (0, 0.1),
    # gallbladder (chance CHANCES["gallbladder"]), beside the right lobe's lower part
    "gallbladder.f0_above_liver": (0, 0.1),  # f above the right lobe's lower tip
    "gallbladder.f1_above_liver": (0.3, 0.45),  # f above the right lobe's lower tip
    "gallbladder.cx": (0.3, 0.6),  # x the right lobe's a, from its lower centre
    "gallbladder.cy": (0.3, 0.6),  # x the right lobe's b, from its lower centre
    "gallbladder.drift": (-5, 5),
    "gallbladder.a": (10, 16),  # mm
    "gallbladder.b": (18, 26),  # mm
    "gallbladder.angle": (-0.5, 0.5),  # rad
    "gallbladder.wobble": (0, 0.05),
    # kidneys, either side of the spine
    "kidney.f0": (-0.3, 0.0),  # f
    "kidney.f1": (0.4, 0.6),  # f
    "kidney.right_lower": (0, 0.1),  # f the right kidney sits lower, under the liver
    "kidney.cx": (0.38, 0.5),  # x cavity a, from the midline
    "kidney.cy": (-10, 5),  # mm from the vertebral body's centre
    "kidney.drift": (-5, 5),
    "kidney.a": (18, 24),  # mm
    "kidney.b": (26, 34),  # mm
    "kidney.angle": (0.35, 0.7),  # rad, mirrored on the right
    "kidney.wobble": (0, 0.05),
    # spleen, left and posterior, in the upper abdomen
    "spleen.f0": (0.35, 0.55),  # f
    "spleen.f1": (0.95, 1.2),  # f
    "spleen.cx": (0.5, 0.62),  # x cavity a, to the patient's left
    "spleen.cy": (-0.45, -0.15),  # x cavity b, posterior
    "spleen.drift": (-8, 8),
    "spleen.a": (22, 32),  # mm
    "spleen.b": (40, 55),  # mm
    "spleen.angle": (-1.0, -0.5),  # rad
    "spleen.wobble": (0, 0.08),
    # every organ blob
    "organ.phase_drift": (-2, 2),  # rad each boundary harmonic turns over the organ's z span
    "organ.skew": (0.6, 1.5),  # exponent moving the widest cross-section down (< 1) or up (> 1)
    "liver.fat_plane": (1.03, 1.08),  # outer edge of the perihepatic fat, in the lobes' normalised radius
    # ribs: four a side, lateral and posterior, evenly spread over these angles (not drawn)
    "rib.right_angles": (2.4, 4.4),  # rad
    "rib.left_angles": (-1.3, 0.75),  # rad
    "rib.angle_jitter": (-0.15, 0.15),  # rad
    "rib.angle_drift": (-0.3, 0.3),  # rad over the scan: ribs run obliquely
    "rib.radius": (3.5, 5),  # mm
    "rib.z_phase": (0, 30),  # mm: each rib crosses a slice over 12 mm of every 30 mm
    "rib.f0": (0.25, 0.5),  # f above which ribs appear
    # hepatic vessels: tubes through the right lobe near its hilum, unlabelled, hypodense
    "vessel.count": (3, 6),  # integer, both ends included
    "vessel.f": (0.3, 0.8),  # f of the tube's middle
    "vessel.half_length": (20, 60),  # mm along z
    "vessel.offset": (-0.5, 0.5),  # x the lobe's a (x) and b (y), from the lobe's centre at that height
    "vessel.slope": (-0.6, 0.6),  # mm of in-plane drift per mm of z, along x and along y
    "vessel.radius": (1.5, 4.5),  # mm
    "vessel.contrast": (8, 18),  # HU below the liver
    # tumours: 1-6 lesions, hypodense, apart from each other
    "lesion.first_diameter": (20, 80),  # mm, log-uniform (median 40); the real Task001 burden: median 37 mm
    "lesion.small_diameter": (4, 9),  # mm, a further lesion with chance CHANCES["small_lesion"]: tiny at size 128
    "lesion.diameter": (10, 50),  # mm, log-uniform, any other further lesion
    "lesion.forced_tiny_diameter": (4, 8),  # mm, the one tiny lesion of the cases that must hold one
    "lesion.axis_scale": (0.8, 1.2),  # each semi-axis is the nominal radius times this
    "lesion.wobble": (0, 0.12),  # relative amplitude of each boundary harmonic n = 2, 3
    "lesion.contrast": (10, 40),  # HU below the liver at the core: low + (high - low) * u ** 0.35 (median 33.5)
    # image quality
    "noise.std": (10, 25),  # HU: low + (high - low) * u ** 3 (median 12, as on routine abdominal CT; a hard tail)
    "noise.corr": (0.4, 0.7),  # voxels: in-plane gaussian sigma correlating the noise, as reconstruction does
    "blur.xy": (0.5, 0.9),  # voxels: partial-volume blur in-plane
    "blur.z": (0.3, 0.6),  # voxels: partial-volume blur across slices
    # textures (smooth random fields): wavelengths in mm
    "texture.mottle": (15, 60),  # soft-tissue and liver mottle
    "texture.fat": (20, 70),  # visceral fat islands in the cavity
    "texture.gas": (15, 40),  # bowel gas pockets
}
# Chances of the organs and lesions that not every case has.
CHANCES: dict[str, float] = {
    "liver_left": 0.8,  # a left lobe
    "gallbladder": 0.7,  # a gallbladder: fluid-dense and beside the liver, a hypodense blob that is not a tumour
    "small_lesion": 1 / 3,  # a further lesion is small ("lesion.small_diameter")
}


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    # Python floats keep float32 slice arithmetic in float32 (NumPy 2 promotion rules).
    return float(rng.uniform(low, high))


def _draw(rng: np.random.Generator, name: str) -> float:
    """A uniform draw from the row ``name`` of ``RANGES``."""
    return _u(rng, *RANGES[name])


def case_ids(cases: int) -> list[str]:
    """Case ids "001", "002", "3", "004", ...: strings, some zero-padded, so readers must never cast them to int."""
    return [str(n) if n % 3 == 0 else f"{n:03d}" for n in range(1, cases + 1)]


ROLE_BLOCK = 40  # cases whose roles are drawn together: a task of more cases extends, never redraws, a smaller one


def _task_roles(seed: int, cases: int) -> tuple[set[int], set[int]]:
    """Case indices without lesions (about a quarter; none for a single case) and lesion cases forced to hold
    a tiny lesion (a third of them, at least one), so every task has both kinds whatever the draw.

    Drawn per block of ``ROLE_BLOCK`` cases, each block from its own stream: the first ``k * ROLE_BLOCK`` cases of a
    bigger task are those of the smaller one, byte for byte (per-case streams are already ``[seed, index]``), so
    ``--cases 60`` is the 40-case task with 20 cases added: data that grows."""
    free: set[int] = set()
    tiny: set[int] = set()
    for start in range(0, cases, ROLE_BLOCK):
        n = min(ROLE_BLOCK, cases - start)
        # block 0 keeps the original stream, so tasks of up to ROLE_BLOCK cases are unchanged
        rng = np.random.default_rng([seed, 0x7A5C] if start == 0 else [seed, 0x7A5C, start // ROLE_BLOCK])
        n_free = int(n * LESION_FREE_FRACTION + 0.5) if n > 1 else 0
        block_free = {int(i) for i in rng.choice(n, size=n_free, replace=False)}
        with_lesions = [i for i in range(n) if i not in block_free]
        n_tiny = max(1, math.ceil(len(with_lesions) / 3)) if with_lesions else 0
        block_tiny = {int(i) for i in rng.choice(with_lesions, size=n_tiny, replace=False)} if with_lesions else set()
        free |= {start + i for i in block_free}
        tiny |= {start + i for i in block_tiny}
    return free, tiny


@dataclass(frozen=True)
class _Body:
    """The body outline, its layers, the spine and the aorta's radius, in mm (see ``CasePlan``)."""

    cy: float
    a: float
    b: float
    fat: float
    wall: float
    y_canal: float
    r_canal: float
    y_vb: float
    r_vb: float
    r_aorta: float

    @property
    def cavity(self) -> tuple[float, float]:
        """The abdominal cavity's semi-axes (a, b)."""
        return self.a - self.fat - self.wall, self.b - self.fat - self.wall


def _draw_grid(rng: np.random.Generator, size: int, slices: tuple[int, int]
               ) -> tuple[tuple[int, int, int], tuple[float, float, float], float]:
    """(shape (X, Y, Z), spacing mm as float32-exact floats, in-plane field of view mm)."""
    nz = int(rng.integers(slices[0], slices[1] + 1))
    sxy = _FOV_MM / size * _draw(rng, "spacing.xy_scale")
    # Thick slices for short scans (2.5-5 mm, as in the default), thinner when many slices would exceed an abdomen.
    sz = max(0.5, round(min(_draw(rng, "spacing.z"), _draw(rng, "scan_length") / nz) * 4) / 4)
    spacing = tuple(float(np.float32(v)) for v in (sxy, sxy, sz))
    return (size, size, nz), spacing, size * sxy


def _draw_body(rng: np.random.Generator, fov: float) -> _Body:
    a_body = min(_draw(rng, "body.a"), 0.46 * fov)
    b_body = min(_draw(rng, "body.b"), 0.40 * fov)
    cy = _draw(rng, "body.cy")
    fat, wall = _draw(rng, "body.fat") * a_body / 150, _draw(rng, "body.wall") * a_body / 150
    bi = b_body - fat - wall
    r_canal = _draw(rng, "spine.canal_radius")
    y_canal = cy - bi + _draw(rng, "spine.canal_depth")
    r_vb = _draw(rng, "spine.body_radius")
    y_vb = y_canal + r_canal + r_vb + 1
    return _Body(cy, a_body, b_body, fat, wall, y_canal, r_canal, y_vb, r_vb, _draw(rng, "aorta.radius"))


def _blob(rng: np.random.Generator, organ: str, f: tuple[float, float], centre: tuple[float, float],
          axes: tuple[float, float], angle: float) -> Blob:
    """The organ ``organ`` (its rows of ``RANGES``) spanning z-fractions ``f``, centred at ``centre`` mm, with
    semi-axes ``axes`` mm; draws its boundary harmonics, drift and skew."""
    cx, cy = centre
    wobble_low, wobble_high = RANGES[f"{organ}.wobble"]
    harmonics = tuple((n, _u(rng, wobble_low, wobble_high / (n - 1)), _u(rng, 0, 2 * math.pi),
                       _draw(rng, "organ.phase_drift")) for n in (2, 3, 4))
    drift = f"{organ}.drift"
    return Blob(f[0], f[1], cx, cy, cx + _draw(rng, drift), cy + _draw(rng, drift),
                axes[0], axes[1], angle, _draw(rng, "organ.skew"), harmonics)


def _draw_organ(rng: np.random.Generator, organ: str, f: tuple[float, float], centre: tuple[float, float],
                scale: tuple[float, float]) -> Blob:
    """An organ whose semi-axes are its rows ``a``, ``b`` times ``scale`` (1 for mm, the cavity's for fractions)."""
    axes = (_draw(rng, f"{organ}.a") * scale[0], _draw(rng, f"{organ}.b") * scale[1])
    return _blob(rng, organ, f, centre, axes, _draw(rng, f"{organ}.angle"))


def _draw_liver(rng: np.random.Generator, body: _Body) -> tuple[Blob, ...]:
    """The right lobe, and with chance CHANCES["liver_left"] a left lobe."""
    ai, bi = body.cavity
    right = _draw_organ(rng, "liver_right", (_draw(rng, "liver_right.f0"), _draw(rng, "liver_right.f1")),
                        (-_draw(rng, "liver_right.cx") * ai, body.cy + _draw(rng, "liver_right.cy") * bi), (ai, bi))
    if rng.random() >= CHANCES["liver_left"]:
        return (right,)
    left = _draw_organ(rng, "liver_left",
                       (_draw(rng, "liver_left.f0"), right.f1 - _draw(rng, "liver_left.f1_below_right")),
                       (_draw(rng, "liver_left.cx") * ai, body.cy + _draw(rng, "liver_left.cy") * bi), (ai, bi))
    return right, left


def _draw_gallbladder(rng: np.random.Generator, right: Blob) -> Blob | None:
    if rng.random() >= CHANCES["gallbladder"]:
        return None
    f = (right.f0 + _draw(rng, "gallbladder.f0_above_liver"), right.f0 + _draw(rng, "gallbladder.f1_above_liver"))
    centre = (right.cx0 + _draw(rng, "gallbladder.cx") * right.a, right.cy0 + _draw(rng, "gallbladder.cy") * right.b)
    return _draw_organ(rng, "gallbladder", f, centre, (1, 1))


def _draw_kidneys(rng: np.random.Generator, body: _Body) -> tuple[Blob, Blob]:
    """The right kidney (-x), then the left."""
    f0, f1 = _draw(rng, "kidney.f0"), _draw(rng, "kidney.f1")
    kidneys = []
    for side, low in ((-1, _draw(rng, "kidney.right_lower")), (1, 0.0)):
        centre = (side * _draw(rng, "kidney.cx") * body.cavity[0], body.y_vb + _draw(rng, "kidney.cy"))
        axes = (_draw(rng, "kidney.a"), _draw(rng, "kidney.b"))
        kidneys.append(_blob(rng, "kidney", (f0 - low, f1 - low), centre, axes, side * _draw(rng, "kidney.angle")))
    return kidneys[0], kidneys[1]


def _draw_spleen(rng: np.random.Generator, body: _Body) -> Blob:
    ai, bi = body.cavity
    return _draw_organ(rng, "spleen", (_draw(rng, "spleen.f0"), _draw(rng, "spleen.f1")),
                       (_draw(rng, "spleen.cx") * ai, body.cy + _draw(rng, "spleen.cy") * bi), (1, 1))


def _draw_ribs(rng: np.random.Generator) -> tuple[tuple[float, float, float, float], ...]:
    """Four ribs a side: (angle rad, angle drift over the scan, radius mm, z phase mm) each."""
    angles = np.concatenate([np.linspace(*RANGES["rib.right_angles"], 4), np.linspace(*RANGES["rib.left_angles"], 4)])
    return tuple((side_angle + _draw(rng, "rib.angle_jitter"), _draw(rng, "rib.angle_drift"),
                  _draw(rng, "rib.radius"), _draw(rng, "rib.z_phase")) for side_angle in angles.tolist())


def _draw_vessel(rng: np.random.Generator, lobe: Blob, z_extent: float) -> Vessel:
    """A tube through the right lobe near its hilum, running mostly along z."""
    f = _draw(rng, "vessel.f")
    t = (f - lobe.f0) / (lobe.f1 - lobe.f0)
    cx, cy = lobe.cx0 + (lobe.cx1 - lobe.cx0) * t, lobe.cy0 + (lobe.cy1 - lobe.cy0) * t
    z_mid, half = f * max(z_extent, 1.0), _draw(rng, "vessel.half_length")
    return Vessel(cx + _draw(rng, "vessel.offset") * lobe.a, cy + _draw(rng, "vessel.offset") * lobe.b,
                  z_mid - half, z_mid + half, _draw(rng, "vessel.slope"), _draw(rng, "vessel.slope"),
                  _draw(rng, "vessel.radius"), _draw(rng, "vessel.contrast"))


def _draw_vessels(rng: np.random.Generator, lobe: Blob, z_extent: float) -> tuple[Vessel, ...]:
    low, high = RANGES["vessel.count"]
    return tuple(_draw_vessel(rng, lobe, z_extent) for _ in range(int(rng.integers(low, high + 1))))


def _skewed(rng: np.random.Generator, name: str, power: float) -> float:
    """low + (high - low) * u ** power for u uniform in [0, 1]: leans to ``low`` for power > 1, to ``high`` below."""
    low, high = RANGES[name]
    return low + (high - low) * _u(rng, 0, 1) ** power


def plan_case(rng: np.random.Generator, case_id: str, *, size: int, slices: tuple[int, int],
              with_lesions: bool, force_tiny: bool) -> CasePlan:
    """Draw one case's anatomy, intensities, lesions and acquisition settings from ``rng``, in a fixed order."""
    shape, spacing, fov = _draw_grid(rng, size, slices)
    hu = {name.removeprefix("hu."): _draw(rng, name) for name in RANGES if name.startswith("hu.")}
    body = _draw_body(rng, fov)
    liver = _draw_liver(rng, body)
    gallbladder = _draw_gallbladder(rng, liver[0])
    kidneys = _draw_kidneys(rng, body)
    spleen = _draw_spleen(rng, body)
    ribs = _draw_ribs(rng)
    vessels = _draw_vessels(rng, liver[0], (shape[2] - 1) * spacing[2])
    blur_xy = _draw(rng, "blur.xy")
    plan = CasePlan(
        case_id=case_id, shape=shape, spacing=spacing, hu=hu,
        noise_std=_skewed(rng, "noise.std", 3), noise_corr=_draw(rng, "noise.corr"),
        blur_sigma=(blur_xy, blur_xy, _draw(rng, "blur.z")),
        body=(body.cy, body.a, body.b),
        body_harmonics=tuple((n, _draw(rng, "body.wobble"), _u(rng, 0, 2 * math.pi)) for n in (2, 3, 4)),
        fat_mm=body.fat, wall_mm=body.wall,
        spine=(body.y_canal, body.r_canal, body.y_vb, body.r_vb),
        disc=(_draw(rng, "spine.disc_period"), _draw(rng, "spine.disc_thickness"), _draw(rng, "spine.disc_phase")),
        aorta=(_draw(rng, "aorta.x"), body.y_vb + body.r_vb + body.r_aorta + _draw(rng, "aorta.gap"), body.r_aorta),
        ribs=ribs, rib_f0=_draw(rng, "rib.f0"),
        liver=liver, liver_fat_plane=_draw(rng, "liver.fat_plane"), gallbladder=gallbladder, kidneys=kidneys,
        spleen=spleen, vessels=vessels, lesions=(),
        textures=(Texture.draw(rng, 6, RANGES["texture.mottle"]), Texture.draw(rng, 6, RANGES["texture.fat"]),
                  Texture.draw(rng, 4, RANGES["texture.gas"])),
    )
    # Lesions last: placing them needs the finished liver (cut by the gallbladder, the spine, the cavity).
    return dataclasses.replace(plan, lesions=_draw_lesions(rng, plan, force_tiny)) if with_lesions else plan


def _liver_rho_at(liver: Sequence[Blob], x: float, y: float, f: float) -> tuple[float, float]:
    """(normalised radius, local lobe radius mm) of the lobe that best contains point (x, y) at z-fraction f."""
    best = (math.inf, 0.0)
    for lobe in liver:
        rho = float(lobe.rho(np.float32(x), np.float32(y), f))
        if rho < best[0]:
            best = (rho, lobe.local_radius(f))
    return best


def _log_uniform(rng: np.random.Generator, name: str) -> float:
    low, high = RANGES[name]
    return math.exp(_u(rng, math.log(low), math.log(high)))


def _lesion_diameters(rng: np.random.Generator, force_tiny: bool) -> list[float]:
    """The first lesion, 0-4 further ones (1.2 on average), and the forced tiny one first when asked."""
    extra = min(4, int(rng.poisson(1.2)))
    diameters = [_log_uniform(rng, "lesion.first_diameter")] + [
        _draw(rng, "lesion.small_diameter") if rng.random() < CHANCES["small_lesion"]
        else _log_uniform(rng, "lesion.diameter") for _ in range(extra)]
    if force_tiny:  # placed first, while the liver is still empty enough to take it
        diameters.insert(0, _draw(rng, "lesion.forced_tiny_diameter"))
    return diameters


def _lesion_shape(rng: np.random.Generator, diameter: float) -> Lesion:
    """A lesion of nominal ``diameter`` mm, centred at the origin until placed."""
    r = diameter / 2
    radii = (r * _draw(rng, "lesion.axis_scale"), r * _draw(rng, "lesion.axis_scale"),
             r * _draw(rng, "lesion.axis_scale"))
    harmonics = tuple((m, _draw(rng, "lesion.wobble"), _u(rng, 0, 2 * math.pi)) for m in (2, 3))
    contrast = _skewed(rng, "lesion.contrast", 0.35)
    return Lesion((0.0, 0.0, 0.0), radii, _u(rng, 0, math.pi), harmonics, contrast)


def _draw_lesions(rng: np.random.Generator, plan: CasePlan, force_tiny: bool) -> tuple[Lesion, ...]:
    """1-6 lesions centred in the liver, apart from each other (so each is its own evalseg segment).

    Diameters: the first lesion is 20-80 mm (log-uniform, median 40 mm), so every lesion case has something a model
    can find; the real Task001 ground truths in ../shared/data/evalseg give a total tumour volume per lesion case of
    4-153 mm equivalent-sphere diameter, median 37 mm. Each further lesion is small (4-9 mm: tiny at the default grid,
    where a voxel is ~27 mm^3) with probability 1/3, else 10-50 mm. ``force_tiny`` adds a small one. Contrast
    10-40 HU below the liver. Centres sit on voxel centres inside the rendered liver mask, so every lesion, however
    small, labels at least one voxel.
    """
    placer = _LesionPlacer(plan)
    lesions: list[Lesion] = []
    for diameter in _lesion_diameters(rng, force_tiny):
        shape = _lesion_shape(rng, diameter)
        for _ in range(300):
            centre = placer.try_centre(rng, diameter / 2, shape, lesions)
            if centre is not None:
                lesions.append(dataclasses.replace(shape, center=centre))
                break
    return tuple(lesions)


class _LesionPlacer:
    """Candidate lesion centres of one plan, and the rendered liver masks (X, Y) of the slices tried so far."""

    def __init__(self, plan: CasePlan) -> None:
        self.plan, self.grid = plan, _Grid.of(plan)
        self.bounds = np.array([lobe.bounds() for lobe in plan.liver])
        self.f_range = (max(0.0, plan.liver[0].f0), min(1.0, plan.liver[0].f1))
        self.liver_slices: dict[int, np.ndarray] = {}

    def try_centre(self, rng: np.random.Generator, r: float, shape: Lesion, placed: Sequence[Lesion]
                   ) -> tuple[float, float, float] | None:
        """One random voxel centre (mm) for a lesion of nominal radius ``r``; None when it fails a check."""
        (nx, ny, nz), spacing, liver, bounds = self.plan.shape, self.plan.spacing, self.plan.liver, self.bounds
        k = int(round(_u(rng, *self.f_range) * (nz - 1)))
        i = _nearest_index(_u(rng, bounds[:, 0].min(), bounds[:, 1].max()), spacing[0], nx)
        j = _nearest_index(_u(rng, bounds[:, 2].min(), bounds[:, 3].max()), spacing[1], ny)
        centre = (float(self.grid.x[i, 0, 0]), float(self.grid.y[0, j, 0]), k * spacing[2])
        rho, local = _liver_rho_at(liver, centre[0], centre[1], float(self.plan.fraction(centre[2])))
        # Mostly inside: a lesion may bulge past the capsule a little and is then cut by the liver mask.
        if local <= 0 or rho >= 1 - 0.7 * r / local:
            return None
        # Two voxels of liver between lesions, so 26-connectivity never merges them into one segment.
        if any(math.dist(centre, o.center) < shape.reach + o.reach + 2 * max(spacing) for o in placed):
            return None
        if k not in self.liver_slices:
            z = np.full((1, 1, 1), k * spacing[2], np.float32)
            self.liver_slices[k] = _render_chunk(self.plan, self.grid, z)[1][:, :, 0]
        return centre if self.liver_slices[k][i, j] else None


def _nearest_index(value: float, step: float, n: int) -> int:
    """Index of the voxel centre nearest ``value`` mm on the centred grid (i - (n - 1) / 2) * step, i in [0, n)."""
    return min(max(round(value / step + (n - 1) / 2), 0), n - 1)
