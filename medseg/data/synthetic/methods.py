"""Reference methods: the predictions written under ``Predictions/<method>/``, two methods that score differently
(``threshold`` well below ``perturbed``), so a leaderboard has something to rank a model against."""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

from medseg.data.synthetic.anatomy import TINY_LESION_VOXELS
from medseg.data.synthetic.render import RenderedCase, _bbox, _chunks
from medseg.metrics import label_components


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
    components, n = label_components(mask)
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

