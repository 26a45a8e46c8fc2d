"""``python -m medseg.data check --config CONFIG [--set key=value ...] [--json OUT.json] [--no-slices] [--verbose]
[--estimate]``: data audit.

For the dataset a config points at, prints a per-case table, a per-split table, the hard errors and the
warnings, and ends with one ``summary: {...}`` JSON line; ``--json`` writes the whole report (``SCHEMA``).
The text scales to large datasets: more than ``MAX_CASE_ROWS`` cases are summed up in a line (the failed ones
still listed), and more than ``FEW`` errors or warnings of one kind are one line with their count, first files
and first message; ``--verbose`` lists everything, as the JSON always does.

Hard errors (exit code 1, ``medseg.cli.EXIT_DATA_ERRORS``; the audit still goes over every other case and lists them
all). A case that fails to load is listed under the ``kind`` of the DataError subclass its reader raised
(``medseg.errors``: UnknownLabelError, BadLabelError, ShapeMismatchError, CorruptFileError, UnsafePickleError;
load_error for any other DataError):
  unpaired       GroundTruth without image, image without GroundTruth (warnings with dataset.allow_missing;
                 MissingPairError)
  unknown_label  label values not listed in the task's metadata (with a dataset.mask_threshold hint when a 2D mask
                 looks like a JPEG-compressed binary one); bad_label: fractional or out-of-range values, a colour
                 mask, a label mask under dataset.mask_threshold
  shape_mismatch image and label shapes disagree
  corrupt_file   unreadable NIfTI, corrupt zip member; unsafe_pickle: a pickle outside the evalseg allow-list
  load_error     any other DataError raised while loading a case
  spacing_mismatch  NIfTI header spacing vs GroundTruth pickle voxel size, relative tolerance ``SPACING_RTOL``
  non_finite     NaN or infinite intensities (NonFiniteImageError from the reader; kept as a fallback here)
  leakage        a patient group (group_regex or groups_file) on two sides of the split (LeakageError when a saved
                 split holds one); split: the split cannot be made or read (a groups file missing a case or naming
                 an unknown one)
Warnings (exit code 0):
  empty_case     no foreground voxel
  non_hu         a CT case whose minimum is above -200 (not Hounsfield units: percentile-normalised by the cache)
  identical_slices  the same cached slice on two sides of the split (``--no-slices`` skips the hashing)
  split_mismatch a split's mean foreground fraction or mean intensity differs from train's by a standardised mean
                 difference (Cohen's d over per-case values, pooled SD) above ``SMD_THRESHOLD``
  split_coverage val/test has no lesion-free case (or no lesion case) while train has some
  unassigned     a case on no side of a split handed to ``audit``

Know before you wait: before the cache is built, one line on stderr gives its size on disk and build time
(``cache_estimate`` in the report): slice counts from the file headers (nothing decoded), bytes as the cache writes
them, time from the per-slice cost of the build's first case spread over the build's processes
(``medseg.data.cache.build_processes``); for a cache that exists, its real size and build time. ``--estimate`` prints
that line and stops (the first case made in a temporary folder that is removed; nothing built, nothing audited).

Each case is decoded once, one at a time: when no case is missing its pair, the audit rides on the cache build
(the cache's own pass over the cases, through its ``load`` hook), so on a first run decoding is not repeated. The
cache and the split are built (or reused) only when every case loads; a case that fails aborts the build, which
leaves nothing behind.
Split-level statistics come from the cache manifest (its per-case intensity and label counts), lesion counts
(26-connected components, as evalseg segments are) from the audit's own pass.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medseg.cli import EXIT_DATA_ERRORS, EXIT_OK, add_config_args
from medseg.errors import DataError, LeakageError, MissingPairError
from medseg.io_utils import format_table, json_safe

SCHEMA = "medseg.data.check/1"
SMD_THRESHOLD = 0.5  # Cohen's d above 0.5 is a "medium" effect: val no longer looks like a sample of train
SPACING_RTOL = 1e-3  # float32 header zooms vs float64 pickle voxel sizes differ by ~1e-7; real disagreements by >1%
SIDES = ("train", "val", "test")
MAX_CASE_ROWS = 40  # a longer case table lists its failed cases only, and sums up the rest (--verbose: every row)
MAX_FAILED_ROWS = 10  # of which at most this many (the errors section counts them all)
FEW = 3  # errors or warnings of one kind printed one by one; more: one line with the count and the first FEW places


# ------------------------------------------------------------------------------------------------- per case


def intensity_stats(image: np.ndarray) -> dict[str, float]:
    """min, max, mean, std of a (X, Y, Z) volume, accumulated slab by slab in float64 (no full-size copy)."""
    lo, hi, total, total_sq, n = math.inf, -math.inf, 0.0, 0.0, 0
    step = max(1, (1 << 22) // max(1, image.shape[0] * image.shape[1]))  # ~4M voxels per slab
    for z in range(0, image.shape[2], step):
        slab = np.asarray(image[:, :, z:z + step], dtype=np.float64)
        lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
        total += float(slab.sum())
        total_sq += float(np.square(slab).sum())
        n += slab.size
    mean = total / n
    return {"min": lo, "max": hi, "mean": mean, "std": math.sqrt(max(total_sq / n - mean * mean, 0.0))}


def count_components(label: np.ndarray) -> int:
    """Number of 26-connected foreground components (lesions) of a (X, Y, Z) label volume.

    Labelled on the foreground's bounding box only: a full-size int32 label map of a 512x512x900 CT is ~1 GB.
    """
    from medseg.metrics import label_components  # numpy and scipy only: no torch on the audit's path

    zs = np.flatnonzero(label.any(axis=(0, 1)))
    if zs.size == 0:
        return 0
    slab = label[:, :, zs[0]:zs[-1] + 1]
    xs, ys = np.flatnonzero(slab.any(axis=(1, 2))), np.flatnonzero(slab.any(axis=(0, 2)))
    return label_components(slab[xs[0]:xs[-1] + 1, ys[0]:ys[-1] + 1] > 0)[1]


def spacing_disagrees(a, b, rtol: float = SPACING_RTOL) -> bool:
    return any(abs(x - y) > rtol * max(abs(x), abs(y)) for x, y in zip(a, b))


def case_record(case) -> dict[str, Any]:
    """The per-case row of the report (everything but ``split``) from a loaded ``Case``."""
    from medseg.data.sources.common import label_counts

    counts = label_counts(case.label)
    fg = sum(counts.values())
    gt_voxelsize = case.meta.get("gt_voxelsize")
    return {
        "case_id": case.case_id,
        "split": None,
        "status": "ok",
        "source": case.source,
        "shape": [int(s) for s in case.image.shape],
        "spacing": [float(s) for s in case.spacing],
        "gt_voxelsize": None if gt_voxelsize is None else [float(v) for v in gt_voxelsize],
        "voxels_per_label": {str(k): v for k, v in counts.items()},
        "fg_voxels": fg,
        "fg_fraction": fg / case.label.size,
        "n_components": count_components(case.label) if fg else 0,
        "intensity": intensity_stats(case.image),
        "error": None,
    }


CASE_KEYS = ("case_id", "split", "status", "source", "shape", "spacing", "gt_voxelsize", "voxels_per_label",
             "fg_voxels", "fg_fraction", "n_components", "intensity", "error")


def empty_row(case_id: str, status: str, error: str | None = None) -> dict[str, Any]:
    """The row of a case that was not loaded (status "pending", "error" or "skipped"): same keys, null values."""
    return {**dict.fromkeys(CASE_KEYS), "case_id": case_id, "status": status, "error": error}


# ------------------------------------------------------------------------------------------------- report


class Report:
    """Accumulates cases, errors and warnings; ``as_dict`` is the JSON document."""

    def __init__(self, dataset_cfg) -> None:
        self.dataset = {"path": str(dataset_cfg.path), "format": dataset_cfg.format, "task": dataset_cfg.task,
                        "cache_dir": str(dataset_cfg.cache_dir), "modality": None, "labels": None, "root": None}
        self.cases: dict[str, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []
        self.warnings: list[dict[str, Any]] = []
        self.splits: dict[str, Any] | None = None
        self.comparisons: dict[str, Any] | None = None
        self.split_info: dict[str, Any] | None = None
        self.cache_info: dict[str, Any] | None = None
        self.cache_estimate: dict[str, Any] | None = None  # medseg.data.cache.CacheEstimate's fields
        self.identical_slices: dict[str, Any] | None = None
        self.thresholds = {"smd": SMD_THRESHOLD, "hu_min": None, "spacing_rtol": SPACING_RTOL}

    def error(self, kind: str, message: str, case: str | None = None, **extra) -> None:
        self.errors.append({"kind": kind, "case": case, "message": " ".join(message.split()), **extra})

    def warn(self, kind: str, message: str, case: str | None = None, **extra) -> None:
        self.warnings.append({"kind": kind, "case": case, "message": " ".join(message.split()), **extra})

    def failed_case(self, case_id: str, kind: str, message: str) -> None:
        self.cases[case_id] = empty_row(case_id, "error", kind)
        self.error(kind, message, case_id)

    def as_dict(self) -> dict[str, Any]:
        def by_kind(items):
            out: dict[str, int] = {}
            for item in items:
                out[item["kind"]] = out.get(item["kind"], 0) + 1
            return out

        exit_code = EXIT_DATA_ERRORS if self.errors else EXIT_OK
        summary = {
            "status": "errors" if self.errors else "warnings" if self.warnings else "ok",
            "exit_code": exit_code,
            "cases": len(self.cases),
            "loaded": sum(c["status"] == "ok" for c in self.cases.values()),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "errors_by_kind": by_kind(self.errors),
            "warnings_by_kind": by_kind(self.warnings),
        }
        return json_safe({
            "schema": SCHEMA,
            "summary": summary,
            "dataset": self.dataset,
            "thresholds": self.thresholds,
            "errors": self.errors,
            "warnings": self.warnings,
            "cases": list(self.cases.values()),
            "split": self.split_info,
            "splits": self.splits,
            "comparisons": self.comparisons,
            "identical_slices": self.identical_slices,
            "cache": self.cache_info,
            "cache_estimate": self.cache_estimate,
        })


# ------------------------------------------------------------------------------------------------- sources


def open_for_audit(dataset_cfg) -> tuple[Any, list[str], list[tuple[str | None, str]]]:
    """(source that skips unpaired cases, paired case ids, unpaired problems as (case id or None, message)).

    Sources that list both sides (Kaggle: ``image_ids`` / ``ground_truth_ids``) give one problem per case;
    others give the strict reader's own message naming the unpaired files.
    """
    from medseg.data.sources import open_source_from_config
    from medseg.data.sources.common import one_line

    source = open_source_from_config(dataset_cfg.model_copy(update={"allow_missing": True}), warn_skipped=False)
    problems: list[tuple[str | None, str]] = []
    if hasattr(source, "image_ids") and hasattr(source, "ground_truth_ids"):
        images, truths = set(source.image_ids()), set(source.ground_truth_ids())
        for cid in sorted(truths - images):
            files = sorted((source.root / "GroundTruth").glob(glob.escape(cid) + ".pkl*"))
            name = files[0].relative_to(source.root) if files else f"GroundTruth/{cid}"
            problems.append((cid, f"{source.root / name}: case {cid}: GroundTruth without image "
                                  f"(no {cid}.nii or {cid}.nii.gz)"))
        for cid in sorted(images - truths):
            problems.append((cid, f"{source.root}: case {cid}: image without GroundTruth "
                                  f"(no GroundTruth/{cid}.pkl or .pkl.gz)"))
    else:
        strict = open_source_from_config(dataset_cfg.model_copy(update={"allow_missing": False}))
        try:
            strict.case_ids()
        except MissingPairError as err:
            problems.append((None, one_line(err)))
    return source, source.case_ids(), problems  # (warn_skipped=False: the report lists the skipped cases itself)


# ------------------------------------------------------------------------------------------------- splits


def group_overlaps(split, groups: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every patient group on more than one side of ``split`` (``check_no_group_overlap`` stops at the first).

    ``groups``: case id -> group (default the split's own; a case missing from it is its own group).
    Returns [{"group", "sides": {side: [case ids]}}], sorted by group.
    """
    groups = split.groups if groups is None else groups
    where: dict[str, dict[str, list[str]]] = {}
    for side in SIDES:
        for cid in split.cases(side):
            where.setdefault(groups.get(cid, cid), {}).setdefault(side, []).append(cid)
    return [{"group": g, "sides": sides} for g, sides in sorted(where.items()) if len(sides) > 1]


def _sd(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if values.size > 1 else 0.0


def standardized_mean_difference(reference: np.ndarray, other: np.ndarray) -> float | None:
    """Cohen's d of ``other`` against ``reference`` (pooled SD, ddof 1); None below 3 values in all (no spread).

    Identical spreads of zero give 0 when the means agree and infinity when they do not.
    """
    n1, n2 = reference.size, other.size
    if n1 == 0 or n2 == 0 or n1 + n2 < 3:
        return None
    diff = float(other.mean() - reference.mean())
    pooled = math.sqrt(((n1 - 1) * _sd(reference) ** 2 + (n2 - 1) * _sd(other) ** 2) / (n1 + n2 - 2))
    if pooled == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / pooled


def split_values(cache, case_ids: list[str]) -> dict[str, np.ndarray]:
    """Per-case values of one side, from the cache manifest: foreground fraction and mean intensity."""
    fg, mean = [], []
    for cid in case_ids:
        entry = cache.cases[cid]
        fg.append(sum(entry["voxels_per_label"].values()) / float(np.prod(entry["orig_shape"])))
        mean.append(entry["intensity"]["mean"])
    return {"fg_fraction": np.asarray(fg, np.float64), "intensity_mean": np.asarray(mean, np.float64)}


def split_stats(cache, case_ids: list[str], components: dict[str, int]) -> dict[str, Any]:
    """One side's row: counts from the manifest, lesion counts from ``components`` (case id -> components)."""
    values = split_values(cache, case_ids)
    entries = [cache.cases[c] for c in case_ids]
    n_slices = sum(int(e["n_slices"]) for e in entries)
    fg_slices = sum(int(np.count_nonzero(e["fg_per_slice"])) for e in entries)
    lesion_cases = sum(bool(e["voxels_per_label"]) for e in entries)

    def mean_sd(v: np.ndarray) -> dict[str, float | None]:
        return {"mean": float(v.mean()) if v.size else None, "sd": _sd(v) if v.size else None}

    return {
        "n_cases": len(case_ids),
        "n_slices": n_slices,
        "n_fg_slices": fg_slices,
        "fg_slice_fraction": fg_slices / n_slices if n_slices else None,
        "fg_fraction": mean_sd(values["fg_fraction"]),
        "n_lesions": sum(components.get(c, 0) for c in case_ids),
        "lesion_cases": lesion_cases,
        "lesion_free_cases": len(case_ids) - lesion_cases,
        "intensity_mean": mean_sd(values["intensity_mean"]),
        "intensity_std": float(np.mean([e["intensity"]["std"] for e in entries])) if entries else None,
    }


def _assign_sides(report: Report, split) -> None:
    """Each case row gets its side; a split case unknown to the dataset is an error, a loaded case on no side a
    warning."""
    for side in SIDES:
        for cid in split.cases(side):
            if cid not in report.cases:
                report.error("split", f"{split.path}: case {cid} ({side}) is not in the dataset", cid)
            else:
                report.cases[cid]["split"] = side
    for cid, rec in report.cases.items():
        if rec["split"] is None and rec["status"] == "ok":
            report.warn("unassigned", f"{split.path}: case {cid} is on no side of the split", cid)


def _audit_leakage(report: Report, split, source, dataset_cfg) -> None:
    """A leakage error for each patient group on two sides, by the split's stored groups and by the groups the current
    group_regex or groups_file gives (a split made elsewhere, or before the groups file was edited, may lack them)."""
    from medseg.data.split import case_groups

    checks = [("split groups", split.groups)]
    try:
        loaded = {cid: source.file_of(cid) for s in SIDES for cid in split.cases(s)
                  if report.cases.get(cid, {}).get("status") == "ok"}
        current = case_groups(loaded, dataset_cfg.split, known=set(report.cases))
        by_file = getattr(dataset_cfg.split, "groups_file", None)
        checks.append(("dataset.split.groups_file" if by_file else "dataset.split.group_regex", current))
    except DataError as err:
        report.error("split", str(err))
    seen = set()
    for origin, groups in checks:
        for leak in group_overlaps(split, groups):
            key = tuple(sorted((s, tuple(c)) for s, c in leak["sides"].items()))
            if key in seen:
                continue
            seen.add(key)
            where = "; ".join(f"{side}: {', '.join(cids)}" for side, cids in leak["sides"].items())
            first = next(iter(leak["sides"].values()))[0]
            report.error(LeakageError.kind, f"{split.path}: leakage: patient group '{leak['group']}' ({origin}) is "
                                            f"on {len(leak['sides'])} sides ({where})", first, group=leak["group"],
                         sides=leak["sides"])


def _compare_sides(report: Report, cache, sides: dict[str, list[str]], smd_threshold: float) -> None:
    """The per-split table, and warnings where val or test differs from train (``smd_threshold``) or lacks the
    lesion-free (or lesion) cases train has."""
    components = {cid: rec["n_components"] or 0 for cid, rec in report.cases.items()}
    report.splits = {side: split_stats(cache, cids, components) for side, cids in sides.items()}
    train = report.splits["train"]
    train_values = split_values(cache, sides["train"])
    report.comparisons = {}
    for side in ("val", "test"):
        stats = report.splits[side]
        if not stats["n_cases"] or not train["n_cases"]:
            continue
        values = split_values(cache, sides[side])
        comp = {f"{name}_smd": standardized_mean_difference(train_values[name], values[name])
                for name in ("fg_fraction", "intensity_mean")}
        report.comparisons[side] = comp
        for name, label in (("fg_fraction", "mean foreground fraction"), ("intensity_mean", "mean intensity")):
            smd = comp[f"{name}_smd"]
            if smd is not None and abs(smd) > smd_threshold:
                report.warn("split_mismatch", f"{side} {label} {stats[name]['mean']:.4g} vs train "
                                              f"{train[name]['mean']:.4g}: standardised mean difference {smd:+.2f} "
                                              f"> {smd_threshold}", split=side, statistic=name, smd=smd)
        for what, key in (("lesion-free", "lesion_free_cases"), ("lesion", "lesion_cases")):
            if train[key] and not stats[key]:
                report.warn("split_coverage", f"{side} has no {what} case while train has {train[key]} "
                                              f"(of {train['n_cases']})", split=side, statistic=key)


def _audit_identical_slices(report: Report, cache, split) -> None:
    from medseg.data.split import find_identical_slices

    found = find_identical_slices(cache, split)
    report.identical_slices = found
    if found["identical_slices_across_splits"]:
        ex = found["examples"][0]
        report.warn("identical_slices",
                    f"{found['identical_slices_across_splits']} cached slice(s) identical across splits, e.g. "
                    f"{ex['a']['split']} case {ex['a']['case']} slice {ex['a']['slice']} = "
                    f"{ex['b']['split']} case {ex['b']['case']} slice {ex['b']['slice']}",
                    count=found["identical_slices_across_splits"])


def _audit_split(report: Report, split, source, dataset_cfg, cache, smd_threshold: float, slices: bool) -> None:
    """The split's errors (unknown cases, leakage) and warnings; with the cache, the per-split statistics."""
    report.split_info = {"path": str(split.path), "hash": split.hash, "fold": split.fold,
                         "n_groups": len({split.groups.get(c, c) for s in SIDES for c in split.cases(s)}),
                         "group_regex": dataset_cfg.split.group_regex,
                         "groups_file": getattr(dataset_cfg.split, "groups_file", None)}
    _assign_sides(report, split)
    _audit_leakage(report, split, source, dataset_cfg)
    if cache is None:
        return
    sides = {side: [c for c in split.cases(side) if c in cache.cases] for side in SIDES}
    _compare_sides(report, cache, sides, smd_threshold)
    if slices:
        _audit_identical_slices(report, cache, dataclasses.replace(split, **sides))  # cached cases only


# ------------------------------------------------------------------------------------------------- audit


def audit_info(case) -> dict[str, Any]:
    """What the audit needs of a decoded case (picklable: computed in the cache build's worker processes)."""
    return {"record": case_record(case), "ground_truth": case.meta.get("ground_truth", "GroundTruth")}


def _audit_case(report: Report, info: dict[str, Any], *, is_ct: bool) -> None:
    """The row of a loaded case (``audit_info``), its hard errors (spacing mismatch, non-finite values) and warnings
    (non-HU CT, empty case)."""
    from medseg.data.cache import HU_LIKE_MIN

    rec = info["record"]
    report.cases[rec["case_id"]] = rec
    cid, where = rec["case_id"], f"{rec['source']} (case {rec['case_id']})"
    if rec["gt_voxelsize"] is not None and spacing_disagrees(rec["spacing"], rec["gt_voxelsize"]):
        report.error("spacing_mismatch", f"{where}: NIfTI spacing {_fmt_vec(rec['spacing'])} != GroundTruth "
                                         f"voxel size {_fmt_vec(rec['gt_voxelsize'])} ({info['ground_truth']})", cid)
    stats = rec["intensity"]
    if not all(math.isfinite(v) for v in stats.values()):
        report.error("non_finite", f"{where}: image holds NaN or infinite values", cid)
    elif is_ct and stats["min"] > HU_LIKE_MIN:
        report.warn("non_hu", f"{where}: CT minimum {stats['min']:g} > {HU_LIKE_MIN:g}: not Hounsfield units "
                              "(the cache percentile-normalises it instead of windowing)", cid)
    if not rec["fg_voxels"]:
        report.warn("empty_case", f"{where}: no foreground voxel", cid)


def _report_unpaired(report: Report, unpaired: list[tuple[str | None, str]], allow_missing: bool) -> None:
    """Unpaired cases are hard errors, or warnings with dataset.allow_missing (the user chose to train without them)."""
    kind = MissingPairError.kind
    for cid, message in unpaired:
        if allow_missing:
            report.warn(kind, message + " (skipped: dataset.allow_missing)", cid)
            if cid is not None:
                report.cases[cid].update(status="skipped", error=kind)
        elif cid is None:
            report.error(kind, message)
        else:
            report.failed_case(cid, kind, message)


def slice_counts(source, ids: list[str]) -> dict[str, int]:
    """case id -> slices the cache will store, from the file headers (``Source.shape``: nothing decoded)."""
    return {cid: int(source.shape(cid)[2]) for cid in ids}


def _build_with_estimate(report: Report, dataset_cfg, source, ids: list[str], *, progress: bool, on_case,
                         on_estimate: Callable | None):
    """``build_cache`` reporting the cache's cost as soon as it is known (``report.cache_estimate``, then
    ``on_estimate(it)``): the real figures of a cache that exists, else the slice counts from the headers and the
    time of the build's first case (no case decoded twice). A header that cannot be read: no estimate (the case's
    load says why)."""
    from medseg.data.cache import CacheEstimate, build_cache, estimate_build, existing_cache

    def publish(estimate) -> None:
        report.cache_estimate = estimate.as_dict()
        if on_estimate is not None:
            on_estimate(report.cache_estimate)

    def on_first_case(timing) -> None:
        if slices is not None:
            publish(estimate_build(dataset_cfg, slices, timing))

    cache = existing_cache(dataset_cfg, source)
    if cache is None:
        try:
            slices = slice_counts(source, ids)
        except DataError:
            slices = None
        cache = build_cache(dataset_cfg, source, progress=progress, case_info=audit_info, on_case=on_case,
                            on_first_case=on_first_case)
    if report.cache_estimate is None:  # it existed, or another process built it while this one waited for the lock
        publish(CacheEstimate.of_cache(cache))
    return cache


def _load_cases(report: Report, dataset_cfg, source, ids: list[str], *, progress: bool,
                on_estimate: Callable | None = None):
    """Decode and audit every paired case, each once: through the cache build when the cache is missing (it is built
    on the way, by its worker processes), one by one when it exists or the build stopped. A case that fails is a hard
    error of its kind and stops the build, which leaves nothing behind. Returns the cache when every case loaded,
    else None."""
    is_ct = str(source.modality).upper() == "CT"

    from medseg.data.workers import WorkerDiedError

    def failed(case_id: str | None, err: DataError) -> None:
        # the build's own error, or a worker killed (out of memory?): not the case's data, which is audited below
        if case_id is None or isinstance(err, WorkerDiedError):
            report.error("cache", str(err))
        else:
            report.failed_case(case_id, err.kind, str(err))

    cache = None
    if not any(e["kind"] == MissingPairError.kind for e in report.errors):  # the cache could not hold every case
        try:
            cache = _build_with_estimate(report, dataset_cfg, source, ids, progress=progress, on_estimate=on_estimate,
                                         on_case=lambda cid, info: _audit_case(report, info, is_ct=is_ct))
        except DataError as err:
            failed(getattr(err, "case_id", None), err)
    for cid in ids:  # cases the build did not decode: all when the cache was reused, the rest after a failure
        if report.cases[cid]["status"] == "pending":
            try:
                _audit_case(report, audit_info(source.load(cid)), is_ct=is_ct)
            except DataError as err:
                failed(cid, err)
    return cache if all(report.cases[cid]["status"] == "ok" for cid in ids) else None  # statistics need every case


def audit(dataset_cfg, *, split=None, slices: bool = True, smd_threshold: float = SMD_THRESHOLD,
          progress: bool = False, on_estimate: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Audit the dataset of a ``dataset`` config section; returns the report (see ``SCHEMA`` and the module doc).

    ``split``: a ``Split`` to audit instead of the saved one for ``dataset_cfg.split`` (which is made if missing).
    ``on_estimate(report's cache_estimate)`` as soon as it is known: before the cache build's long wait.
    """
    from medseg.data.cache import HU_LIKE_MIN
    from medseg.data.split import load_or_create_split

    report = Report(dataset_cfg)
    report.thresholds.update(smd=smd_threshold, hu_min=HU_LIKE_MIN)
    try:
        source, ids, unpaired = open_for_audit(dataset_cfg)
    except DataError as err:  # no readable dataset at all: nothing else to audit
        report.error("dataset", str(err))
        return report.as_dict()
    report.dataset.update(root=str(source.root), modality=source.modality,
                          labels={str(k): v for k, v in source.labels.items()})
    for cid in sorted(set(ids) | {c for c, _ in unpaired if c is not None}):  # the table lists every case once
        report.cases[cid] = empty_row(cid, "pending")
    _report_unpaired(report, unpaired, dataset_cfg.allow_missing)
    cache = _load_cases(report, dataset_cfg, source, ids, progress=progress, on_estimate=on_estimate)
    if cache is not None:
        report.cache_info = {"path": str(cache.root), "build_seconds": cache.manifest.get("build_seconds")}
        if split is None:
            try:
                split = load_or_create_split(cache, source, dataset_cfg.split)
            except DataError as err:
                report.error(err.kind if isinstance(err, LeakageError) else "split", str(err))
    if split is not None:
        _audit_split(report, split, source, dataset_cfg, cache, smd_threshold, slices)
    return report.as_dict()


def estimate(dataset_cfg) -> dict[str, Any]:
    """``--estimate``: the report's ``cache_estimate`` alone, nothing audited or built. The real figures of a cache
    that exists; else slice counts from the headers of the paired cases and the time of the first one, made (with the
    audit's per-case work, as the audit's build makes it) in a temporary folder that is removed. DataError when the
    dataset, a header or that case cannot be read."""
    from medseg.data.cache import CacheEstimate, estimate_build, existing_cache, time_first_case

    source, ids, _ = open_for_audit(dataset_cfg)
    cache = existing_cache(dataset_cfg, source)
    if cache is not None:
        return CacheEstimate.of_cache(cache).as_dict()
    slices = slice_counts(source, ids)
    return estimate_build(dataset_cfg, slices, time_first_case(dataset_cfg, source, audit_info)).as_dict()


# ------------------------------------------------------------------------------------------------- text


def _fmt_bytes(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def estimate_line(est: dict[str, Any]) -> str:
    """'cache: 87 cases, 35,012 slices -> 6.4 GiB at 256 px; about 21 min to build with 2 processes (0.071 s per
    slice measured on case 001)', or for a cache that exists its real figures (``cache_estimate`` of the report)."""
    counts = f"{est['cases']:,} cases, {est['slices']:,} slices"
    size = f"{_fmt_bytes(est['bytes'])} at {est['image_size']} px"
    processes = "" if est["processes"] is None else f" with {est['processes']} process" + "es" * (est["processes"] > 1)
    if est["exists"]:
        built = "" if est["seconds"] is None else f"; built in {_fmt_duration(est['seconds'])}{processes}"
        return f"cache exists: {counts}, {size}{built} (real figures from its manifest): {est['path']}"
    return (f"cache: {counts} -> {size}; about {_fmt_duration(est['seconds'])} to build{processes} "
            f"({est['seconds_per_slice']:.3g} s per slice measured on case {est['measured_on']})")


def _fmt_vec(values, fmt: str = "{:.4g}") -> str:
    return "x".join(fmt.format(v) for v in values)


def _fmt(value, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _case_row(c: dict[str, Any]) -> list:
    if c["status"] != "ok":
        return [c["case_id"], c["split"] or "-", f"{c['status'].upper()} {c['error']}"] + ["-"] * 7
    vox = " ".join(f"{k}:{n}" for k, n in c["voxels_per_label"].items()) or "0 (empty)"
    i = c["intensity"]
    return [c["case_id"], c["split"] or "-", "ok", _fmt_vec(c["shape"], "{}"), _fmt_vec(c["spacing"]), vox,
            c["n_components"], _fmt(i["min"]), _fmt(i["max"]), _fmt(i["mean"])]


def _counted(values: list[str], limit: int = 3) -> str:
    """'256x256x1 (600), 288x384x1 (9)': the most common values with their counts."""
    common = Counter(values).most_common()
    text = ", ".join(f"{v} ({n})" for v, n in common[:limit])
    return text + (f", {len(common) - limit} other value(s)" if len(common) > limit else "")


def _ok_summary(cases: list[dict[str, Any]]) -> str:
    """One line over the loaded cases of a long table: shapes, spacings, foreground, intensities."""
    fg = np.array([c["fg_fraction"] for c in cases], np.float64)
    lows = [c["intensity"]["min"] for c in cases if c["intensity"]["min"] is not None]  # None: not finite
    highs = [c["intensity"]["max"] for c in cases if c["intensity"]["max"] is not None]
    lo, hi = (min(lows) if lows else None), (max(highs) if highs else None)
    return (f"  {len(cases)} loaded: shape {_counted([_fmt_vec(c['shape'], '{}') for c in cases])}; spacing "
            f"{_counted([_fmt_vec(c['spacing']) for c in cases])}; foreground {100 * fg.min():.2f}% / "
            f"{100 * np.median(fg):.2f}% / {100 * fg.max():.2f}% (min / median / max), {int(np.sum(fg == 0))} empty; "
            f"intensity {_fmt(lo)}..{_fmt(hi)}")


_PLACE = re.compile(r"^(?P<where>.+?)(?: \(case [^)]*\))?: ")


def _place(item: dict[str, Any], root: str | None) -> str:
    """Where an error or warning is, shortly: its file relative to the dataset root, and its case."""
    match = _PLACE.match(item["message"])
    where = match["where"] if match and "/" in match["where"] else None  # a path, not a sentence
    case = f"case {item['case']}" if item.get("case") is not None else None
    if where is None:
        return case or (item["message"][:60] + ("..." if len(item["message"]) > 60 else ""))
    if root:
        where = where.replace(root.rstrip("/") + "/", "")
    return f"{where} ({case})" if case else where


def _issue_lines(title: str, items: list[dict[str, Any]], root: str | None, verbose: bool) -> list[str]:
    """One line per error (or warning); with more than ``FEW`` of a kind (not ``verbose``), one line for the kind:
    its count, its first places and its first message in full (which names the fix)."""
    word = title[:-1]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_kind.setdefault(item["kind"], []).append(item)
    lines = []
    for kind, group in by_kind.items():
        if verbose or len(group) <= FEW:
            lines += [f"  {word} [{kind}] {item['message']}" for item in group]
            continue
        places = ", ".join(_place(item, root) for item in group[:FEW])
        lines.append(f"  {word} [{kind}] x{len(group)}: {places} (+{len(group) - FEW} more; --verbose or --json "
                     f"lists them all); first: {group[0]['message']}")
    return lines


def _split_lines(report: dict[str, Any]) -> list[str]:
    """The per-split table and the val / test vs train comparisons."""
    rows = []
    for side, st in report["splits"].items():
        if not st["n_cases"]:
            rows.append([side, 0] + ["-"] * 7)
            continue
        fg, im = st["fg_fraction"], st["intensity_mean"]
        rows.append([side, st["n_cases"], st["n_slices"], _fmt(100 * st["fg_slice_fraction"], "{:.1f}%"),
                     f"{100 * fg['mean']:.3f}% ± {100 * fg['sd']:.3f}%", st["n_lesions"], st["lesion_free_cases"],
                     f"{im['mean']:.1f} ± {im['sd']:.1f}", _fmt(st["intensity_std"])])
    header = ["split", "cases", "slices", "fg slices", "fg fraction (mean ± sd)", "lesions", "lesion-free",
              "intensity mean ± sd", "intensity std"]
    lines = [format_table(header, rows, indent="  ")]
    for side, comp in (report["comparisons"] or {}).items():
        lines.append(f"  {side} vs train: standardised mean difference of fg fraction "
                     f"{_fmt(comp['fg_fraction_smd'], '{:+.2f}')}, of mean intensity "
                     f"{_fmt(comp['intensity_mean_smd'], '{:+.2f}')} (warning above {report['thresholds']['smd']})")
    return lines


def format_report(report: dict[str, Any], *, verbose: bool = False) -> str:
    """The human-readable report: dataset line, cases, splits, comparisons, errors, warnings.

    Not ``verbose``: a table of more than ``MAX_CASE_ROWS`` cases lists the failed ones only (the first
    ``MAX_FAILED_ROWS``) and sums up the loaded ones in a line; more than ``FEW`` errors or warnings of one kind
    are one line for the kind.
    """
    ds, out = report["dataset"], []
    labels = ", ".join(f"{k} {v}" for k, v in (ds["labels"] or {}).items())
    out.append(f"dataset {ds['root'] or ds['path']} ({ds['format']}, modality {ds['modality']}, labels: {labels})")
    if report.get("cache_estimate"):
        out.append(estimate_line(report["cache_estimate"]))
    cases = report["cases"]
    header = ["case", "split", "status", "shape", "spacing", "label voxels", "lesions", "min", "max", "mean"]
    out += ["", f"cases ({len(cases)})"]
    if verbose or len(cases) <= MAX_CASE_ROWS:
        out.append(format_table(header, [_case_row(c) for c in cases], indent="  "))
    else:
        failed = [c for c in cases if c["status"] != "ok"]
        if failed:
            out.append(format_table(header, [_case_row(c) for c in failed[:MAX_FAILED_ROWS]], indent="  "))
            if len(failed) > MAX_FAILED_ROWS:
                out.append(f"  ... {len(failed) - MAX_FAILED_ROWS} more case(s) not loaded")
        loaded = [c for c in cases if c["status"] == "ok"]
        if loaded:
            out.append(_ok_summary(loaded))
        out.append("  (--verbose lists every case; --json writes them all)")
    if report["split"]:
        s = report["split"]
        out += ["", f"split {s['path']} (fold {s['fold']}, hash {s['hash']}, {s['n_groups']} groups)"]
    if report["splits"]:
        out += ["", *_split_lines(report)]
    elif report["cases"] and report["cache"] is None:
        out += ["", "no cache, split or split statistics: they need every case paired and loaded"]
    for title, items in (("errors", report["errors"]), ("warnings", report["warnings"])):
        if items:
            out += ["", f"{title} ({len(items)})"]
            out += _issue_lines(title, items, ds["root"], verbose)
    return "\n".join(out)


def _print_estimate(est: dict[str, Any]) -> None:
    from tqdm import tqdm

    tqdm.write(estimate_line(est), file=sys.stderr)  # above the cache build's progress bar, when one is shown


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medseg.data check",
                                     description="Audit the dataset of a config: per-case and per-split tables, "
                                                 "hard errors (exit code 1) and warnings (exit code 0); a bad "
                                                 "command line or config exits 2.")
    add_config_args(parser)
    parser.add_argument("--json", metavar="OUT.json", help="write the full report as JSON here")
    parser.add_argument("--no-slices", action="store_true", help="skip hashing cached slices across splits")
    parser.add_argument("--verbose", action="store_true",
                        help=f"list every case and every error and warning (default: a table of more than "
                             f"{MAX_CASE_ROWS} cases lists the failed ones, more than {FEW} errors or warnings of a "
                             f"kind are one line with their count)")
    parser.add_argument("--smd-threshold", type=float, default=SMD_THRESHOLD,
                        help="warn when val/test differ from train by more than this standardised mean difference "
                             "(default %(default)s)")
    parser.add_argument("--estimate", action="store_true",
                        help="print the cache's size on disk and build time (the real ones of a cache that exists) "
                             "and stop, exit 0: nothing audited or built; --json writes schema, config and "
                             "cache_estimate")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from medseg.config import load_config
    from medseg.io_utils import atomic_write_text

    cfg = load_config(args.config, args.overrides)
    config = str(Path(args.config).resolve())
    if args.estimate:
        report = {"schema": SCHEMA, "config": config, "cache_estimate": estimate(cfg.dataset)}
        _print_estimate(report["cache_estimate"])
    else:
        report = audit(cfg.dataset, slices=not args.no_slices, smd_threshold=args.smd_threshold,
                       progress=sys.stderr.isatty(), on_estimate=_print_estimate)
        report["config"] = config
        print(format_report(report, verbose=args.verbose))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2, allow_nan=False) + "\n")
    if args.estimate:
        return EXIT_OK
    print("summary: " + json.dumps(report["summary"]), flush=True)
    return report["summary"]["exit_code"]
