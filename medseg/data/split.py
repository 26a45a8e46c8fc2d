"""Patient-level splits: grouped, stratified, seeded, saved as splits.json beside the cache, and reused.

A split is made once per (case list, grouping, split settings) and written to
``<cache dataset dir>/splits-<hash>/splits.json``; every later run, trial or evaluation reads the same file
(nnU-Net's splits_final.json idea). Cases are grouped by ``group_regex`` over their file names so that
several files of one patient never land on both sides, and groups are stratified by "has foreground"
so that lesion-free cases appear in every split in proportion.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io_utils import atomic_write_json, stable_hash


@dataclass(frozen=True)
class Split:
    train: list[str]
    val: list[str]
    test: list[str]
    path: Path  # the splits.json it came from
    fold: int
    groups: dict[str, str]

    @property
    def hash(self) -> str:
        """Identifies exactly which cases are on which side (logged as a tag, stored in checkpoints)."""
        return stable_hash({"train": sorted(self.train), "val": sorted(self.val), "test": sorted(self.test)})

    def cases(self, name: str) -> list[str]:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split '{name}'; allowed: train, val, test")
        return list(getattr(self, name))


def group_of(case_id: str, file_name: str, group_regex: str | None) -> str:
    """Patient key of a case: ``group(1)`` (or the whole match) of the regex on its file name."""
    if not group_regex:
        return case_id
    match = re.search(group_regex, file_name)
    if match is None:
        raise DataError(f"{file_name}: case {case_id}: dataset.split.group_regex {group_regex!r} does not match")
    return match.group(1) if match.groups() else match.group(0)


def _assign(groups_by_stratum: dict[bool, list[str]], fractions: list[float], rng: np.random.Generator) -> list[list[str]]:
    """Split each stratum's groups into len(fractions) parts by those fractions (the last takes the rest)."""
    parts: list[list[str]] = [[] for _ in fractions]
    for stratum in sorted(groups_by_stratum):
        members = sorted(groups_by_stratum[stratum])
        order = [members[i] for i in rng.permutation(len(members))]
        start = 0
        for i, frac in enumerate(fractions[:-1]):
            n = int(round(frac * len(order)))
            parts[i].extend(order[start:start + n])
            start += n
        parts[-1].extend(order[start:])
    return parts


def _deal(groups_by_stratum: dict[bool, list[str]], n_parts: int, rng: np.random.Generator) -> list[list[str]]:
    """k-fold parts: each stratum's groups, shuffled, dealt round-robin, continuing from where the previous
    stratum stopped, so part sizes differ by at most one overall and within each stratum. (Cutting each stratum
    by rounded fractions would leave every remainder to the last part: 12 patients in 5 folds gave 2,2,2,2,4.)"""
    parts: list[list[str]] = [[] for _ in range(n_parts)]
    dealt = 0
    for stratum in sorted(groups_by_stratum):
        members = sorted(groups_by_stratum[stratum])
        for i in rng.permutation(len(members)):
            parts[dealt % n_parts].append(members[i])
            dealt += 1
    return parts


def _split_settings(split_cfg) -> dict[str, Any]:
    """The settings that decide the table: all but ``fold``, which only picks one of its folds, so every fold
    of a cross-validation reads the same splits.json."""
    return split_cfg.model_dump(exclude={"fold"})


def make_split_table(case_files: dict[str, str], has_fg: dict[str, bool], split_cfg) -> dict[str, Any]:
    """The content of splits.json: groups, the fixed test set and one (train, val) pair per fold."""
    groups = {cid: group_of(cid, f, split_cfg.group_regex) for cid, f in sorted(case_files.items())}
    members: dict[str, list[str]] = defaultdict(list)
    for cid, g in groups.items():
        members[g].append(cid)
    if len(members) < 2:
        raise DataError(f"need at least 2 patients (groups) to split, found {len(members)}")
    strata: dict[bool, list[str]] = defaultdict(list)
    for g, cids in members.items():
        strata[any(has_fg.get(c, True) for c in cids)].append(g)
    rng = np.random.default_rng(split_cfg.seed)

    def cases_of(group_list: list[str]) -> list[str]:
        return sorted(c for g in group_list for c in members[g])

    test_groups, rest = _assign(strata, [split_cfg.test_fraction, 1 - split_cfg.test_fraction], rng)
    rest_set = set(rest)
    rest_strata = {s: [g for g in gs if g in rest_set] for s, gs in strata.items()}
    if split_cfg.n_folds >= 2:
        parts = _deal(rest_strata, split_cfg.n_folds, rng)
        folds = [{"train": cases_of([g for j, p in enumerate(parts) if j != i for g in p]), "val": cases_of(part)}
                 for i, part in enumerate(parts)]
    else:
        val_share = split_cfg.val_fraction / (1 - split_cfg.test_fraction)
        val_groups, train_groups = _assign(rest_strata, [val_share, 1 - val_share], rng)
        folds = [{"train": cases_of(train_groups), "val": cases_of(val_groups)}]
    for i, fold in enumerate(folds):
        if not fold["train"] or not fold["val"]:
            raise DataError(f"split fold {i} has an empty train or val side ({len(members)} patients); "
                            "lower dataset.split.val_fraction/test_fraction or n_folds")
    return {
        "settings": _split_settings(split_cfg),
        "n_cases": len(groups),
        "groups": groups,
        "test": cases_of(test_groups),
        "folds": folds,
    }


def load_or_create_split(cache, source, split_cfg) -> Split:
    """The saved split for these settings and cases, created (atomically) on first use."""
    from filelock import FileLock

    case_files = {cid: source.file_of(cid) for cid in cache.case_ids}
    has_fg = {cid: _has_foreground(cache, cid) for cid in cache.case_ids}
    key = stable_hash({"settings": _split_settings(split_cfg), "cases": sorted(case_files.items())})
    path = cache.dataset_dir / f"splits-{key}" / "splits.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                table = json.loads(path.read_text())
            except ValueError as err:
                raise DataError(f"{path}: unreadable splits file ({err}); delete it to recreate") from None
        else:
            table = make_split_table(case_files, has_fg, split_cfg)
            atomic_write_json(path, table)
    return split_from_table(table, path, split_cfg.fold)


def _has_foreground(cache, case_id: str) -> bool:
    """Does the case hold any label, counted at the original resolution (the manifest's voxels_per_label)?

    Not from the resized slices: a tiny lesion can vanish at a small image_size, and the split file is shared
    by caches of every image_size, so its content must not depend on which of them created it.
    """
    counts = getattr(cache, "cases", {}).get(case_id, {}).get("voxels_per_label")
    if counts is not None:
        return any(int(n) > 0 for n in counts.values())
    return int(np.sum(cache.fg_per_slice(case_id))) > 0


def split_from_table(table: dict[str, Any], path: Path, fold: int) -> Split:
    folds = table["folds"]
    if fold >= len(folds):
        raise DataError(f"{path}: fold {fold} requested, file has {len(folds)}")
    split = Split(train=list(folds[fold]["train"]), val=list(folds[fold]["val"]), test=list(table["test"]),
                  path=Path(path), fold=fold, groups=dict(table["groups"]))
    check_no_group_overlap(split)
    return split


def check_no_group_overlap(split: Split) -> None:
    """Raise if a case or a patient group is on two sides of the split."""
    sides = {"train": split.train, "val": split.val, "test": split.test}
    seen: dict[str, str] = {}
    for side, cases in sides.items():
        for cid in cases:
            group = split.groups.get(cid, cid)
            other = seen.setdefault(group, side)
            if other != side:
                raise DataError(f"{split.path}: leakage: patient group '{group}' (case {cid}) is in both {other} and {side}")


def find_identical_slices(cache, split: Split, max_examples: int = 10) -> dict[str, Any]:
    """Hash every non-constant cached slice and report identical slices found on two sides of the split."""
    owner: dict[bytes, tuple[str, str, int]] = {}
    duplicates: list[dict[str, Any]] = []
    count = 0
    for side in ("train", "val", "test"):
        for cid in split.cases(side):
            image = cache.image(cid)
            for z in range(image.shape[0]):
                plane = np.asarray(image[z])
                if plane.min() == plane.max():  # blank slices (air, padding) are legitimately identical
                    continue
                digest = hashlib.blake2b(plane.tobytes(), digest_size=16).digest()
                first = owner.setdefault(digest, (side, cid, z))
                if first[0] != side:
                    count += 1
                    if len(duplicates) < max_examples:
                        duplicates.append({"a": {"split": first[0], "case": first[1], "slice": first[2]},
                                           "b": {"split": side, "case": cid, "slice": z}})
    return {"identical_slices_across_splits": count, "examples": duplicates}
