"""Test-time augmentation by mirroring, limited to the mirrors the training augmentation showed the model.

As nnU-Net does, a prediction is averaged over mirrored copies of the input only along axes the model saw
mirrored in training: a model trained without flips loses Dice when it is asked about mirrored images.

Mirrors are named by the dims of an (N, C, H, W) batch they flip: ``[2]`` flips the height (what
albumentations' ``VerticalFlip`` does to an (H, W, C) image's first axis), ``[3]`` the width
(``HorizontalFlip``: the last axis of the batch), ``[2, 3]`` both at once (a 180-degree rotation).

What each transform of the config's ``augment`` list can produce (albumentations 2.0 source,
``augmentations/geometric/flip.py`` and ``rotate.py``), with probability ``p``:

- ``HorizontalFlip``: identity or the width flip; ``VerticalFlip``: identity or the height flip.
- ``RandomRotate90``: ``np.rot90`` by 0, 1, 2 or 3 quarter turns; the half turn equals flipping both axes, but a
  rotation never mirrors one axis alone (it keeps the image's handedness).
- ``Transpose``: identity or swapping rows and columns (a mirror about the diagonal, not along an axis).
- ``D4`` / ``SquareSymmetry``: any of the 8 symmetries of the square, which include both single-axis flips.
- anything else (crops, ``Affine``, ``Rotate`` by a few degrees, intensity transforms): identity.

The transforms run in sequence, so the orientations training can produce are the products of these sets in the
pipeline's order (``HorizontalFlip`` then ``RandomRotate90`` reaches all 8: a height flip is a width flip
followed by a half turn). A mirror is used at test time when it is one of those orientations. So
``exp_001_aug_sched.yaml`` (both flips + rot90) gets ``[[2], [3], [2, 3]]``, the baseline (no flip) ``[]``,
``HorizontalFlip`` alone ``[[3]]`` and ``RandomRotate90`` alone ``[[2, 3]]``.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import numpy as np
import torch

Mirrors = list[list[int]]
CANDIDATES: tuple[tuple[int, ...], ...] = ((2,), (3,), (2, 3))  # dims of an (N, C, H, W) batch

_OPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "h": lambda a: np.flip(a, 1),  # HorizontalFlip: width, the second axis of an (H, W) image
    "v": lambda a: np.flip(a, 0),  # VerticalFlip: height
    "r": lambda a: np.rot90(a, 1),  # RandomRotate90: one quarter turn (np.rot90, as albumentations' rot90)
    "t": lambda a: a.T,  # Transpose
}
_ROTATIONS = [(), ("r",), ("r", "r"), ("r", "r", "r")]
# per transform name: the non-identity outcomes as sequences of _OPS, applied left to right
ORIENTATIONS: dict[str, list[tuple[str, ...]]] = {
    "HorizontalFlip": [("h",)],
    "VerticalFlip": [("v",)],
    "RandomRotate90": _ROTATIONS,  # factor 0..3: identity even at p=1
    "Transpose": [("t",)],
    "D4": [rot + flip for rot in _ROTATIONS for flip in ((), ("h",))],
}
ORIENTATIONS["SquareSymmetry"] = ORIENTATIONS["D4"]  # albumentations: "an alias for D4"

_PROBE = np.arange(9).reshape(3, 3)  # no symmetry of the square leaves it unchanged: one key per orientation


def _key(a: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in np.ascontiguousarray(a).ravel())


def _outcomes(name: str, p: float) -> list[tuple[str, ...]]:
    moves = ORIENTATIONS.get(name, [])
    if p <= 0 or not moves:
        return [()]
    return ([()] if p < 1 else []) + moves


def mirrors_from_augment(augment: Sequence[Any]) -> Mirrors:
    """The test-time mirrors for a config's ``augment`` list (``AugmentConfig`` items, or dicts with ``name``
    and the transform's arguments): each a list of (N, C, H, W) dims, e.g. ``[[2], [3], [2, 3]]``; ``[]``
    when training never flipped."""
    from medseg.config import build_transform

    reached = {_key(_PROBE): _PROBE}
    for item in augment:
        if isinstance(item, dict):
            name, params = item["name"], {k: v for k, v in item.items() if k != "name"}
        else:
            name, params = item.name, item.params()
        if name not in ORIENTATIONS:
            continue
        # the transform's own default when the config omits p
        p = float(getattr(build_transform(name, params), "p", 1.0))
        step = {}
        for a in reached.values():
            for ops in _outcomes(name, p):
                b = a
                for op in ops:
                    b = _OPS[op](b)
                step[_key(b)] = b
        reached = step
    return [list(dims) for dims in CANDIDATES if _key(np.flip(_PROBE, [d - 2 for d in dims])) in reached]


def format_mirrors(mirrors: Mirrors) -> str:
    """The MLflow tag / log text: ``[[2], [3], [2, 3]]`` (JSON)."""
    return json.dumps([list(m) for m in mirrors])


def mirrored_logits(model: torch.nn.Module, x: torch.Tensor, logits: torch.Tensor,
                    mirrors: Sequence[Sequence[int]]) -> torch.Tensor:
    """Average the probabilities of ``logits`` (the model's output on ``x``) with those of each mirrored input,
    mirrored back; returned as logits (sigmoid or softmax inverted) so thresholds and argmax apply unchanged.
    With no mirrors, ``logits`` itself."""
    if not mirrors:
        return logits
    to_prob = torch.sigmoid if logits.shape[1] == 1 else (lambda t: torch.softmax(t, dim=1))
    probs = to_prob(logits)
    for dims in mirrors:
        dims = tuple(int(d) for d in dims)
        probs = probs + to_prob(model(torch.flip(x, dims)).float()).flip(dims)
    probs = (probs / (len(mirrors) + 1)).clamp(1e-6, 1 - 1e-6)
    return torch.logit(probs) if logits.shape[1] == 1 else torch.log(probs)
