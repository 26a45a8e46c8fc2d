"""Know before you wait: ``python -m medseg.data check`` gives the cache's size on disk and build time before the build
(slice counts from the headers, the per-slice cost of the first case, the build's own worker rule), and ``--estimate``
stops there with nothing built. Sizes are checked byte for byte against caches built afterwards; times only as the
figures they are derived from (no test depends on the CPU's speed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.config import DatasetConfig, SplitConfig
from medseg.data import check
from medseg.data.cache import (
    CaseTiming,
    build_cache,
    build_processes,
    cache_bytes,
    estimate_build,
    npy_file_bytes,
    time_first_case,
)
from medseg.data.sources import open_source_from_config
from medseg.data.workers import available_cores
from tests.fixtures import EVALSEG_DIR, make_kaggle_task, tiny_case

SLICES = {"001": 3, "002": 7, "003": 5, "004": 9}


@pytest.fixture
def task(tmp_path) -> Path:
    cases = {cid: tiny_case(seed, shape=(20, 24, n)) for seed, (cid, n) in enumerate(SLICES.items())}
    return make_kaggle_task(tmp_path / "data", cases)


def dataset_cfg(tmp_path: Path, data: Path, **changes) -> DatasetConfig:
    fields = dict(format="kaggle", path=str(data), labels=[1], image_size=32, cache_dir=str(tmp_path / "cache"),
                  split=SplitConfig(seed=0, val_fraction=0.25))
    return DatasetConfig(**(fields | changes))


def prep_dirs(cfg) -> list[Path]:
    return sorted(Path(cfg.cache_dir).glob("*/prep-*"))


def files_bytes(cache) -> int:
    return sum(p.stat().st_size for p in cache.root.glob("*.npy"))


# --------------------------------------------------------------------------------------------- by hand


def test_sizes_and_times_by_hand():
    assert npy_file_bytes((908, 512, 512), np.float16) == 908 * 512 * 512 * 2 + 128  # the .npy header: 128 bytes
    assert cache_bytes([10], 32) == 10 * 32 * 32 * (2 + 1) + 2 * 128  # float16 image + uint8 label per case
    timing = CaseTiming("a", slices=10, seconds=2.0, processes=4)  # 0.2 s per slice
    slices = {"a": 10, "b": 30, "c": 50}
    auto = estimate_build(DatasetConfig(image_size=32), slices, timing)
    assert auto.seconds == pytest.approx(0.2 * (10 + 80 / 4))  # auto: the first case here, the rest in 4 processes
    fixed = estimate_build(DatasetConfig(image_size=32, cache_workers=4), slices, timing)
    assert fixed.seconds == pytest.approx(0.2 * 90 / 4)  # every case in the workers
    assert (fixed.cases, fixed.slices, fixed.bytes) == (3, 90, cache_bytes(slices.values(), 32))
    assert (fixed.seconds_per_slice, fixed.measured_on, fixed.exists) == (pytest.approx(0.2), "a", False)

    # Task001 at the scale of the issue: 87 cases, 35,012 slices at 256 px, two processes.
    task001 = {"cases": 87, "slices": 35_012, "bytes": 35_012 * 256 * 256 * 3 + 87 * 2 * 128, "image_size": 256,
               "processes": 2, "seconds": 0.071 * 35_012 / 2, "seconds_per_slice": 0.071, "measured_on": "001",
               "exists": False, "path": None}
    assert check.estimate_line(task001) == ("cache: 87 cases, 35,012 slices -> 6.4 GiB at 256 px; about 21 min to "
                                            "build with 2 processes (0.071 s per slice measured on case 001)")


def test_processes_follow_the_builds_rule(task, tmp_path, monkeypatch):
    monkeypatch.setattr("medseg.data.cache.PARALLEL_MIN_SECONDS", 8.0)  # the shipped value (conftest sets infinity)
    assert [build_processes(3, 10), build_processes(3, 2), build_processes(None, 1, 100.0)] == [3, 2, 1]
    assert build_processes(None, 10, 0.5) == 1  # 9 cases left x 0.5 s: under PARALLEL_MIN_SECONDS (8 s)
    assert build_processes(None, 10, 1.0) == min(available_cores(), 9)  # 9 s: the cores, capped by the cases left

    timings: list[CaseTiming] = []
    two = dataset_cfg(tmp_path, task, cache_dir=str(tmp_path / "two"), cache_workers=2)
    built = build_cache(two, progress=False, on_first_case=timings.append)
    assert [t.processes for t in timings] == [built.manifest["build"]["processes"]] == [2]
    assert timings[0].slices == SLICES[timings[0].case_id] and timings[0].seconds > 0  # made in a worker
    assert time_first_case(two, open_source_from_config(two)).processes == 2

    monkeypatch.setattr("medseg.data.cache.PARALLEL_MIN_SECONDS", 0.0)  # auto, and every task worth processes
    auto = dataset_cfg(tmp_path, task, cache_dir=str(tmp_path / "auto"))
    timings.clear()
    built = build_cache(auto, progress=False, on_first_case=timings.append)
    assert [t.processes for t in timings] == [built.manifest["build"]["processes"]] == [min(available_cores(), 3)]
    assert timings[0].case_id == "001"  # auto: the first case, made and timed in this process
    assert time_first_case(auto, open_source_from_config(auto)).processes == min(available_cores(), 3)


# --------------------------------------------------------------------------------------------- the audit


def test_the_audit_reports_the_estimate_after_the_first_case_then_the_real_figures(task, tmp_path):
    cfg = dataset_cfg(tmp_path, task)
    seen: list[tuple[dict, list[str]]] = []

    def on_estimate(est: dict) -> None:  # what the build has written when the line is printed
        seen.append((est, sorted(p.name for p in Path(cfg.cache_dir).glob("*/*/*.npy"))))

    report = check.audit(cfg, on_estimate=on_estimate)
    (est, written), = seen
    assert written == ["001.img.npy", "001.lbl.npy"]  # the first case only, in the build's temporary folder
    cache = build_cache(cfg, progress=False)  # the one the audit built
    assert report["cache_estimate"] == est and report["cache"]["path"] == str(cache.root)
    assert (est["cases"], est["slices"], est["image_size"]) == (4, sum(SLICES.values()), 32)
    assert est["bytes"] == files_bytes(cache)  # exact
    assert est["slices"] == sum(cache.n_slices(c) for c in cache.case_ids)
    assert est["processes"] == cache.manifest["build"]["processes"] == 1 and est["measured_on"] == "001"
    assert est["seconds"] > 0 and est["seconds"] == pytest.approx(est["seconds_per_slice"] * est["slices"])
    assert check.estimate_line(est) in check.format_report(report)

    seen.clear()
    again = check.audit(cfg, on_estimate=on_estimate)
    (real, _), = seen
    assert real == again["cache_estimate"] and real["exists"] and real["path"] == str(cache.root)
    assert (real["bytes"], real["slices"], real["seconds"]) == (est["bytes"], est["slices"],
                                                                cache.manifest["build_seconds"])
    assert check.estimate_line(real).startswith("cache exists: 4 cases, 24 slices, 73.0 KiB at 32 px; built in ")


def test_estimate_option_prints_the_line_and_builds_nothing(task, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"dataset: {{path: {task.parent}, labels: [1], image_size: 32, "
                      f"cache_dir: {tmp_path / 'cache'}}}\noutput: {{run_dir: {tmp_path / 'runs'}}}\n")
    out = tmp_path / "estimate.json"
    assert check.main(["--config", str(config), "--estimate", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    report = json.loads(out.read_text())
    est = report["cache_estimate"]
    assert captured.err.strip() == check.estimate_line(est) and captured.out == ""
    assert est["slices"] == sum(SLICES.values()) and est["measured_on"] == "001" and est["seconds"] > 0
    cfg = dataset_cfg(tmp_path, task.parent)
    assert prep_dirs(cfg) == [] and list(Path(cfg.cache_dir).iterdir()) == []  # nothing built, nothing left

    cache = build_cache(cfg, progress=False)
    assert files_bytes(cache) == est["bytes"]
    real = check.estimate(cfg)  # now the real figures of the cache that exists
    assert real["exists"] and real["path"] == str(cache.root) and real["bytes"] == est["bytes"]


def test_estimate_of_real_ct_is_the_built_size(tmp_path):
    """The real MSD spleen crop (164x166x26) at 64 px: estimated bytes == the files the build writes."""
    spleen = EVALSEG_DIR.parent / "msd-spleen-crop"
    if not spleen.is_dir():
        pytest.skip(f"MSD spleen crop not found at {spleen} (check out ../shared beside the repo)")
    cfg = dataset_cfg(tmp_path, spleen, format="msd", image_size=64)
    est = check.estimate(cfg)
    assert (est["cases"], est["slices"]) == (1, 26) and prep_dirs(cfg) == []
    assert est["bytes"] == files_bytes(build_cache(cfg, progress=False)) == 26 * 64 * 64 * 3 + 2 * 128
