"""Patient-level splits: seeded, saved and reused, k-fold coverage, grouping by patient, stratification by
"has a lesion", and the two leakage checks. Real caches of tiny Kaggle-layout tasks in tmp dirs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.config import config_from_dict
from medseg.data.cache import build_cache
from medseg.data.sources import open_source_from_config
from medseg.data.split import Split, check_no_group_overlap, find_identical_slices, load_or_create_split
from medseg.errors import DataError, LeakageError
from tests.fixtures import make_kaggle_task, tiny_case

IDS = [f"{i:03d}" for i in range(15)]
LESION_FREE = {"001", "004", "007", "010", "013"}


def make_task(root: Path, ids, lesion_free=(), shape=(6, 6, 2)) -> Path:
    cases = {}
    for i, cid in enumerate(ids):
        raw, label = tiny_case(i, shape=shape)
        if cid in lesion_free:
            label[:] = 0
        cases[cid] = (raw, label)
    return make_kaggle_task(root, cases)


def prepare(task: Path, cache_dir: Path, image_size: int = 32, **split):
    """(cache, source, split config) for ``task`` with the given dataset.split settings."""
    cfg = config_from_dict({"dataset": {"format": "kaggle", "path": str(task), "cache_dir": str(cache_dir),
                                        "image_size": image_size, "split": split}}, resolve=True).dataset
    source = open_source_from_config(cfg)
    return build_cache(cfg, source, progress=False), source, cfg.split


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_task(tmp_path_factory.mktemp("data"), IDS, LESION_FREE)


def split_for(task: Path, cache_dir: Path, **split) -> Split:
    cache, source, split_cfg = prepare(task, cache_dir, **split)
    return load_or_create_split(cache, source, split_cfg)


# --------------------------------------------------------------------------------------- seeded and saved


def test_same_files_same_seed_give_a_byte_identical_split(tmp_path):
    first = split_for(make_task(tmp_path / "a", IDS, LESION_FREE), tmp_path / "cache_a", seed=3)
    second = split_for(make_task(tmp_path / "b", IDS, LESION_FREE), tmp_path / "cache_b", seed=3)
    assert first.path != second.path
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.hash == second.hash
    assert sorted(first.train + first.val) == IDS and not set(first.train) & set(first.val)
    assert len(first.val) == 3  # val_fraction 0.2 of 15


def test_a_different_seed_gives_a_different_split(task, tmp_path):
    a = split_for(task, tmp_path / "cache", seed=0)
    b = split_for(task, tmp_path / "cache", seed=1)
    assert a.path != b.path and sorted(a.val) != sorted(b.val) and a.hash != b.hash


def test_split_is_reused_from_disk(task, tmp_path):
    cache, source, split_cfg = prepare(task, tmp_path / "cache", seed=5)
    first = load_or_create_split(cache, source, split_cfg)
    written = first.path.read_bytes()
    mtime = first.path.stat().st_mtime_ns
    again = load_or_create_split(cache, source, split_cfg)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    assert again.path.read_bytes() == written and again == first
    assert json.loads(written)["folds"][0]["val"] == sorted(first.val)


def test_kfold_covers_every_case_once_and_keeps_test_apart(task, tmp_path):
    splits = [split_for(task, tmp_path / "cache", n_folds=4, fold=k, test_fraction=0.2, seed=2) for k in range(4)]
    assert len({s.path for s in splits}) == 1  # one splits.json for all folds
    test = set(splits[0].test)
    assert test and all(set(s.test) == test for s in splits)
    vals = [set(s.val) for s in splits]
    assert sorted(c for v in vals for c in v) == sorted(set(IDS) - test)  # each non-test case in exactly one val fold
    for k, s in enumerate(splits):
        assert set(s.train) | set(s.val) | test == set(IDS)
        assert not set(s.train) & set(s.val) and not (set(s.train) | set(s.val)) & test
        assert set(s.val).isdisjoint(set().union(*[v for j, v in enumerate(vals) if j != k]))
    sizes = sorted(len(v) for v in vals)
    assert sizes[-1] - sizes[0] <= 1  # balanced folds


def test_fold_past_the_end_of_the_file_is_an_error(task, tmp_path):
    with pytest.raises(DataError, match="fold 2 requested, file has 1"):
        split_for(task, tmp_path / "cache", n_folds=0, fold=2)  # hold-out has one fold


# --------------------------------------------------------------------------------------- grouping


def test_group_regex_keeps_a_patients_files_together(tmp_path):
    ids = [f"p{p}_{v}" for p in range(1, 9) for v in "ab"[: 1 + p % 2]] + ["p9_a", "p9_b", "p9_c"]
    task = make_task(tmp_path / "data", ids, lesion_free={"p2_a", "p4_a", "p6_a"})
    for seed in range(4):
        split = split_for(task, tmp_path / "cache", group_regex=r"^(p\d+)_", seed=seed, val_fraction=0.3)
        assert split.groups["p9_c"] == "p9" and split.groups["p1_b"] == "p1"
        side = {cid: name for name in ("train", "val", "test") for cid in split.cases(name)}
        assert sorted(side) == sorted(ids)
        for patient in {split.groups[c] for c in ids}:
            assert len({side[c] for c in ids if split.groups[c] == patient}) == 1, (seed, patient)


def test_group_regex_that_does_not_match_names_the_file(tmp_path):
    task = make_task(tmp_path / "data", ["p1_a", "p1_b", "p2_a", "x9"])
    with pytest.raises(DataError) as err:
        split_for(task, tmp_path / "cache", group_regex=r"^(p\d+)_")
    message = str(err.value)
    assert "x9.nii" in message and "group_regex" in message and "\n" not in message


# --------------------------------------------------------------------------------------- stratification


def test_lesion_free_cases_land_in_train_and_val(task, tmp_path):
    for seed in range(5):
        split = split_for(task, tmp_path / "cache", seed=seed, val_fraction=0.4)
        assert set(split.val) & LESION_FREE and set(split.train) & LESION_FREE, seed
        assert set(split.val) - LESION_FREE and set(split.train) - LESION_FREE, seed


def test_stratum_uses_original_resolution_labels(tmp_path):
    """A one-voxel lesion vanishes at a small image_size; the split (shared by every image_size) must not care."""
    ids = [f"c{i}" for i in range(8)]
    cases = {}
    for i, cid in enumerate(ids):
        raw, label = tiny_case(i, shape=(64, 64, 2))
        label[:] = 0
        if i < 3:
            label[20:40, 20:40, :] = 1
        cases[cid] = (raw, label)
    cases["c3"][1][2, 2, 0] = 1  # even index: pixel-centre nearest neighbour 64 -> 32 keeps only odd rows and columns
    task = make_kaggle_task(tmp_path / "data", cases)
    small = prepare(task, tmp_path / "small", image_size=32, seed=0, val_fraction=0.4)
    large = prepare(task, tmp_path / "large", image_size=64, seed=0, val_fraction=0.4)
    assert small[0].fg_per_slice("c3").sum() == 0 and large[0].fg_per_slice("c3").sum() == 1
    a, b = (load_or_create_split(*p) for p in (small, large))
    assert a.path.read_bytes() == b.path.read_bytes()


# --------------------------------------------------------------------------------------- leakage checks


def test_check_no_group_overlap_names_the_group():
    split = Split(train=["p7_a", "p1_a"], val=["p7_b"], test=[], path=Path("splits.json"), fold=0,
                  groups={"p7_a": "p7", "p7_b": "p7", "p1_a": "p1"})
    with pytest.raises(LeakageError, match=r"patient group 'p7'.*train.*val"):
        check_no_group_overlap(split)
    same_case = Split(train=["a"], val=[], test=["a"], path=Path("splits.json"), fold=0, groups={})
    with pytest.raises(LeakageError, match="'a'"):
        check_no_group_overlap(same_case)
    check_no_group_overlap(Split(train=["p1_a"], val=["p7_b"], test=[], path=Path("s"), fold=0,
                                 groups={"p1_a": "p1", "p7_b": "p7"}))


def test_a_tampered_splits_file_is_refused(tmp_path):
    ids = ["p1_a", "p1_b", "p2_a", "p3_a", "p4_a", "p5_a"]
    task = make_task(tmp_path / "data", ids)
    cache, source, split_cfg = prepare(task, tmp_path / "cache", group_regex=r"^(p\d+)_", val_fraction=0.3)
    split = load_or_create_split(cache, source, split_cfg)
    table = json.loads(split.path.read_text())
    fold = table["folds"][0]
    moved = "p1_b" if "p1_b" in fold["train"] else "p1_a"  # one file of patient p1 moved to the other side
    src, dst = ("train", "val") if moved in fold["train"] else ("val", "train")
    fold[src].remove(moved)
    fold[dst].append(moved)
    split.path.write_text(json.dumps(table))
    with pytest.raises(LeakageError, match="patient group 'p1'"):
        load_or_create_split(cache, source, split_cfg)


def test_find_identical_slices_reports_a_slice_shared_across_sides(tmp_path):
    raw_a, label_a = tiny_case(0, shape=(8, 8, 3))
    raw_b, label_b = tiny_case(1, shape=(8, 8, 3))
    raw_b[:, :, 1] = raw_a[:, :, 0]  # the same scan slice in two cases
    raw_a[:, :, 2] = raw_b[:, :, 2] = 0  # identical but blank (air): not reported
    task = make_kaggle_task(tmp_path / "data", {"A": (raw_a, label_a), "B": (raw_b, label_b)})
    cache = prepare(task, tmp_path / "cache")[0]
    split = Split(train=["A"], val=["B"], test=[], path=Path("splits.json"), fold=0, groups={})
    found = find_identical_slices(cache, split)
    assert found["identical_slices_across_splits"] == 1
    assert found["examples"] == [{"a": {"split": "train", "case": "A", "slice": 0},
                                  "b": {"split": "val", "case": "B", "slice": 1}}]
    one_side = Split(train=["A", "B"], val=[], test=[], path=Path("splits.json"), fold=0, groups={})
    assert find_identical_slices(cache, one_side)["identical_slices_across_splits"] == 0


def test_split_accessors():
    split = Split(train=["b", "a"], val=["c"], test=[], path=Path("s"), fold=0, groups={})
    assert split.cases("train") == ["b", "a"] and split.cases("test") == []
    moved = Split(train=["b"], val=["c", "a"], test=[], path=Path("s"), fold=0, groups={})
    assert split.hash == Split(train=["a", "b"], val=["c"], test=[], path=Path("t"), fold=1, groups={}).hash
    assert split.hash != moved.hash
    with pytest.raises(DataError, match="unknown split 'bogus'"):
        split.cases("bogus")


# --------------------------------------------------------------------------------------- unchanged hashes


# Measured on the session's tiny synthetic task before dataset.split.groups_file and dataset.mask_threshold existed:
# splits.json is a stable hash of files and settings (no CPU numerics), so any change here re-splits existing runs.
BEFORE_GROUPS_FILE = {
    "holdout": ({"seed": 0, "val_fraction": 0.25}, "f028ce1e2364", "splits-a0d11b0824ab",
                "25529adef719fbae0a1c858430cdc43a483e9cced465abca574b15b87017fc86"),
    "kfold": ({"seed": 1, "n_folds": 3, "fold": 1, "test_fraction": 0.2}, "b0628fffb40b", "splits-ac703cda4733",
              "cc9bb93ba7643994f2e9829b3995ec4fc72e24806941c86a681a15b4f064ff0c"),
}


@pytest.mark.parametrize("name", sorted(BEFORE_GROUPS_FILE))
def test_configs_without_the_new_keys_keep_their_split_and_hashes(tiny_cfg, name):
    import hashlib

    split_settings, split_hash, split_dir, file_sha = BEFORE_GROUPS_FILE[name]
    cfg = tiny_cfg(dataset={"split": split_settings})
    dumped = cfg.to_dict()["dataset"]
    assert "mask_threshold" not in dumped and "groups_file" not in dumped["split"]  # unset: out of the config hash
    source = open_source_from_config(cfg.dataset)
    cache = build_cache(cfg.dataset, source, progress=False)
    assert cache.root.name == "prep-9f330165051e"  # the cache settings hash
    split = load_or_create_split(cache, source, cfg.dataset.split)
    assert (split.hash, split.path.parent.name) == (split_hash, split_dir)
    assert hashlib.sha256(split.path.read_bytes()).hexdigest() == file_sha
    assert "groups_file" not in json.loads(split.path.read_text())["settings"]


# --------------------------------------------------------------------------------------- groups file


def write_groups(path: Path, groups: dict[str, str], header: str = "case_id,group") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header] + [f"{c},{g}" for c, g in groups.items()]) + "\n")
    return path


SEQUENCES = {cid: f"seq{int(cid) // 4}" for cid in IDS}  # 4 consecutive cases per group: "000".."003" -> seq0


def test_groups_file_keeps_each_group_on_one_side(task, tmp_path):
    groups_file = write_groups(tmp_path / "groups.csv", SEQUENCES)
    for seed in range(4):
        split = split_for(task, tmp_path / "cache", groups_file=str(groups_file), seed=seed, val_fraction=0.3)
        assert split.groups == SEQUENCES
        side = {cid: name for name in ("train", "val", "test") for cid in split.cases(name)}
        assert sorted(side) == IDS
        for group in set(SEQUENCES.values()):
            assert len({side[c] for c in IDS if SEQUENCES[c] == group}) == 1, (seed, group)
    settings = json.loads(split.path.read_text())["settings"]
    assert settings["groups_file"] == "groups.csv"  # its name; the groups themselves are in the table


def test_groups_file_split_is_the_same_from_any_checkout_and_changes_with_the_groups(task, tmp_path):
    a = split_for(task, tmp_path / "cache_a", groups_file=str(write_groups(tmp_path / "a" / "g.csv", SEQUENCES)))
    b = split_for(task, tmp_path / "cache_b", groups_file=str(write_groups(tmp_path / "b" / "g.csv", SEQUENCES)))
    assert a.path.parent.name == b.path.parent.name and a.path.read_bytes() == b.path.read_bytes()
    regrouped = dict(SEQUENCES, **{"000": "seq3"})  # an edited groups file is a new split, not the old one reused
    c = split_for(task, tmp_path / "cache_a", groups_file=str(write_groups(tmp_path / "a" / "g.csv", regrouped)))
    assert c.path != a.path and c.groups["000"] == "seq3"
    plain = split_for(task, tmp_path / "cache_a")
    assert plain.path != a.path and plain.groups == {cid: cid for cid in IDS}


@pytest.mark.parametrize("content, message", [
    ("case_id,group\n" + "".join(f"{c},g{c}\n" for c in IDS if c != "007"),
     r"g\.csv \(dataset\.split\.groups_file\): case '007' \(007\.nii\) has no group \(1 case\(s\) without one: 007\)"),
    ("case_id,group\n" + "".join(f"{c},g{c}\n" for c in IDS[3:]),
     r"case '000' \(000\.nii\) has no group \(3 case\(s\) without one: 000, 001, 002\); every case needs a line "
     r"'000,<group>'"),
    ("case_id,group\n" + "".join(f"{c},g{c}\n" for c in IDS) + "0007,g7\n",
     r"g\.csv \(dataset\.split\.groups_file\): case '0007' is not in the dataset"),
    ("case,sequence\n000,a\n", r"g\.csv \(dataset\.split\.groups_file\): line 1: expected the header 'case_id,group', "
                               r"got 'case,sequence'"),
    ("", r"line 1: expected the header 'case_id,group', got 'an empty file'"),
    ("case_id,group\n000,a\n001\n", r"line 3: expected 'case_id,group', got '001'"),
    ("case_id,group\n000,a\n\n000,b\n", r"line 4: case '000' listed again \(first on line 2\)"),
])
def test_groups_file_errors_are_one_line_naming_the_file_and_the_case(task, tmp_path, content, message):
    (tmp_path / "g.csv").write_text(content)
    with pytest.raises(DataError, match=message) as err:
        split_for(task, tmp_path / "cache", groups_file=str(tmp_path / "g.csv"))
    assert "\n" not in str(err.value)


def test_missing_groups_file_is_named(task, tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.csv \(dataset\.split\.groups_file\): not found"):
        split_for(task, tmp_path / "cache", groups_file=str(tmp_path / "nowhere.csv"))


# --------------------------------------------------------------------------------------- stable under additions


def _stable_cfg(**split):
    return config_from_dict({"dataset": {"split": {"method": "stable", **split}}}, resolve=False).dataset.split


@pytest.mark.parametrize("split", [{"seed": 0, "val_fraction": 0.25},
                                   {"seed": 3, "val_fraction": 0.2, "test_fraction": 0.1},
                                   {"seed": 1, "val_fraction": 0.2, "n_folds": 5, "fold": 2}])
def test_stable_rule_never_moves_a_case_when_cases_are_added(split):
    from medseg.data.split import make_split_table, split_from_table

    cfg = _stable_cfg(**split)
    before_ids = [f"{i:03d}" for i in range(40)]
    after_ids = before_ids + [f"new{i}" for i in range(10)]
    has_fg = {cid: i % 4 != 1 for i, cid in enumerate(after_ids)}

    def sides(ids):
        table = make_split_table({c: f"{c}.nii" for c in ids}, has_fg, cfg)
        s = split_from_table(table, Path("splits.json"), cfg.fold)
        side = {c: name for name in ("train", "val", "test") for c in s.cases(name)}
        folds = {c: i for i, f in enumerate(table["folds"]) for c in f["val"]}
        return side, folds

    before, before_folds = sides(before_ids)
    after, after_folds = sides(after_ids)
    assert sorted(after) == sorted(after_ids)
    moved = [c for c in before_ids if before[c] != after[c] or before_folds.get(c) != after_folds.get(c)]
    assert moved == []
    # the rule depends on (seed, group) alone: the order in which cases are listed changes nothing
    assert sides(list(reversed(after_ids)))[0] == after


def test_stable_rule_shares_follow_the_fractions_within_the_stated_tolerance():
    """Each group's side is a draw: for n groups a share is within about 3 sqrt(p(1-p)/n) of its fraction (n=2000:
    ±0.027 for 0.2); per stratum too, since the hash ignores the stratum."""
    import math

    from medseg.data.split import make_split_table

    ids = [f"case{i:05d}" for i in range(2000)]
    has_fg = {cid: i % 4 != 0 for i, cid in enumerate(ids)}
    cfg = _stable_cfg(seed=7, val_fraction=0.2, test_fraction=0.1)
    table = make_split_table({c: c for c in ids}, has_fg, cfg)
    sides = {"val": set(table["folds"][0]["val"]), "test": set(table["test"]), "train": set(table["folds"][0]["train"])}
    for name, frac in (("val", 0.2), ("test", 0.1), ("train", 0.7)):
        for stratum in (True, False):
            members = [c for c in ids if has_fg[c] is stratum]
            share = len(sides[name] & set(members)) / len(members)
            assert abs(share - frac) <= 3 * math.sqrt(frac * (1 - frac) / len(members)), (name, stratum, share)


def test_the_rule_is_part_of_the_split_key_and_ordered_stays_the_default(task, tmp_path):
    ordered = split_for(task, tmp_path / "c", seed=0, val_fraction=0.2)
    stable = split_for(task, tmp_path / "c", seed=0, val_fraction=0.2, method="stable")
    assert ordered.path != stable.path  # a changed rule is a new split file, never a reassignment in place
    assert "method" not in json.loads(ordered.path.read_text())["settings"]  # unset: old keys and hashes kept
    assert json.loads(stable.path.read_text())["settings"]["method"] == "stable"
    with pytest.raises(Exception, match="method"):
        _stable_cfg(method="random")
