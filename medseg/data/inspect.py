"""``python -m medseg.data inspect PATH... [--json]``: what a label file holds, in expected.json's convention.

For each GroundTruth / prediction pickle (.pkl, .pkl.gz), NIfTI (.nii, .nii.gz) or 2D mask image: shape,
voxel size, voxels per non-zero label, number of segments (pickles only) and the sha256 of the dense
uint8 volume's C-order bytes. A NIfTI whose values are not integer labels (a CT) gets null counts and hash.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from medseg.data.evalseg_pickle import read_label_pickle
from medseg.data.sources.common import NIFTI_SUFFIXES, is_label_array, label_counts, load_nifti, one_line
from medseg.data.sources.folders2d import IMAGE_SUFFIXES, read_mask
from medseg.data.sources.kaggle_evalseg import PICKLE_SUFFIXES
from medseg.errors import DataError
from medseg.io_utils import format_table

KEYS = ("path", "shape", "voxelsize", "voxels_per_label", "n_segments", "sha256")


def _summary(path: str, volume: np.ndarray | None, shape, voxelsize, n_segments: int | None) -> dict:
    return {
        "path": path,
        "shape": [int(s) for s in shape],
        # 7 significant digits: float32 header zooms print as 0.675781, not 0.6757810115814209.
        "voxelsize": [float(f"{float(v):.7g}") for v in voxelsize],
        "voxels_per_label": None if volume is None else {str(k): n for k, n in label_counts(volume).items()},
        "n_segments": n_segments,
        "sha256": None if volume is None else hashlib.sha256(np.ascontiguousarray(volume)).hexdigest(),
    }


def inspect_file(path: str) -> dict:
    """One record with exactly ``KEYS``; DataError (naming the file) for a refused or unreadable file."""
    file = Path(path)
    name = file.name.lower()
    if not file.is_file():
        raise DataError(f"{path}: not a file")
    if name.endswith(PICKLE_SUFFIXES):
        lv = read_label_pickle(file)
        return _summary(path, lv.volume, lv.volume.shape, lv.voxelsize, lv.n_segments)
    if name.endswith(NIFTI_SUFFIXES):
        nii = load_nifti(file, source=path)
        volume = nii.array.astype(np.uint8) if is_label_array(nii.array) else None
        zooms = (tuple(nii.zooms) + (1.0, 1.0, 1.0))[:3]
        return _summary(path, volume, nii.array.shape, zooms, None)
    if name.endswith(IMAGE_SUFFIXES):
        mask = read_mask(file)
        return _summary(path, mask, mask.shape, (1.0, 1.0, 1.0), None)
    raise DataError(f"{path}: unknown file type (expected .pkl, .pkl.gz, .nii, .nii.gz or "
                    f"{', '.join(IMAGE_SUFFIXES)})")


def _table(rows: list[dict]) -> str:
    """Aligned text table; the hash is shortened to 16 hex digits (use --json for all of it)."""
    def fmt(row: dict) -> list:
        labels = row["voxels_per_label"]
        return [
            row["path"],
            "x".join(map(str, row["shape"])),
            "x".join(f"{v:g}" for v in row["voxelsize"]),
            "-" if row["n_segments"] is None else row["n_segments"],
            "-" if labels is None else (" ".join(f"{k}:{n}" for k, n in labels.items()) or "(empty)"),
            "-" if row["sha256"] is None else row["sha256"][:16],
        ]

    return format_table(["path", "shape", "voxelsize", "segments", "voxels per label", "sha256"], map(fmt, rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medseg.data inspect",
        description="Shape, voxel size, voxels per label, segments and sha256 of label files.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="pickle, NIfTI or mask image files")
    parser.add_argument("--json", action="store_true", help="one JSON object per line (keys: " + ", ".join(KEYS) + ")")
    args = parser.parse_args(argv)
    rows, failed = [], 0
    for path in args.paths:
        try:
            row = inspect_file(path)
        except DataError as err:  # UnsafePickleError included: nothing in the file was executed
            message = one_line(err)
            print(f"error: {message if path in message else f'{path}: {message}'}", file=sys.stderr, flush=True)
            failed += 1
            continue
        if args.json:
            print(json.dumps(row), flush=True)  # streamed: a long list shows progress
        else:
            rows.append(row)
    if rows:
        print(_table(rows))
    return 1 if failed else 0
