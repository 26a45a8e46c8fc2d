"""Torch datasets over the slice cache, with albumentations and 2.5D context, and the epoch sampler."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def label_lut(labels: Sequence[int]) -> np.ndarray:
    """uint8 lookup table: raw label value -> class index (labels[i] -> i + 1, anything else -> 0).

    Values must be distinct and in 1..255: a repeated value would silently leave a class without pixels
    (``[1, 1]`` gave class 2 only), and 0 would turn the background into a foreground class.
    """
    lut = np.zeros(256, np.uint8)
    for i, value in enumerate(labels):
        if not 1 <= int(value) <= 255:
            raise ValueError(f"label value {value} out of range 1..255 (0 is the background) in {list(labels)}")
        if lut[int(value)]:
            raise ValueError(f"label value {value} listed twice in {list(labels)}")
        lut[int(value)] = i + 1
    return lut


def context_indices(z: int, n_slices: int, k: int) -> np.ndarray:
    """Slice indices z-k..z+k clamped to the volume (edge slices repeat): the 2.5D input channels."""
    return np.clip(np.arange(z - k, z + k + 1), 0, n_slices - 1)


def stack_context(volume: np.ndarray, z: int, k: int) -> np.ndarray:
    """(Z, S, S) volume -> (2k+1, S, S) float32 block centred on slice z. A colour volume (Z, C, S, S) ->
    ((2k+1) * C, S, S): the C channels of slice z-k, then those of z-k+1, ..."""
    block = np.asarray(volume[context_indices(z, volume.shape[0], k)], dtype=np.float32)
    return block.reshape(-1, *block.shape[-2:]) if block.ndim == 4 else block


def build_augmentation(augment_cfgs, seed: int):
    """albumentations.Compose of the configured transforms (by name), or None when there are none."""
    if not augment_cfgs:
        return None
    import albumentations as A

    from medseg.config import build_transform

    return A.Compose([build_transform(a.name, a.params()) for a in augment_cfgs], seed=seed)


class SliceDataset(Dataset):
    """(image (C, S, S) float32, mask (S, S) int64 class indices) per cached slice of the given cases; C is
    (2k+1) times the cache's channels. ``transform`` sees a grey block as one (S, S, 2k+1) image, a colour one as
    2k+1 (S, S, 3) images (albumentations' ``images``: the same draw for each), so colour transforms apply."""

    def __init__(self, cache, case_ids: Sequence[str], *, labels: Sequence[int], context_slices: int = 0,
                 transform=None):
        self.cache = cache
        self.case_ids = list(case_ids)
        self.context = context_slices
        self.lut = label_lut(labels)
        self.transform = transform
        self.index = [(cid, z) for cid in self.case_ids for z in range(cache.n_slices(cid))]

    def __len__(self) -> int:
        return len(self.index)

    def has_foreground(self) -> np.ndarray:
        """bool per item: does the slice contain any of the learned labels."""
        flags = []
        for cid in self.case_ids:
            label = self.cache.label(cid)
            wanted = self.lut[np.asarray(label)] > 0  # small: the cache is at training resolution
            flags.extend(wanted.reshape(label.shape[0], -1).any(axis=1).tolist())
        return np.asarray(flags, dtype=bool)

    def __getitem__(self, i: int):
        cid, z = self.index[i]
        volume = self.cache.image(cid)
        mask = self.lut[np.asarray(self.cache.label(cid)[z])]  # (S, S)
        if volume.ndim == 4 and self.transform is not None:  # colour: (2k+1, S, S, 3) images, one draw
            block = np.asarray(volume[context_indices(z, volume.shape[0], self.context)], dtype=np.float32)
            out = self.transform(images=np.ascontiguousarray(block.transpose(0, 2, 3, 1)), mask=mask)
            image, mask = out["images"].transpose(0, 3, 1, 2), out["mask"]
            image = image.reshape(-1, *image.shape[-2:])
        else:
            image = stack_context(volume, z, self.context)  # (C, S, S)
            if self.transform is not None:
                out = self.transform(image=np.ascontiguousarray(image.transpose(1, 2, 0)), mask=mask)
                image, mask = out["image"].transpose(2, 0, 1), out["mask"]
        image_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        return image_t, torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))


class EpochSampler(Sampler[int]):
    """Indices for one epoch: ``n`` draws, a ``fg_fraction`` share of them from foreground slices.

    Deterministic given (seed, epoch); call ``set_epoch`` before each epoch. With fg_fraction 0 and
    n = len(dataset) this is a seeded permutation of every slice.
    """

    def __init__(self, has_fg: np.ndarray, *, n: int | None, fg_fraction: float, seed: int):
        self.has_fg = np.asarray(has_fg, bool)
        if not len(self.has_fg):
            raise ValueError("EpochSampler over an empty dataset: no slice to draw")
        self.n = int(n or len(self.has_fg))
        self.fg_fraction = fg_fraction
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        total = len(self.has_fg)
        fg_idx = np.flatnonzero(self.has_fg)
        n_fg = int(round(self.fg_fraction * self.n)) if len(fg_idx) else 0
        n_rest = self.n - n_fg
        if n_rest <= total:
            rest = rng.permutation(total)[:n_rest]
        else:
            rest = np.concatenate([rng.permutation(total) for _ in range(-(-n_rest // total))])[:n_rest]
        picked = np.concatenate([rng.choice(fg_idx, size=n_fg, replace=n_fg > len(fg_idx)), rest]) if n_fg else rest
        return iter(rng.permutation(picked).tolist())


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy / random / albumentations seeds derived from torch's per-worker seed,
    which the loader's seeded generator makes different per epoch and per worker, yet reproducible."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if transform is not None:
        transform.set_random_seed(seed)
