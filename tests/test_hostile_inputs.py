"""Hostile archives and headers (issue 14): each hostile input of ``tests.fixtures.HOSTILE`` is refused with one line
naming its file (and case), nothing is written beside the dataset, and reading a bomb stays far below its claim."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.config import DatasetConfig, SplitConfig
from medseg.data import check
from tests.fixtures import DECLARED_BYTES, HOSTILE, make_kaggle_task, snapshot, tiny_case, write_nifti

REPO = Path(__file__).resolve().parents[1]
PEAK_RSS_LIMIT_MB = 300  # the bombs declare 200 MB (bzip2, gzip, PNG) to 4 GB and more; the readers' imports ~100 MB
CASE_002 = r"\(case 002\): "

# input -> (error type, the message's pattern: file, case, what is wrong)
EXPECTED = {
    "zip_parent_member_name": ("DataError", r"/CT\.zip: member '\.\./002\.nii' is not at the zip root$"),
    "zip_absolute_member_name": ("DataError", r"/CT\.zip: member '/002\.nii' is not at the zip root$"),
    "zip_member_declares_4gb": ("CorruptFileError", rf"/CT\.zip:002\.nii {CASE_002}zip member declares "
                                                    rf"{DECLARED_BYTES} bytes from \d+ compressed .*zip bomb"),
    "zip_bzip2_bomb": ("CorruptFileError", rf"/CT\.zip:002\.nii {CASE_002}zip member declares 209716512 bytes "
                                           r"from \d+ compressed \(ratio above 1000"),
    "zip_bzip2_bomb_declaring_small": ("CorruptFileError", rf"/CT\.zip:002\.nii {CASE_002}corrupt zip member "
                                                           r"\(inflates past the 1312 bytes it declares\)$"),
    "zip_member_longer_than_header": ("CorruptFileError", rf"/CT\.zip:002\.nii {CASE_002}zip member declares \d+ "
                                                          r"bytes, its NIfTI header \(shape \(10, 12, 4\)\) 1312 "),
    "zip_gzip_bomb_member": ("CorruptFileError", rf"/CT\.zip:002\.nii\.gz {CASE_002}\.nii\.gz inflates past the "
                                                 r"\d+ bytes its header declares"),
    "zip_encrypted_member": ("CorruptFileError", r"/CT\.zip:001\.nii \(case 001\): encrypted zip member"),
    "nifti_header_declares_huge_volume": ("CorruptFileError", rf"/CT/002\.nii {CASE_002}unreadable NIfTI \(its "
                                                              r"header declares shape \(30000, 30000, 30000\)"),
    "nifti_gz_header_declares_huge_volume": ("CorruptFileError", r"/imagesTr/liver_1\.nii\.gz \(case liver_1\): "
                                                                 r"unreadable NIfTI \(its header declares shape "
                                                                 r"\(30000, 30000, 30000\).* inflates to at most"),
    "nifti_gz_header_declares_more_slices": ("CorruptFileError", r"/imagesTr/liver_1\.nii\.gz \(case liver_1\): "
                                                                 r"unreadable NIfTI \(OSError: Expected 1920 bytes"),
    "nifti_non_finite_voxels": ("NonFiniteImageError", rf"/CT/002\.nii {CASE_002}image holds NaN or infinite values$"),
    "nifti_zero_slices": ("CorruptFileError", rf"/CT/002\.nii {CASE_002}NIfTI of shape \(10, 12, 0\) holds no voxel"),
    "png_bomb_header": ("CorruptFileError", r"/images/a\.png: unreadable image \(DecompressionBombError: Image size "
                                            r"\(2500000000 pixels\)"),
    "png_bomb_zeros": ("CorruptFileError", r"/images/a\.png: unreadable image \(DecompressionBombWarning: Image "
                                           r"size \(144000000 pixels\)"),
}
CHILD = ("import json, sys; from pathlib import Path; from tests.fixtures import peak_rss_mb, read_dataset; "
         "print(json.dumps({**read_dataset(Path(sys.argv[1])), 'peak_rss_mb': peak_rss_mb()}))")


def read_in_child(path: Path) -> dict:
    """``read_dataset(path)`` in a fresh interpreter, with its peak resident memory."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=REPO, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_hostile_input_has_an_expectation():
    assert set(EXPECTED) == set(HOSTILE)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_is_refused_on_one_line_in_bounded_memory_writing_nothing(tmp_path, name):
    dataset = HOSTILE[name](tmp_path / "data")
    before = snapshot(tmp_path)
    result = read_in_child(dataset)
    assert snapshot(tmp_path) == before  # nothing extracted, cached or written anywhere near the dataset
    error, pattern = EXPECTED[name]
    assert (result["outcome"], result["error"]) == ("refused", error), result
    assert "\n" not in result["message"] and result["message"].startswith(str(dataset))
    assert re.search(pattern, result["message"]), result["message"]
    assert result["peak_rss_mb"] < PEAK_RSS_LIMIT_MB, result


def test_non_finite_voxels_are_the_audits_non_finite_kind_and_block_the_cache(tmp_path):
    """Training decision: a NaN or infinite voxel would make every cached slice of its case NaN (percentile window)
    and stop training mid-epoch on a NaN loss naming no file; the reader refuses the case instead, so the audit lists
    it under non_finite and the cache build (training's first step) stops on the same one line."""
    raw = tiny_case(0)[0].astype(np.float32)
    raw[2, 3, 1] = np.nan
    cases = {cid: tiny_case(seed) for seed, cid in enumerate(("001", "002", "003", "004"))}
    task = make_kaggle_task(tmp_path / "data", cases, ct="folder")
    write_nifti(task / "CT" / "002.nii", raw, scaled=False)
    cfg = DatasetConfig(format="kaggle", path=str(tmp_path / "data"), labels=[1], image_size=32,
                        cache_dir=str(tmp_path / "cache"), split=SplitConfig(seed=0, val_fraction=0.25))
    report = check.audit(cfg, slices=False)
    assert [(e["kind"], e["case"]) for e in report["errors"]] == [("non_finite", "002")]
    assert report["errors"][0]["message"].endswith("CT/002.nii (case 002): image holds NaN or infinite values")
    assert report["cache"] is None
