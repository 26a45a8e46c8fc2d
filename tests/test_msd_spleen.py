"""Real CT through the MSD reader: ../shared/data/msd-spleen-crop (MSD Task09 spleen_2 cropped to 164x166x26, with
its manual spleen mask). Hounsfield units, voxel size and shape as in the file's header, and eval.py scoring the
true mask, given as a prediction, at Dice 1. Skipped when ../shared is absent."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.data.sources import MSDSource, open_source

ROOT = Path(__file__).resolve().parents[1]
SPLEEN_DIR = ROOT.parent / "shared" / "data" / "msd-spleen-crop"
CASE = "spleen_2"


@pytest.fixture(scope="module")
def spleen_dir() -> Path:
    if not SPLEEN_DIR.is_dir():
        pytest.skip(f"MSD spleen crop not found at {SPLEEN_DIR} (check out ../shared beside the repo)")
    return SPLEEN_DIR


def test_real_ct_is_read_in_hounsfield_units_with_its_voxel_size(spleen_dir):
    source = open_source("auto", spleen_dir)
    assert isinstance(source, MSDSource) and source.case_ids() == [CASE]
    assert source.modality == "CT" and source.labels == {0: "background", 1: "spleen"}
    case = source.load(CASE)
    assert case.image.shape == case.label.shape == (164, 166, 26)
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert case.spacing == pytest.approx((0.795, 0.795, 5.0), abs=1e-3)
    assert case.affine is not None and np.allclose(np.abs(np.diag(case.affine))[:3], case.spacing, atol=1e-4)
    # Hounsfield units: air outside the body near -1000, nothing denser than cortical bone / contrast (~3000)
    assert -1100 <= case.image.min() <= -900 and 300 <= case.image.max() <= 3100
    assert set(np.unique(case.label)) == {0, 1}
    spleen = case.image[case.label == 1]
    assert spleen.size == 96672  # voxels of the manual mask (~0.3 l at 0.795 x 0.795 x 5 mm)
    assert 30 <= np.median(spleen) <= 200  # soft tissue (unenhanced ~45 HU, portal venous phase ~120 HU)
    assert np.percentile(case.image[case.label == 0], 1) < -500  # air and lung outside the spleen


def test_eval_scores_the_true_mask_as_a_prediction_at_dice_1(spleen_dir, tmp_path, monkeypatch, capsys):
    import runpy

    config = tmp_path / "spleen.yaml"
    dataset = {"format": "msd", "path": str(spleen_dir), "labels": [1], "cache_dir": str(tmp_path / "cache")}
    config.write_text(yaml.safe_dump({"name": "spleen", "dataset": dataset,
                                      "output": {"run_dir": str(tmp_path / "runs")}}))
    predictions = tmp_path / "preds"
    predictions.mkdir()
    shutil.copy(spleen_dir / "labelsTr" / f"{CASE}.nii.gz", predictions / f"{CASE}.nii.gz")  # <case id>.nii.gz
    # eval.py's own main() in this process (a subprocess spends most of its time importing torch again)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["eval.py", "--config", str(config), "--predictions", str(predictions),
                                      "--out", str(tmp_path / "out")])
    assert runpy.run_path(str(ROOT / "eval.py"))["main"]() == 0
    assert '"dice": 1.0' in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["summary"]["n_cases"] == 1 and summary["summary"]["dice"] == pytest.approx(1.0)
    assert summary["missing"] == []
    per_case = (tmp_path / "out" / "per_case.csv").read_text().splitlines()
    assert per_case[0].startswith("case_id,dice") and per_case[1].startswith(f"{CASE},1.0,")
