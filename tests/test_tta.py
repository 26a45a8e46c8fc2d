"""Test-time mirroring limited to the mirrors the training augmentation flipped (medseg/tta.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

from medseg.checkpoint import load_checkpoint
from medseg.config import load_config
from medseg.evaluation import evaluate_checkpoint
from medseg.inference import Predictor
from medseg.tracking import get_client, tracking_uri, train_tracked
from medseg.training import fit, prepare_data
from medseg.tta import mirrors_from_augment

ROOT = Path(__file__).resolve().parents[1]
BOTH = [[2], [3], [2, 3]]


@pytest.mark.parametrize("config, expected", [
    ("exp_000_baseline.yaml", []),  # a crop only: never flipped
    ("exp_001_aug_sched.yaml", BOTH),  # HorizontalFlip + VerticalFlip + RandomRotate90
    ("kaggle_task001_liver_tumor.yaml", [[3]]),  # HorizontalFlip (+ Affine within 15 degrees, intensities)
    ("kaggle_task003_multiorgan.yaml", []),  # Affine + intensities
])
def test_tta_axes_of_the_shipped_configs(config, expected):
    assert mirrors_from_augment(load_config(ROOT / "configs" / config).augment) == expected


@pytest.mark.parametrize("names, expected", [
    (["HorizontalFlip"], [[3]]),
    (["VerticalFlip"], [[2]]),
    (["RandomRotate90"], [[2, 3]]),  # quarter turns: the half turn flips both axes, never one alone
    (["Transpose"], []),  # a mirror about the diagonal, along no axis
    (["D4"], BOTH),
    (["SquareSymmetry"], BOTH),
    (["HorizontalFlip", "RandomRotate90"], BOTH),  # h then a half turn = v
    (["HorizontalFlip", "Transpose"], [[3]]),
])
def test_tta_axes_of_single_transforms_and_pipelines(names, expected):
    assert mirrors_from_augment([{"name": n} for n in names]) == expected
    assert mirrors_from_augment([{"name": "HorizontalFlip", "p": 0.0}]) == []


def test_mirror_dims_follow_albumentations_axes():
    """What the dataset does: an (H, W, C) image through albumentations, back to (C, H, W) for the batch."""
    image = np.random.default_rng(0).random((5, 7, 3)).astype(np.float32)
    batch = torch.from_numpy(image.transpose(2, 0, 1))[None]

    def as_batch(out):
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))[None]

    assert torch.equal(as_batch(A.HorizontalFlip(p=1)(image=image)["image"]), torch.flip(batch, (3,)))
    assert torch.equal(as_batch(A.VerticalFlip(p=1)(image=image)["image"]), torch.flip(batch, (2,)))
    assert torch.equal(as_batch(A.RandomRotate90(p=1).apply(image, factor=2)), torch.flip(batch, (2, 3)))


def test_no_flip_checkpoint_with_tta_scores_exactly_as_without(tiny_cfg, tmp_path, caplog):
    cfg = tiny_cfg(training={"epochs": 1, "val_overlays": 0})  # no augmentation at all
    result = fit(cfg, run_dir=tmp_path / "run", progress=False)
    assert load_checkpoint(result.best_checkpoint)["meta"]["tta_axes"] == []
    data = prepare_data(cfg, progress=False)
    plain = evaluate_checkpoint(result.best_checkpoint, cfg, data=data, progress=False)
    with caplog.at_level(logging.WARNING, logger="medseg.inference"):
        tta = evaluate_checkpoint(result.best_checkpoint, cfg, data=data, flip_tta=True, progress=False)
    assert tta.rows == plain.rows and tta.info["tta_axes"] == []
    warnings = [r.getMessage() for r in caplog.records if r.name == "medseg.inference"]
    assert len(warnings) == 1 and "trained without flips" in warnings[0] and "without TTA" in warnings[0]


def test_flip_checkpoint_tta_averages_its_mirrors(tiny_cfg):
    cfg = tiny_cfg(training={"epochs": 1, "val_overlays": 0}, augment=[{"name": "HorizontalFlip", "p": 0.5}])
    result, run_id = train_tracked(cfg, progress=False)
    assert load_checkpoint(result.best_checkpoint)["meta"]["tta_axes"] == [[3]]
    assert get_client(tracking_uri(cfg)).get_run(run_id).data.tags["tta_axes"] == "[[3]]"
    data = prepare_data(cfg, progress=False)
    image = data.source.load(data.split.val[0]).image
    plain = Predictor(result.best_checkpoint, device="cpu")
    tta = Predictor(result.best_checkpoint, device="cpu", flip_tta=True)
    assert tta.tta_axes == [[3]]
    p0 = np.stack([p for _, p in plain.probabilities(image)])
    p1 = np.stack([p for _, p in tta.probabilities(image)])
    assert not np.allclose(p0, p1, atol=1e-4)  # TTA changes the prediction
    # ... and is the mean of the plain and the width-mirrored prediction (mirrored back)
    x = torch.from_numpy(plain.preprocess(image))[:, None]
    with torch.no_grad():
        mirrored = torch.sigmoid(plain.model(torch.flip(x, (3,)))).flip((3,)).numpy()
    np.testing.assert_allclose(p1, (p0 + mirrored) / 2, atol=1e-5)
