"""Patient-level splits: grouped, stratified, seeded, saved as splits.json beside the cache, and reused.

A split is made once per (case list, grouping, split settings) and written to
``<cache dataset dir>/splits-<hash>/splits.json``; every later run, trial or evaluation reads the same file
(nnU-Net's splits_final.json idea). Cases are grouped by ``group_regex`` over their file names, or by a
``groups_file`` (CSV ``case_id,group``: e.g. the video sequence of each frame), so that several files of one
patient never land on both sides.

Two rules (``dataset.split.method``). ``ordered`` (the default, and the only rule before it existed): groups are
stratified by "has foreground", shuffled by the seed and cut at the exact fractions, so lesion-free cases appear in
every split in proportion; any change of the case list redraws the sides. ``stable``: a group's side depends only
on a hash of (seed, group) against the fractions, so adding cases never moves an existing one (data that grows:
the champion and a new study then share their validation cases); shares follow the fractions in expectation.
The rule is one of the settings in the file's key: changing it makes a new split, never a silent reassignment.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.sources.common import format_names
from medseg.errors import CorruptFileError, DataError, LeakageError
from medseg.io_utils import atomic_write_json, stable_hash

GROUPS_HEADER = ("case_id", "group")


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


def read_groups_file(path: str | Path) -> dict[str, str]:
    """case id -> group from a CSV with the header ``case_id,group``; one-line DataErrors naming the file and line."""
    path = Path(path)
    where = f"{path} (dataset.split.groups_file)"
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark is not part of the header
    except FileNotFoundError:
        raise DataError(f"{where}: not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{where}: unreadable ({type(err).__name__}: {' '.join(str(err).split())})") from None
    rows = [(n, [cell.strip() for cell in row]) for n, row in enumerate(csv.reader(text.splitlines()), start=1)
            if any(cell.strip() for cell in row)]
    if not rows or tuple(rows[0][1]) != GROUPS_HEADER:
        got = ",".join(rows[0][1]) if rows else "an empty file"
        raise DataError(f"{where}: line {rows[0][0] if rows else 1}: expected the header "
                        f"{','.join(GROUPS_HEADER)!r}, got {got!r}")
    groups: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for n, row in rows[1:]:
        if len(row) != 2 or not row[0] or not row[1]:
            raise DataError(f"{where}: line {n}: expected 'case_id,group', got {','.join(row)!r}")
        cid, group = row
        if cid in groups:
            raise DataError(f"{where}: line {n}: case {cid!r} listed again (first on line {first_line[cid]})")
        groups[cid], first_line[cid] = group, n
    if not groups:
        raise DataError(f"{where}: no case listed under the header")
    return groups


def groups_from_file(path: str | Path, case_files: dict[str, str], known: set[str] | None = None) -> dict[str, str]:
    """case id -> group for every case of ``case_files`` (id -> file name) from the groups file ``path``.

    A case without a group is an error naming the first one (sorted); so is a listed case that is not in the dataset
    (``known``: the dataset's case ids, default those of ``case_files``), which is usually a misspelt id.
    """
    table = read_groups_file(path)
    known = set(case_files) if known is None else known
    unknown = [cid for cid in table if cid not in known]
    if unknown:
        raise DataError(f"{path} (dataset.split.groups_file): case {unknown[0]!r} is not in the dataset "
                        f"({len(unknown)} unknown case(s): {format_names(unknown)}; the dataset's ids look like "
                        f"{format_names(sorted(known)[:3], 3)})")
    missing = sorted(cid for cid in case_files if cid not in table)
    if missing:
        cid = missing[0]
        raise DataError(f"{path} (dataset.split.groups_file): case {cid!r} ({case_files[cid]}) has no group "
                        f"({len(missing)} case(s) without one: {format_names(missing)}); every case needs a line "
                        f"'{cid},<group>'")
    return {cid: table[cid] for cid in sorted(case_files)}


def case_groups(case_files: dict[str, str], split_cfg, known: set[str] | None = None) -> dict[str, str]:
    """case id -> patient group: from ``split_cfg.groups_file`` when set, else ``group_regex`` on the file names
    (each case its own group without either)."""
    groups_file = getattr(split_cfg, "groups_file", None)
    if groups_file:
        return groups_from_file(groups_file, case_files, known)
    return {cid: group_of(cid, f, split_cfg.group_regex) for cid, f in sorted(case_files.items())}


def _assign(groups_by_stratum: dict[bool, list[str]], fractions: list[float],
            rng: np.random.Generator) -> list[list[str]]:
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


def stable_unit(seed: int, group: str) -> float:
    """A number in [0, 1) fixed by (seed, group) alone: where the ``stable`` rule places a group against the
    fractions (sha256, so it is the same on every machine, Python version and ordering of the cases)."""
    digest = hashlib.sha256(f"medseg-split\0{int(seed)}\0{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _stable_parts(group_list: list[str], split_cfg) -> tuple[list[str], list[list[str]]]:
    """The ``stable`` rule: (test groups, parts of the rest). A group's unit u = ``stable_unit(seed, group)`` goes to
    test when u < test_fraction; the rest, rescaled to v in [0, 1), go to fold floor(v * n_folds) (k-fold), or to
    validation when v < val_fraction / (1 - test_fraction), else to training (parts: [val, train]). Adding groups
    never moves an existing one; each side's share, per stratum too, follows the fractions in expectation only
    (a binomial draw: about ±sqrt(p(1-p)/n) for n groups)."""
    test: list[str] = []
    n_parts = split_cfg.n_folds if split_cfg.n_folds >= 2 else 2
    parts: list[list[str]] = [[] for _ in range(n_parts)]
    val_share = split_cfg.val_fraction / (1 - split_cfg.test_fraction)
    for group in sorted(group_list):
        u = stable_unit(split_cfg.seed, group)
        if u < split_cfg.test_fraction:
            test.append(group)
            continue
        v = (u - split_cfg.test_fraction) / (1 - split_cfg.test_fraction)
        index = min(int(v * n_parts), n_parts - 1) if split_cfg.n_folds >= 2 else (0 if v < val_share else 1)
        parts[index].append(group)
    return test, parts


def _split_settings(split_cfg) -> dict[str, Any]:
    """The settings that decide the table: all but ``fold``, which only picks one of its folds, so every fold
    of a cross-validation reads the same splits.json. An unset ``groups_file`` is absent (the config leaves it out
    of its dumps), so splits made before it existed keep their hash; a set one is named by its file name only:
    its content (the groups) is in the table and in the split's key, and an absolute path would make the same
    split differ between two checkouts."""
    settings = split_cfg.model_dump(exclude={"fold"})
    if settings.get("groups_file"):
        settings["groups_file"] = Path(settings["groups_file"]).name
    return settings


def _ordered_parts(strata: dict[bool, list[str]], split_cfg) -> tuple[list[str], list[list[str]]]:
    """The ``ordered`` rule: (test groups, parts of the rest), each stratum shuffled by the seed and cut at the
    rounded fractions (k-fold: dealt round-robin); parts are [val, train] for a hold-out split. Exact shares, but
    any change of the case list redraws every side."""
    rng = np.random.default_rng(split_cfg.seed)
    test_groups, rest = _assign(strata, [split_cfg.test_fraction, 1 - split_cfg.test_fraction], rng)
    rest_set = set(rest)
    rest_strata = {s: [g for g in gs if g in rest_set] for s, gs in strata.items()}
    if split_cfg.n_folds >= 2:
        return test_groups, _deal(rest_strata, split_cfg.n_folds, rng)
    val_share = split_cfg.val_fraction / (1 - split_cfg.test_fraction)
    return test_groups, _assign(rest_strata, [val_share, 1 - val_share], rng)


def make_split_table(case_files: dict[str, str], has_fg: dict[str, bool], split_cfg,
                     groups: dict[str, str] | None = None) -> dict[str, Any]:
    """The content of splits.json: groups, the fixed test set and one (train, val) pair per fold.

    ``groups``: case id -> patient group when already computed (``case_groups``)."""
    groups = case_groups(case_files, split_cfg) if groups is None else {c: groups[c] for c in sorted(case_files)}
    members: dict[str, list[str]] = defaultdict(list)
    for cid, g in groups.items():
        members[g].append(cid)
    if len(members) < 2:
        raise DataError(f"need at least 2 patients (groups) to split, found {len(members)}")
    strata: dict[bool, list[str]] = defaultdict(list)
    for g, cids in members.items():
        strata[any(has_fg.get(c, True) for c in cids)].append(g)

    def cases_of(group_list: list[str]) -> list[str]:
        return sorted(c for g in group_list for c in members[g])

    if getattr(split_cfg, "method", "ordered") == "stable":
        test_groups, parts = _stable_parts(list(members), split_cfg)
    else:
        test_groups, parts = _ordered_parts(strata, split_cfg)
    if split_cfg.n_folds >= 2:
        folds = [{"train": cases_of([g for j, p in enumerate(parts) if j != i for g in p]), "val": cases_of(part)}
                 for i, part in enumerate(parts)]
    else:
        folds = [{"train": cases_of(parts[1]), "val": cases_of(parts[0])}]
    for i, fold in enumerate(folds):
        if not fold["train"] or not fold["val"]:
            hint = (" (the stable rule draws each side's size; with few patients try another split seed)"
                    if getattr(split_cfg, "method", "ordered") == "stable" else "")
            raise DataError(f"split fold {i} has an empty train or val side ({len(members)} patients); "
                            f"lower dataset.split.val_fraction/test_fraction or n_folds{hint}")
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
    groups = case_groups(case_files, split_cfg)
    identity: dict[str, Any] = {"settings": _split_settings(split_cfg), "cases": sorted(case_files.items())}
    if getattr(split_cfg, "groups_file", None):  # only then: the keys of splits made without one stay the same
        identity["groups"] = sorted(groups.items())  # an edited groups file is a new split
    key = stable_hash(identity)
    path = cache.dataset_dir / f"splits-{key}" / "splits.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                table = json.loads(path.read_text())
            except ValueError as err:
                raise CorruptFileError(f"{path}: unreadable splits file ({err}); delete it to recreate") from None
        else:
            table = make_split_table(case_files, has_fg, split_cfg, groups)
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
    """LeakageError if a case or a patient group is on two sides of the split."""
    sides = {"train": split.train, "val": split.val, "test": split.test}
    seen: dict[str, str] = {}
    for side, cases in sides.items():
        for cid in cases:
            group = split.groups.get(cid, cid)
            other = seen.setdefault(group, side)
            if other != side:
                raise LeakageError(f"{split.path}: leakage: patient group '{group}' (case {cid}) is in both {other} "
                                   f"and {side}")


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
