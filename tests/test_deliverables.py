"""The committed deliverables: a small champion checkpoint that reproduces its committed Dice from a fresh clone, and
every image a committed Markdown file shows."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAMPION = ROOT / "docs" / "champion"
# Floating-point kernels differ between CPU models (oneDNN picks other code paths on AVX-512 than on AVX2), and the
# twin's HU values can differ in the last rounding of a few voxels: a fixed checkpoint's mean per-case Dice on the
# same 10 cases has stayed within 0.01 across the machines tried. Identical on the machine that exported it.
DICE_TOLERANCE = 0.01


def _markdown_files() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / p for p in tracked] or sorted(ROOT.glob("*.md")) + sorted((ROOT / "docs").rglob("*.md"))


def test_every_image_a_committed_markdown_file_shows_is_in_the_repository():
    missing = []
    for md in _markdown_files():
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", md.read_text()):
            if "://" not in target and not (md.parent / target).is_file():
                missing.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def test_committed_champion_is_small_and_describes_itself():
    from medseg.checkpoint import load_checkpoint

    ckpt = CHAMPION / "checkpoint.pt"
    assert ckpt.stat().st_size <= 15 * 2**20
    meta = load_checkpoint(ckpt)["meta"]  # digest verified
    metrics = json.loads((CHAMPION / "metrics.json").read_text())
    assert meta["split_hash"] == metrics["split_hash"]
    assert metrics["weights_dtype"] == meta["weights_dtype"] == "float16"
    assert 4 <= len(metrics["overlays"]) <= 6
    assert all((CHAMPION / "overlays" / n).is_file() for n in metrics["overlays"])
    assert (CHAMPION / "MODEL_CARD.md").is_file() and (CHAMPION / "config.yaml").is_file()


def test_make_data_then_eval_reproduces_the_committed_dice(tmp_path):
    """What a reviewer runs in a fresh clone: `make data`, then eval.py on the committed checkpoint and config."""
    from medseg.data.synthetic import generate_task

    metrics = json.loads((CHAMPION / "metrics.json").read_text())
    # `make data`: the defaults of python -m medseg.data.synthetic
    generate_task(tmp_path / "data" / "synthetic", seed=0)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    # the checkpoint's stored config names the data relative to the repository root, like config.yaml beside it
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--ckpt", str(CHAMPION / "checkpoint.pt"),
                           "--out", str(tmp_path / "eval"), "--no-mlflow"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["split_hash"] == metrics["split_hash"]  # the same 10 validation cases
    assert summary["summary"]["n_cases"] == metrics["val"]["n_cases"]
    assert summary["summary"]["dice"] == pytest.approx(metrics["val"]["dice"], abs=DICE_TOLERANCE)
    assert summary["summary"]["iou"] == pytest.approx(metrics["val"]["iou"], abs=DICE_TOLERANCE)
