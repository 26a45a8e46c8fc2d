"""``python -m medseg.data check``: the data audit, run as the user runs it on tiny tasks written into tmp_path.

CLI runs pay for the config's model validation (it imports torch), so only the end-to-end cases go through a
subprocess; the rest call ``medseg.data.check.audit`` with a ``DatasetConfig`` built in the test.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medseg.config import DatasetConfig, SplitConfig
from medseg.data import check
from medseg.data.evalseg_pickle import write_label_pickle
from medseg.data.sources import KaggleEvalsegSource
from medseg.data.split import Split, check_no_group_overlap, split_from_table
from medseg.errors import DataError
from tests.fixtures import SPACING, make_kaggle_task, patch_zip_member

REPO = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 6)
IDS = ["001", "002", "003", "004", "005", "11"]  # strings, one not zero-padded: ids are never cast to int
EMPTY = "004"  # the fixture case without foreground


# --------------------------------------------------------------------------------------------- fixtures


def tiny_volume(seed: int, lesions: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(raw int16 CT stored values, uint8 label) of SHAPE; the test NIfTI scaling maps raw 0..600 to -1024..176 HU."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 600, size=SHAPE, dtype=np.int16)
    label = np.zeros(SHAPE, np.uint8)
    for i in range(lesions):
        label[4 + 10 * i:7 + 10 * i, 5:9, 1:3] = 1
    return raw, label


def tiny_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """IDS -> volumes: lesion counts 1, 2, 1, 0 (EMPTY), 1, 2."""
    return {cid: tiny_volume(i, lesions=0 if cid == EMPTY else 1 + i % 2) for i, cid in enumerate(IDS)}


def dataset_cfg(tmp_path: Path, data: Path, **changes) -> DatasetConfig:
    """The dataset section a config in tmp_path resolves to (absolute paths, as load_config makes them)."""
    fields = dict(format="kaggle", path=str(data), labels=[1], image_size=32, cache_dir=str(tmp_path / "cache"),
                  split=SplitConfig(seed=0, val_fraction=0.25))
    return DatasetConfig(**(fields | changes))


def write_config(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        "dataset:\n"
        f"  path: {data}\n"
        "  labels: [1]\n"
        "  image_size: 32\n"
        f"  cache_dir: {tmp_path / 'cache'}\n"
        "  split: {seed: 0, val_fraction: 0.25}\n"
        "output:\n"
        f"  run_dir: {tmp_path / 'runs'}\n"
    )
    return path


def run_check(tmp_path: Path, config: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the CLI from tmp_path; returns the process and the --json report."""
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "medseg.data", "check", "--config", str(config), "--json", str(out),
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, json.loads(out.read_text())


def sample_sd(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summary_line(stdout: str) -> dict:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("summary: ")
    return json.loads(last.removeprefix("summary: "))


def rows(report: dict) -> dict[str, dict]:
    return {row["case_id"]: row for row in report["cases"]}


# --------------------------------------------------------------------------------------------- end to end


def test_clean_synthetic_task_exits_0_with_split_stats_computed_independently(tmp_path):
    from medseg.data.cache import build_cache
    from medseg.data.split import load_or_create_split
    from medseg.data.synthetic import generate_task

    task = generate_task(tmp_path / "data", cases=5, size=32, slices=(5, 7), seed=3)
    proc, report = run_check(tmp_path, write_config(tmp_path, tmp_path / "data"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["schema"] == check.SCHEMA and report["errors"] == []
    assert summary_line(proc.stdout) == report["summary"] and report["summary"]["exit_code"] == 0
    assert report["summary"]["loaded"] == 5 and all(list(r) == list(check.CASE_KEYS) for r in report["cases"])
    assert report["dataset"]["root"] == str(task) and report["identical_slices"]["identical_slices_across_splits"] == 0

    # Independently: the same split (the saved file is reused), statistics from the decoded volumes themselves.
    cfg = dataset_cfg(tmp_path, tmp_path / "data")
    source = KaggleEvalsegSource(task)
    split = load_or_create_split(build_cache(cfg, source, progress=False), source, cfg.split)
    assert report["split"]["hash"] == split.hash
    by_case, fg_by_side = rows(report), {}
    for side in ("train", "val", "test"):
        fg, means, lesions, n_slices, fg_slices = [], [], 0, 0, 0
        for cid in split.cases(side):
            case = source.load(cid)
            fg_mask = case.label > 0
            fg.append(fg_mask.mean())
            means.append(case.image.astype(np.float64).mean())  # 32 px: the manifest's sample is the whole volume
            n_components = ndimage.label(fg_mask, structure=np.ones((3, 3, 3)))[1]
            lesions += n_components
            n_slices += case.image.shape[2]
            fg_slices += int(fg_mask.any(axis=(0, 1)).sum())
            row = by_case[cid]
            assert row["split"] == side and row["n_components"] == n_components
            assert row["shape"] == list(case.image.shape) and row["fg_voxels"] == int(fg_mask.sum())
            assert row["intensity"]["min"] == case.image.min() and row["intensity"]["max"] == case.image.max()
        stats = report["splits"][side]
        assert stats["n_cases"] == len(fg) and stats["n_slices"] == n_slices and stats["n_fg_slices"] == fg_slices
        assert stats["n_lesions"] == lesions and stats["lesion_free_cases"] == sum(f == 0 for f in fg)
        if fg:
            assert stats["fg_fraction"] == pytest.approx({"mean": np.mean(fg), "sd": sample_sd(fg)})
            assert stats["intensity_mean"] == pytest.approx({"mean": np.mean(means), "sd": sample_sd(means)}, rel=1e-6)
        fg_by_side[side] = np.array(fg)
    assert report["splits"]["train"]["n_cases"] + report["splits"]["val"]["n_cases"] == 5
    expected_smd = check.standardized_mean_difference(fg_by_side["train"], fg_by_side["val"])
    assert report["comparisons"]["val"]["fg_fraction_smd"] == pytest.approx(expected_smd)
    # The synthetic twin holds lesion-free cases: each is warned about, by id.
    empty = {cid for cid, r in by_case.items() if r["fg_voxels"] == 0}
    assert empty and {w["case"] for w in report["warnings"] if w["kind"] == "empty_case"} == empty
    assert "cases (5)" in proc.stdout and "train" in proc.stdout


def _unknown_label(task: Path, cases: dict, cid: str) -> None:
    label = cases[cid][1].copy()
    label[20:22, 20:22, 4] = 2  # metadata lists 0 and 1 only
    write_label_pickle(task / "GroundTruth" / f"{cid}.pkl", label, SPACING)


def _shape_mismatch(task: Path, cases: dict, cid: str) -> None:
    write_label_pickle(task / "GroundTruth" / f"{cid}.pkl", cases[cid][1][:, :, :5], SPACING)  # CT has 6 slices


def _spacing_mismatch(task: Path, cases: dict, cid: str) -> None:
    write_label_pickle(task / "GroundTruth" / f"{cid}.pkl", cases[cid][1], (0.8, 0.75, 5.0))  # header says 2.5 mm


FAULTS = {"unknown_label": ("001", _unknown_label), "shape_mismatch": ("002", _shape_mismatch),
          "spacing_mismatch": ("003", _spacing_mismatch)}  # kind -> (case it is put into, how)


def faulty_task(root: Path, kinds) -> tuple[Path, dict]:
    cases = tiny_cases()
    task = make_kaggle_task(root, cases)
    for kind in kinds:
        cid, patch = FAULTS[kind]
        patch(task, cases, cid)
    return task, cases


def test_faulty_cases_exit_1_each_named_on_one_line_and_the_others_still_audited(tmp_path):
    task, cases = faulty_task(tmp_path / "data", FAULTS)
    proc, report = run_check(tmp_path, write_config(tmp_path, tmp_path / "data"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert sorted((e["kind"], e["case"]) for e in report["errors"]) == sorted((k, c) for k, (c, _) in FAULTS.items())
    for kind, (cid, _) in FAULTS.items():
        line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith(f"error [{kind}]"))
        assert f"case {cid}" in line and str(task) in line  # one line naming the file and the case
    assert summary_line(proc.stdout)["errors_by_kind"] == {kind: 1 for kind in FAULTS}
    by_case = rows(report)
    assert list(by_case) == sorted(IDS) and all(list(r) == list(check.CASE_KEYS) for r in report["cases"])
    not_loaded = {FAULTS["unknown_label"][0], FAULTS["shape_mismatch"][0]}
    assert {c for c, r in by_case.items() if r["status"] == "error"} == not_loaded
    for cid in set(IDS) - not_loaded:  # every other case is audited in full, the spacing mismatch included
        assert by_case[cid]["status"] == "ok" and by_case[cid]["fg_voxels"] == cases[cid][1].sum()
        assert by_case[cid]["n_components"] == (0 if cid == EMPTY else 1 + IDS.index(cid) % 2)
    assert by_case["003"]["gt_voxelsize"] == [0.8, 0.75, 5.0] and by_case["003"]["spacing"] == pytest.approx(SPACING)
    assert [w["case"] for w in report["warnings"] if w["kind"] == "empty_case"] == [EMPTY]
    # Cases that do not load: no cache (it needs every case), so no split; nothing half-written is left.
    assert report["cache"] is None and report["splits"] is None
    assert not [p for p in (tmp_path / "cache").glob("*/*") if p.is_dir()]  # (the build's lock file stays)


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_each_fault_alone_is_a_hard_error(tmp_path, kind):
    faulty_task(tmp_path / "data", [kind])
    report = check.audit(dataset_cfg(tmp_path, tmp_path / "data"))
    cid = FAULTS[kind][0]
    assert report["summary"]["exit_code"] == 1
    assert [(e["kind"], e["case"]) for e in report["errors"]] == [(kind, cid)]
    assert sum(r["status"] == "ok" for r in report["cases"]) == len(IDS) - (kind != "spacing_mismatch")
    if kind == "spacing_mismatch":  # the case loads: cache, split and split tables are made
        assert sum(s["n_cases"] for s in report["splits"].values()) == len(IDS)
        assert all(r["split"] in ("train", "val") for r in report["cases"])


# --------------------------------------------------------------------------------------------- in process


def test_unpaired_and_corrupt_cases_are_all_listed_and_block_the_cache(tmp_path):
    cases = tiny_cases()
    extra_gt, extra_ct = tiny_volume(20)[1], tiny_volume(21)[0]
    task = make_kaggle_task(tmp_path / "data", cases, gt_only={"009": extra_gt}, ct_only={"010": extra_ct})
    patch_zip_member(task / "CT.zip", "002.nii", crc=0)
    report = check.audit(dataset_cfg(tmp_path, tmp_path / "data"))
    assert sorted((e["kind"], e["case"]) for e in report["errors"]) == [
        ("corrupt_file", "002"), ("unpaired", "009"), ("unpaired", "010")]
    assert report["summary"]["exit_code"] == 1 and report["summary"]["loaded"] == len(IDS) - 1
    assert report["cache"] is None and not (tmp_path / "cache").exists()
    assert all("case" in e["message"] and str(task) in e["message"] for e in report["errors"])

    # allow_missing: the user chose to skip unpaired cases, so they are warnings; the corrupt member is not.
    report = check.audit(dataset_cfg(tmp_path, tmp_path / "data", allow_missing=True))
    assert [(e["kind"], e["case"]) for e in report["errors"]] == [("corrupt_file", "002")]
    assert sorted(w["case"] for w in report["warnings"] if w["kind"] == "unpaired") == ["009", "010"]
    assert rows(report)["009"]["status"] == "skipped"


def test_a_case_that_fails_to_load_is_listed_under_the_kind_of_its_error_type(tmp_path, monkeypatch, caplog):
    """unsafe_pickle, load_error, bad_label, corrupt_file: the ``kind`` of the DataError subclass the reader raised.
    Each case is decoded once, the failing ones too; the skipped unpaired case is in the report, not in the log."""
    import collections
    import logging
    import pickle

    from medseg.data.evalseg_pickle import _evalseg_modules, dumps_label_pickle, load_segment_array

    cases = tiny_cases()
    task = make_kaggle_task(tmp_path / "data", cases, ct_only={"010": tiny_volume(21)[0]})
    gt = task / "GroundTruth"
    (gt / "001.pkl").write_bytes(pickle.dumps(collections.OrderedDict()))  # a global outside the allow-list
    (gt / "002.pkl").write_bytes(pickle.dumps([1, 2]))  # a readable pickle of something else
    sa = load_segment_array(data=dumps_label_pickle(cases["003"][1], SPACING))
    sa.segments[0].data = sa.segments[0].data.astype(np.int16) * 300  # no uint8 label value
    with _evalseg_modules():
        (gt / "003.pkl").write_bytes(pickle.dumps(sa, protocol=4))
    (gt / "005.pkl").write_bytes(b"\x1f\x8b" + b"x" * 20)  # gzip magic, then garbage
    loads: list[str] = []
    original = KaggleEvalsegSource.load
    monkeypatch.setattr(KaggleEvalsegSource, "load", lambda self, cid: loads.append(cid) or original(self, cid))
    with caplog.at_level(logging.WARNING):
        report = check.audit(dataset_cfg(tmp_path, tmp_path / "data", allow_missing=True))
    assert sorted((e["kind"], e["case"]) for e in report["errors"]) == [
        ("bad_label", "003"), ("corrupt_file", "005"), ("load_error", "002"), ("unsafe_pickle", "001")]
    assert {r["case_id"]: r["error"] for r in report["cases"] if r["status"] != "ok"} == {
        "001": "unsafe_pickle", "002": "load_error", "003": "bad_label", "005": "corrupt_file", "010": "unpaired"}
    assert sorted(loads) == sorted(IDS) and report["cache"] is None
    assert [w["case"] for w in report["warnings"] if w["kind"] == "unpaired"] == ["010"] and caplog.records == []


def test_each_case_is_decoded_once_whether_the_cache_is_built_or_reused(tmp_path, monkeypatch):
    make_kaggle_task(tmp_path / "data", tiny_cases())
    loads: list[str] = []
    original = KaggleEvalsegSource.load
    monkeypatch.setattr(KaggleEvalsegSource, "load", lambda self, cid: loads.append(cid) or original(self, cid))
    cfg = dataset_cfg(tmp_path, tmp_path / "data")
    first = check.audit(cfg)
    assert sorted(loads) == sorted(IDS) and first["cache"] is not None  # built while auditing
    loads.clear()
    second = check.audit(cfg)
    assert sorted(loads) == sorted(IDS)  # reused: the audit itself decodes each case once
    assert second["cache"]["path"] == first["cache"]["path"] and second["split"] == first["split"]
    assert second["cases"] == first["cases"] and second["splits"] == first["splits"]


def test_non_hounsfield_ct_is_a_warning(tmp_path):
    cases = tiny_cases()
    cases["002"] = (cases["002"][0] // 4 + 450, cases["002"][1])  # stored 450..599 -> -124..174 "HU"
    make_kaggle_task(tmp_path / "data", cases)
    report = check.audit(dataset_cfg(tmp_path, tmp_path / "data"), slices=False)
    assert report["summary"]["exit_code"] == 0 and report["identical_slices"] is None
    assert [w["case"] for w in report["warnings"] if w["kind"] == "non_hu"] == ["002"]


def test_group_overlap_is_caught_by_check_no_group_overlap_and_by_the_audit(tmp_path):
    make_kaggle_task(tmp_path / "data", tiny_cases())
    table = {"groups": {c: f"patient-{c}" for c in IDS}, "test": [],
             "folds": [{"train": ["001", "002", "004", "005", "11"], "val": ["003"]}]}
    clean = split_from_table(table, tmp_path / "splits.json", 0)
    check_no_group_overlap(clean)  # one group per case: no leakage
    assert check.group_overlaps(clean) == []

    # Cases 001 (train) and 003 (val) are one patient: split_from_table refuses such a table ...
    merged = dict(table["groups"], **{"001": "patient-A", "003": "patient-A"})
    with pytest.raises(DataError, match="patient group 'patient-A'"):
        split_from_table(dict(table, groups=merged), tmp_path / "splits.json", 0)
    # ... and a Split made by hand past that check is reported by the audit, with both sides listed.
    leaky = dataclasses.replace(clean, groups=merged)
    with pytest.raises(DataError, match="leakage"):
        check_no_group_overlap(leaky)
    assert check.group_overlaps(leaky) == [{"group": "patient-A", "sides": {"train": ["001"], "val": ["003"]}}]
    report = check.audit(dataset_cfg(tmp_path, tmp_path / "data"), split=leaky)
    assert report["summary"]["exit_code"] == 1
    assert [(e["kind"], e["group"], e["sides"]) for e in report["errors"]] == [
        ("leakage", "patient-A", {"train": ["001"], "val": ["003"]})]
    assert rows(report)["003"]["split"] == "val"


def test_a_hand_edited_splits_file_with_leakage_is_a_hard_error(tmp_path):
    make_kaggle_task(tmp_path / "data", tiny_cases())
    cfg = dataset_cfg(tmp_path, tmp_path / "data")
    first = check.audit(cfg)
    assert first["summary"]["exit_code"] == 0
    path = Path(first["split"]["path"])
    table = json.loads(path.read_text())
    train_case, val_case = table["folds"][0]["train"][0], table["folds"][0]["val"][0]
    table["groups"][val_case] = table["groups"][train_case]
    path.write_text(json.dumps(table))
    report = check.audit(cfg)
    assert [e["kind"] for e in report["errors"]] == ["leakage"] and report["summary"]["exit_code"] == 1
    assert str(path) in report["errors"][0]["message"]


def test_group_regex_leak_in_a_split_made_without_groups(tmp_path):
    """A split whose stored groups are per case is checked against the config's group_regex too."""
    make_kaggle_task(tmp_path / "data", tiny_cases())
    split = Split(train=["001", "002", "11"], val=["003", "004", "005"], test=[], path=tmp_path / "s.json", fold=0,
                  groups={})
    # "001.nii" and "003.nii" -> patient "00"; "11.nii" -> "11"
    cfg = dataset_cfg(tmp_path, tmp_path / "data", split=SplitConfig(group_regex=r"^(\d\d)"))
    report = check.audit(cfg, split=split, slices=False)
    leaks = [e for e in report["errors"] if e["kind"] == "leakage"]
    assert [(e["group"], e["sides"]) for e in leaks] == [
        ("00", {"train": ["001", "002"], "val": ["003", "004", "005"]})]
    assert "dataset.split.group_regex" in leaks[0]["message"]


def test_a_missing_dataset_is_one_error_line(tmp_path):
    report = check.audit(dataset_cfg(tmp_path, tmp_path / "nowhere"))
    assert [e["kind"] for e in report["errors"]] == ["dataset"] and report["cases"] == []
    assert str(tmp_path / "nowhere") in report["errors"][0]["message"]
    assert [line for line in check.format_report(report).splitlines() if "error [" in line] == [
        f"  error [dataset] {report['errors'][0]['message']}"]


# --------------------------------------------------------------------------------------------- hand-computed


def test_standardized_mean_difference_by_hand():
    smd = check.standardized_mean_difference
    assert smd(np.array([1.0, 2.0, 3.0]), np.array([3.0, 4.0, 5.0])) == pytest.approx(2.0)  # diff 2, pooled SD 1
    # pooled variance ((3-1)*1 + (1-1)*0) / (3+1-2) = 1: one val case against train's SD
    assert smd(np.array([1.0, 2.0, 3.0]), np.array([2.5])) == pytest.approx(0.5)
    assert smd(np.array([1.0]), np.array([2.0])) is None  # no spread to standardise by
    assert smd(np.array([1.0, 1.0]), np.array([1.0])) == 0.0
    assert smd(np.array([1.0, 1.0]), np.array([2.0])) == float("inf")


def test_components_intensity_and_spacing_helpers_by_hand():
    label = np.zeros((8, 8, 4), np.uint8)
    label[1:3, 1:3, 1] = 1
    label[3, 3, 2] = 1  # touches the first box only at a corner: same 26-connected lesion
    label[6, 6, 0] = 2
    assert check.count_components(label) == 2 and check.count_components(np.zeros_like(label)) == 0
    image = np.arange(8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4)
    stats = check.intensity_stats(image)
    assert stats == pytest.approx({"min": 0.0, "max": 255.0, "mean": image.mean(), "std": image.std()})
    assert not check.spacing_disagrees((0.675781, 0.675781, 5.0), (0.67578125, 0.67578125, 5.0))
    assert check.spacing_disagrees((0.8, 0.75, 2.5), (0.8, 0.75, 5.0))


# --------------------------------------------------------------------------------------------- groups file, scale


def test_groups_file_leak_in_a_split_made_without_groups_and_a_case_without_group(tmp_path):
    make_kaggle_task(tmp_path / "data", tiny_cases())
    groups = tmp_path / "groups.csv"
    groups.write_text("case_id,group\n" + "".join(f"{c},{'seqA' if c in ('001', '003') else 'seq' + c}\n" for c in IDS))
    split = Split(train=["001", "002", "11"], val=["003", "004", "005"], test=[], path=tmp_path / "s.json", fold=0,
                  groups={})
    cfg = dataset_cfg(tmp_path, tmp_path / "data", split=SplitConfig(groups_file=str(groups)))
    report = check.audit(cfg, split=split, slices=False)
    leaks = [e for e in report["errors"] if e["kind"] == "leakage"]
    assert [(e["group"], e["sides"]) for e in leaks] == [("seqA", {"train": ["001"], "val": ["003"]})]
    assert "dataset.split.groups_file" in leaks[0]["message"] and report["split"]["groups_file"] == str(groups)

    # the split the audit makes itself: every case needs a group, named when it has none
    groups.write_text("case_id,group\n" + "".join(f"{c},seq{c}\n" for c in IDS if c != "005"))
    report = check.audit(cfg, slices=False)
    assert [e["kind"] for e in report["errors"]] == ["split"] and report["summary"]["exit_code"] == 1
    assert "case '005' (005.nii) has no group" in report["errors"][0]["message"]


def _many_masks(root: Path, n: int, jpeg: set[int]) -> None:
    """n 2D cases; those in ``jpeg`` have a 0/255 mask saved as JPEG (values in between), the others as PNG."""
    from tests.fixtures import write_image

    mask = np.zeros((16, 16), np.uint8)
    mask[4:11, 5:12] = 255
    for i in range(1, n + 1):
        write_image(root / "images" / f"{i}.png", np.full((16, 16), 10 * (i % 20), np.uint8))
        write_image(root / "masks" / (f"{i}.jpg" if i in jpeg else f"{i}.png"), mask)


def test_repeated_errors_are_one_line_per_kind_unless_verbose(tmp_path, capsys):
    jpeg = {3, 7, 12, 20, 31}
    _many_masks(tmp_path / "data", 45, jpeg)
    cfg = dataset_cfg(tmp_path, tmp_path / "data", format="folders2d", labels=None)
    report = check.audit(cfg, slices=False)
    assert sorted(e["case"] for e in report["errors"]) == sorted(str(i) for i in jpeg)  # the JSON keeps every one
    assert {e["kind"] for e in report["errors"]} == {"unknown_label"}
    assert all(e["message"].endswith("set dataset.mask_threshold: 128") for e in report["errors"])

    text = check.format_report(report)
    lines = [ln for ln in text.splitlines() if ln.strip().startswith("error [")]
    assert len(lines) == 1  # one line for the kind: count, first files, the first message (which names the fix)
    assert lines[0].startswith("  error [unknown_label] x5: masks/12.jpg (case 12), masks/20.jpg (case 20), "
                               "masks/3.jpg (case 3) (+2 more; --verbose or --json lists them all); first: ")
    assert lines[0].endswith("set dataset.mask_threshold: 128")
    # 45 cases: the table lists the 5 that failed and sums up the 40 others in a line
    assert "cases (45)" in text and "40 loaded: shape 16x16x1 (40); spacing 1x1x1 (40)" in text
    assert sum(ln.strip().startswith(tuple(f"{i} " for i in jpeg)) for ln in text.splitlines()) == 5

    verbose = check.format_report(report, verbose=True)
    assert sorted(ln for ln in verbose.splitlines() if ln.strip().startswith("error [")) == sorted(
        f"  error [unknown_label] {e['message']}" for e in report["errors"])
    assert len([ln for ln in verbose.splitlines() if " ok " in ln or "ERROR" in ln]) == 45

    # with the threshold the same files load, and the CLI's --verbose lists every case
    config = tmp_path / "config.yaml"
    config.write_text(f"dataset: {{format: folders2d, path: {tmp_path / 'data'}, labels: [1], mask_threshold: 128, "
                      f"image_size: 32, cache_dir: {tmp_path / 'cache'}}}\noutput: {{run_dir: {tmp_path / 'runs'}}}\n")
    capsys.readouterr()
    assert check.main(["--config", str(config), "--verbose", "--no-slices", "--json", str(tmp_path / "r.json")]) == 0
    stdout = capsys.readouterr().out  # (in process: the end-to-end tests above pay for the subprocess)
    full = json.loads((tmp_path / "r.json").read_text())
    assert full["summary"]["loaded"] == 45 and full["errors"] == []
    assert len([ln for ln in stdout.splitlines() if ln.split()[2:3] == ["ok"]]) == 45
