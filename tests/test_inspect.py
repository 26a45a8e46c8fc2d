"""``python -m medseg.data inspect``, run as the user runs it, against expected.json and hand-made files."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.data.evalseg_pickle import write_label_pickle
from tests.fixtures import evalseg_dir, expected, write_image, write_nifti

REPO = Path(__file__).resolve().parents[1]
KEYS = ["path", "shape", "voxelsize", "voxels_per_label", "n_segments", "sha256"]


def inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg.data", "inspect", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_json_lines_match_expected_json():
    root, truth = evalseg_dir(), expected()["ground_truth"]
    # The smallest volumes of each task: an empty case, a multi-label case, the two example slices.
    rels = ["TaskA_Example/GroundTruth/370.pkl.gz", "TaskA_Example/GroundTruth/394.pkl.gz",
            min((r for r in truth if r.startswith("Task003")), key=lambda r: np.prod(truth[r]["shape"])),
            min((r for r in truth if not truth[r]["voxels_per_label"]), key=lambda r: np.prod(truth[r]["shape"]))]
    ct = root / "TaskA_Example" / "CT" / "370.nii.gz"
    result = inspect("--json", *(str(root / r) for r in rels), str(ct))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(rels) + 1
    for rel, got in zip(rels, lines):
        want = truth[rel]
        assert list(got) == KEYS and got["path"] == str(root / rel)
        assert got["voxelsize"] == pytest.approx(want["voxelsize"], abs=1e-5)
        assert {k: got[k] for k in ("shape", "voxels_per_label", "n_segments", "sha256")} == \
               {k: want[k] for k in ("shape", "voxels_per_label", "n_segments", "sha256")}
    assert len(lines[2]["voxels_per_label"]) > 1  # Task003: several organs
    ct_line = lines[-1]
    assert ct_line["shape"] == [512, 512, 1] and ct_line["voxelsize"] == pytest.approx([0.675781, 0.675781, 5.0])
    assert ct_line["voxels_per_label"] is None and ct_line["sha256"] is None and ct_line["n_segments"] is None


def test_refused_files_give_one_line_errors_and_the_rest_still_prints(tmp_path):
    volume = np.zeros((6, 5, 4), np.uint8)
    volume[1:3, 1:3, 1:3] = 2
    good = write_label_pickle(tmp_path / "good.pkl", volume, (0.5, 0.5, 2.0))
    label_nii = write_nifti(tmp_path / "label.nii.gz", volume.astype(np.int16), spacing=(0.5, 0.5, 2.0), scaled=False)
    mask = np.zeros((4, 6), np.uint8)
    mask[1:3, 2:4] = 255
    mask_png = write_image(tmp_path / "mask.png", mask)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "marker").encode() + b"'\ntR.")
    unknown = tmp_path / "notes.txt"
    unknown.write_text("hello")

    result = inspect("--json", str(good), str(evil), str(label_nii), str(unknown), str(mask_png))
    assert result.returncode != 0
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2
    assert str(evil) in errors[0] and "os.system" in errors[0]
    assert str(unknown) in errors[1] and "unknown file type" in errors[1]
    assert not (tmp_path / "marker").exists()

    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(good), str(label_nii), str(mask_png)]
    sha = hashlib.sha256(volume.tobytes()).hexdigest()
    assert rows[0]["sha256"] == rows[1]["sha256"] == sha  # same labels, pickle or NIfTI
    assert rows[0]["voxels_per_label"] == rows[1]["voxels_per_label"] == {"2": 8}
    assert rows[0]["n_segments"] == 1 and rows[1]["n_segments"] is None
    assert rows[1]["voxelsize"] == [0.5, 0.5, 2.0]
    assert rows[2] == {"path": str(mask_png), "shape": [4, 6, 1], "voxelsize": [1.0, 1.0, 1.0],
                       "voxels_per_label": {"1": 4}, "n_segments": None,
                       "sha256": hashlib.sha256((mask > 0).astype(np.uint8).tobytes()).hexdigest()}


def test_table_output(tmp_path):
    path = write_label_pickle(tmp_path / "case.pkl.gz", np.ones((3, 4, 5), np.uint8), (1.0, 1.0, 2.5))
    result = inspect(str(path))
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["path", "shape", "voxelsize", "segments", "voxels", "per", "label", "sha256"]
    assert row.split() == [str(path), "3x4x5", "1x1x2.5", "1", "1:60",
                           hashlib.sha256(np.ones((3, 4, 5), np.uint8).tobytes()).hexdigest()[:16]]
    assert header.index("shape") == row.index("3x4x5")  # columns aligned
