"""Real 2D data: CVC-ClinicDB (609 colonoscopy frames, JPEG masks, 29 video sequences) in ../shared, read through
configs/cvc_clinicdb.yaml: the JPEG masks, the frame -> sequence groups file, and the audit of the whole dataset.
Skipped when ../shared is absent."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from medseg.config import load_config
from medseg.data.sources import open_source_from_config
from medseg.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cvc_clinicdb.yaml"
GROUPS = ROOT / "configs" / "cvc_clinicdb_sequences.csv"
CVC_DIR = ROOT.parent / "shared" / "data" / "cvc-clinicdb"


@pytest.fixture(scope="module")
def cvc_dir() -> Path:
    if not CVC_DIR.is_dir():
        pytest.skip(f"CVC-ClinicDB not found at {CVC_DIR} (check out ../shared beside the repo)")
    return CVC_DIR


def dataset_cfg(cache_dir: Path, **overrides):
    """configs/cvc_clinicdb.yaml as run from the repository root, with its cache in ``cache_dir``."""
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)  # dataset.path is relative to the repository root
    try:
        cfg = load_config(CONFIG, [f"dataset.cache_dir={cache_dir}", *(f"{k}={v}" for k, v in overrides.items())])
    finally:
        os.chdir(cwd)
    return cfg.dataset


def readme_sequences(readme: Path) -> dict[int, int]:
    """frame number -> sequence from the table of ORIGINAL_README.txt ('|  1 to  25  |  1  |')."""
    table = re.findall(r"\|\s*(\d+)\s+to\s+(\d+)\s*\|\s*(\d+)\s*\|", readme.read_text(encoding="latin-1"))
    return {frame: int(seq) for lo, hi, seq in table for frame in range(int(lo), int(hi) + 1)}


def test_groups_file_is_the_readme_table_for_every_frame_the_reader_lists(cvc_dir, tmp_path):
    source = open_source_from_config(dataset_cfg(tmp_path / "cache"))
    with GROUPS.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["case_id", "group"]
    groups = dict(rows[1:])
    assert len(groups) == len(rows) - 1 == 609  # one line per frame, none twice
    assert sorted(groups) == sorted(source.case_ids())  # the ids exactly as the reader names them ("1", not "001")
    table = readme_sequences(cvc_dir / "ORIGINAL_README.txt")
    assert sorted(set(table.values())) == list(range(1, 30))
    assert groups == {cid: f"seq{table[int(cid)]:02d}" for cid in source.case_ids()}


def test_jpeg_masks_load_with_the_configs_threshold_and_fail_with_a_hint_without(cvc_dir, tmp_path):
    cfg = dataset_cfg(tmp_path / "cache")
    case = open_source_from_config(cfg).load("1")
    assert case.image.shape == case.label.shape == (256, 256, 1) and case.image.dtype == np.float32
    assert set(np.unique(case.label)) == {0, 1} and 0.01 < case.label.mean() < 0.5
    assert 0 <= case.image.min() and case.image.max() <= 255  # RGB frames reduced to luma (grey input for now)
    plain = open_source_from_config(cfg.model_copy(update={"mask_threshold": None}))
    with pytest.raises(DataError) as err:
        plain.load("1")
    message = str(err.value)
    assert message.startswith(f"{cvc_dir / 'masks' / '1.jpg'} (case 1): label values [")
    assert message.endswith("set dataset.mask_threshold: 128") and "\n" not in message


def test_check_passes_on_all_609_frames_with_no_sequence_on_two_sides(cvc_dir, tmp_path):
    """The audit as `python -m medseg.data check --config configs/cvc_clinicdb.yaml` runs it (~30 s: 609 JPEGs)."""
    from medseg.data import check

    report = check.audit(dataset_cfg(tmp_path / "cache"), slices=False)
    assert report["summary"]["exit_code"] == 0, check.format_report(report)
    assert report["summary"]["cases"] == report["summary"]["loaded"] == 609
    assert report["errors"] == [] and report["warnings"] == []
    assert report["split"]["n_groups"] == 29 and report["split"]["groups_file"] == str(GROUPS)
    with GROUPS.open(newline="") as f:
        groups = {row["case_id"]: row["group"] for row in csv.DictReader(f)}
    sides: dict[str, set[str]] = {}
    for row in report["cases"]:
        sides.setdefault(groups[row["case_id"]], set()).add(row["split"])
    assert all(len(s) == 1 for s in sides.values()), {g: s for g, s in sides.items() if len(s) > 1}
    counts = {side: report["splits"][side]["n_cases"] for side in ("train", "val", "test")}
    assert sum(counts.values()) == 609 and all(counts.values())
