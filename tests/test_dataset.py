"""SliceDataset and EpochSampler over a real cache: 2.5D context with edge clamping, label mapping,
augmentations that keep image and mask aligned, and the seeded foreground-oversampling sampler."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medseg.config import config_from_dict
from medseg.data.cache import build_cache
from medseg.data.dataset import (
    EpochSampler,
    SliceDataset,
    build_augmentation,
    label_lut,
    seed_worker,
    stack_context,
)
from tests.fixtures import make_kaggle_task

LABELS = {0: "background", 1: "one", 2: "two", 6: "six"}
SIZE = 32  # in-plane size of the fixture volumes and of the cache: no resize, so image and mask agree exactly


def cache_of(task: Path, cache_dir: Path):
    cfg = config_from_dict({"dataset": {"format": "kaggle", "path": str(task), "cache_dir": str(cache_dir),
                                        "image_size": SIZE}}, resolve=True)
    return build_cache(cfg.dataset, progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Cases "a" (5 slices) and "b" (3 slices). The image is bright (260 HU -> 1.0 in the window) exactly where the
    label is non-zero and air elsewhere, plus a per-slice ramp, so every slice differs and masks can be checked
    against images. Label values 1, 2 and 6 in separate boxes; slice 0 of "a" has no label."""
    rng = np.random.default_rng(0)
    cases = {}
    for cid, depth in (("a", 5), ("b", 3)):
        label = np.zeros((SIZE, SIZE, depth), np.uint8)
        for z in range(1 if cid == "a" else 0, depth):
            x, y = rng.integers(2, 12, size=2)
            label[x : x + 12, y : y + 14, z] = 1
            label[x + 2 : x + 5, y + 2 : y + 5, z] = 2
            label[x + 7 : x + 10, y + 7 : y + 10, z] = 6
        hu = np.where(label > 0, 260, -1024).astype(np.int32)
        hu[0, :, :] = -140 + 20 * np.arange(depth)  # a ramp along z in the first row: no two slices alike
        raw = ((hu + 1024) // 2).astype(np.int16)  # the fixture writer stores raw * 2 - 1024
        cases[cid] = (raw, label)
    root = tmp_path_factory.mktemp("data")
    return cache_of(make_kaggle_task(root, cases, labels=LABELS), root / "cache")


# --------------------------------------------------------------------------------------- 2.5D context


def test_stack_context_clamps_at_the_edges():
    volume = np.arange(5, dtype=np.float16)[:, None, None] * np.ones((1, 2, 2), np.float16)
    assert stack_context(volume, 0, 2)[:, 0, 0].tolist() == [0, 0, 0, 1, 2]
    assert stack_context(volume, 4, 1)[:, 0, 0].tolist() == [3, 4, 4]
    assert stack_context(volume, 2, 0).shape == (1, 2, 2)
    assert stack_context(volume, 2, 2).dtype == np.float32


@pytest.mark.parametrize("k", [0, 1, 2])
def test_context_channels_are_the_neighbouring_cached_slices(cache, k):
    ds = SliceDataset(cache, ["a", "b"], labels=[1], context_slices=k)
    assert len(ds) == 8 and ds.index[5] == ("b", 0)
    for i, (cid, z) in enumerate(ds.index):
        image, mask = ds[i]
        assert image.dtype == torch.float32 and image.shape == (2 * k + 1, SIZE, SIZE)
        assert mask.dtype == torch.int64 and mask.shape == (SIZE, SIZE)
        volume = np.asarray(cache.image(cid), np.float32)
        for c in range(2 * k + 1):
            neighbour = min(max(z - k + c, 0), cache.n_slices(cid) - 1)
            assert np.array_equal(image[c].numpy(), volume[neighbour]), (cid, z, c)
        assert np.array_equal(image[k].numpy(), volume[z])  # the centre channel is the slice itself


# --------------------------------------------------------------------------------------- labels


def test_label_lut():
    binary = label_lut([1])
    assert binary[[0, 1, 2, 6, 255]].tolist() == [0, 1, 0, 0, 0]
    multi = label_lut([2, 6])
    assert multi[[0, 1, 2, 3, 6, 7, 255]].tolist() == [0, 0, 1, 0, 2, 0, 0]
    assert multi.dtype == np.uint8 and multi.shape == (256,)
    with pytest.raises(ValueError, match="listed twice"):
        label_lut([1, 1])  # would leave class 1 without pixels
    with pytest.raises(ValueError, match="0 is the background"):
        label_lut([0, 1])


@pytest.mark.parametrize("labels, mapping", [([1], {1: 1, 2: 0, 6: 0}), ([2, 6], {1: 0, 2: 1, 6: 2}),
                                             ([6, 1, 2], {1: 2, 2: 3, 6: 1})])
def test_masks_are_mapped_to_class_indices(cache, labels, mapping):
    ds = SliceDataset(cache, ["a"], labels=labels)
    for z in range(5):
        raw = np.asarray(cache.label("a")[z])
        _, mask = ds[z]
        want = np.zeros_like(raw, np.int64)
        for value, cls in mapping.items():
            want[raw == value] = cls
        assert np.array_equal(mask.numpy(), want)


def test_has_foreground_counts_only_learned_labels(cache):
    assert SliceDataset(cache, ["a", "b"], labels=[1]).has_foreground().tolist() == [False] + [True] * 7
    # every labelled slice holds 2 and 6 as well; a label that is absent leaves nothing to oversample
    assert not SliceDataset(cache, ["a", "b"], labels=[3]).has_foreground().any()


# --------------------------------------------------------------------------------------- augmentation


def augment(*specs):
    return build_augmentation(config_from_dict({"augment": list(specs)}).augment, seed=0)


def test_no_augmentation_configured_is_none():
    assert build_augmentation([], seed=0) is None


def test_horizontal_flip_flips_image_and_mask(cache):
    plain = SliceDataset(cache, ["a", "b"], labels=[1, 2, 6], context_slices=1)
    flipped = SliceDataset(cache, ["a", "b"], labels=[1, 2, 6], context_slices=1,
                           transform=augment({"name": "HorizontalFlip", "p": 1.0}))
    for i in range(len(plain)):
        (image, mask), (f_image, f_mask) = plain[i], flipped[i]
        assert torch.equal(f_image, image.flip(-1)) and torch.equal(f_mask, mask.flip(-1))
        assert not torch.equal(f_mask, mask) or not mask.any()


def test_spatial_augmentations_keep_image_and_mask_aligned(cache):
    transform = augment({"name": "Affine", "rotate": [-40, 40], "scale": [0.8, 1.2], "translate_percent": [-0.1, 0.1],
                         "p": 1.0},
                        {"name": "ElasticTransform", "alpha": 20, "sigma": 5, "p": 1.0},
                        {"name": "VerticalFlip", "p": 0.5})
    plain = SliceDataset(cache, ["a", "b"], labels=[1, 2, 6])
    ds = SliceDataset(cache, ["a", "b"], labels=[1, 2, 6], transform=transform)
    changed = 0
    for repeat in range(3):
        for i in range(1, len(ds)):
            image, mask = ds[i]
            assert image.shape == (1, SIZE, SIZE) and image.dtype == torch.float32 and mask.dtype == torch.int64
            assert set(mask.unique().tolist()) <= {0, 1, 2, 3}  # nearest-neighbour on masks: no new values
            bright, labelled = image[0, 1:] > 0.5, mask[1:] > 0  # row 0 holds the ramp, not the label
            assert (bright == labelled).float().mean() > 0.97, (repeat, i)
            changed += not torch.equal(mask, plain[i][1])
    assert changed >= 3 * (len(ds) - 1) - 2  # the transforms really moved things


def test_intensity_augmentations_from_config_names_run(cache):
    transform = augment({"name": "RandomBrightnessContrast", "p": 1.0}, {"name": "GaussNoise", "p": 1.0},
                        {"name": "RandomGamma", "p": 1.0})
    ds = SliceDataset(cache, ["a"], labels=[1], context_slices=2, transform=transform)
    plain = SliceDataset(cache, ["a"], labels=[1], context_slices=2)
    image, mask = ds[2]
    assert image.shape == (5, SIZE, SIZE) and torch.equal(mask, plain[2][1])  # the mask is untouched
    assert not torch.equal(image, plain[2][0])


def test_seeded_workers_augment_reproducibly_and_differently(cache):
    """seed_worker seeds each worker's augmentation from torch's per-worker seed: two runs with the same loader
    seed give the same batches; the two workers do not repeat each other's random draws."""
    transform = augment({"name": "GaussNoise", "std_range": [0.1, 0.2], "p": 1.0})
    ds = SliceDataset(cache, ["a"], labels=[1], transform=transform)

    def run() -> list[torch.Tensor]:
        loader = DataLoader(ds, batch_size=1, sampler=[2, 2, 2, 2], num_workers=2, worker_init_fn=seed_worker,
                            generator=torch.Generator().manual_seed(0))
        return [image for image, _ in loader]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])  # the same slice, drawn by worker 0 then by worker 1


# --------------------------------------------------------------------------------------- sampler


def fg_flags(total: int = 100, fg_every: int = 10) -> np.ndarray:
    return np.arange(total) % fg_every == 0  # 10% foreground slices


def draw(sampler: EpochSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_is_deterministic_per_seed_and_epoch():
    a = EpochSampler(fg_flags(), n=64, fg_fraction=0.5, seed=1)
    b = EpochSampler(fg_flags(), n=64, fg_fraction=0.5, seed=1)
    assert draw(a, 3) == draw(b, 3) and draw(a, 0) == draw(b, 0)
    assert draw(a, 3) != draw(a, 4)  # a new epoch, a new draw
    assert draw(a, 3) != draw(EpochSampler(fg_flags(), n=64, fg_fraction=0.5, seed=2), 3)
    assert len(a) == 64 and len(draw(a, 5)) == 64


def test_sampler_honours_the_foreground_fraction():
    has_fg = fg_flags()
    for fraction in (0.0, 0.3, 0.5, 1.0):
        sampler = EpochSampler(has_fg, n=1000, fg_fraction=fraction, seed=0)
        picked = draw(sampler, 1)
        # fraction * n draws from foreground slices; the rest from whole passes over every slice (10% foreground)
        n_fg = round(fraction * 1000)
        assert sum(has_fg[picked]) == n_fg + (1000 - n_fg) // 10
    assert all(has_fg[draw(EpochSampler(has_fg, n=50, fg_fraction=1.0, seed=0), 0)])


def test_sampler_without_n_is_a_permutation_and_n_may_exceed_the_dataset():
    has_fg = fg_flags()
    assert sorted(draw(EpochSampler(has_fg, n=None, fg_fraction=0.0, seed=0), 2)) == list(range(100))
    big = draw(EpochSampler(has_fg, n=1000, fg_fraction=0.0, seed=0), 0)
    assert len(big) == 1000 and set(Counter(big).values()) == {10}  # every slice ten times
    over = draw(EpochSampler(has_fg, n=250, fg_fraction=0.5, seed=0), 0)
    assert len(over) == 250 and all(0 <= i < 100 for i in over)
    # no foreground at all: nothing to oversample, still n draws
    assert len(draw(EpochSampler(np.zeros(20, bool), n=30, fg_fraction=0.5, seed=0), 0)) == 30
    with pytest.raises(ValueError, match="empty dataset"):
        EpochSampler(np.zeros(0, bool), n=8, fg_fraction=0.5, seed=0)


def test_sampler_feeds_a_dataloader(cache):
    ds = SliceDataset(cache, ["a", "b"], labels=[1])
    sampler = EpochSampler(ds.has_foreground(), n=20, fg_fraction=0.5, seed=0)
    loader = DataLoader(ds, batch_size=4, sampler=sampler)
    batches = list(loader)
    assert len(batches) == 5 and batches[0][0].shape == (4, 1, SIZE, SIZE) and batches[0][1].shape == (4, SIZE, SIZE)
