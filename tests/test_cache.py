"""Slice cache: built once and reused, keyed by the settings that change pixels, half-written caches rebuilt,
failed builds leave nothing, concurrent builders agree, hand-checked windowing, label-preserving resize.

Tiny Kaggle-layout tasks (tests.fixtures) and real readers throughout; the only wrapper is a counter of
``source.load`` calls around a real source.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from medseg.config import config_from_dict
from medseg.data.cache import (
    SliceCache,
    build_cache,
    build_processes,
    dataset_dir_for,
    make_normaliser,
    preprocessing_settings,
    resize_slice,
)
from medseg.data.sources import open_source_from_config
from medseg.data.workers import available_cores, run_cases
from medseg.errors import DataError, ShapeMismatchError
from tests.fixtures import evalseg_dir, hu, interruptible, make_kaggle_task, tiny_case, write_nifti

IDS = ("021", "21", "101", "7")  # "021" and "21" are different cases


class CountingSource:
    """A real source whose ``load`` calls are recorded; ``fail_on=n`` raises on the n-th load (a crash midway)."""

    def __init__(self, source, fail_on: int | None = None):
        self._source = source
        self.fail_on = fail_on
        self.loads: list[str] = []
        self.alive_at_load: list[int] = []  # earlier cases still referenced when the next one is decoded
        self._returned: list[weakref.ref] = []

    def __getattr__(self, name):  # root, labels, modality, case_ids, fingerprint, file_of: the real ones
        return getattr(self._source, name)

    def load(self, case_id: str):
        self.loads.append(case_id)
        self.alive_at_load.append(sum(ref() is not None for ref in self._returned))
        if self.fail_on is not None and len(self.loads) == self.fail_on:
            raise RuntimeError(f"simulated crash while decoding case {case_id}")
        case = self._source.load(case_id)
        self._returned.append(weakref.ref(case))
        return case


def dataset_config(task: Path, cache_dir: Path, **dataset):
    raw = {"format": "kaggle", "path": str(task), "cache_dir": str(cache_dir), "image_size": 32, **dataset}
    return config_from_dict({"dataset": raw}, resolve=True).dataset


def counting(cfg, **kw) -> CountingSource:
    return CountingSource(open_source_from_config(cfg), **kw)


@pytest.fixture
def cases():
    return {cid: tiny_case(seed) for seed, cid in enumerate(IDS)}


@pytest.fixture
def task(tmp_path, cases) -> Path:
    return make_kaggle_task(tmp_path / "data", cases)


def prep_dirs(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.glob("*/prep-*") if p.is_dir())


# --------------------------------------------------------------------------------------- build and reuse


def test_built_once_then_reused_without_decoding(task, tmp_path, cases):
    cfg = dataset_config(task, tmp_path / "cache")
    first = counting(cfg)
    cache = build_cache(cfg, first, progress=False)
    assert sorted(first.loads) == sorted(IDS)

    assert first.alive_at_load == [0] * len(IDS)  # one case in memory: the previous one is freed before a load

    again = counting(cfg)
    reused = build_cache(cfg, again, progress=False)
    assert again.loads == []  # nothing decoded the second time
    assert reused.root == cache.root and reused.manifest == cache.manifest
    assert build_cache(cfg, progress=False).root == cache.root  # the source opened from the config: same cache

    assert sorted(cache.case_ids) == sorted(IDS)
    assert cache.dataset_dir == cache.root.parent
    for cid, (raw, label) in cases.items():
        image, lbl = cache.image(cid), cache.label(cid)
        assert isinstance(image, np.memmap) and isinstance(lbl, np.memmap)
        assert image.dtype == np.float16 and image.shape == (raw.shape[2], 32, 32)
        assert lbl.dtype == np.uint8 and lbl.shape == (raw.shape[2], 32, 32)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert cache.n_slices(cid) == raw.shape[2]
        assert cache.fg_per_slice(cid).tolist() == [int(np.count_nonzero(s)) for s in lbl]
        entry = cache.manifest["cases"][cache.case_ids.index(cid)]
        assert entry["normalisation"] == "window"
        assert entry["voxels_per_label"] == {"1": int(np.count_nonzero(label))}  # original resolution
        assert entry["intensity"]["min"] == float(hu(raw).min())
        assert entry["intensity"]["fg_mean"] == pytest.approx(float(hu(raw)[label > 0].mean()), rel=1e-6)


def test_cached_pixels_are_the_windowed_resized_slices(tmp_path):
    """Golden check of the whole path, axes included: cached slice z = resize(window(HU[:, :, z]))."""
    raw, label = tiny_case(3, shape=(16, 24, 3))
    label[:] = 0
    label[:8] = 1  # first half of the X axis: after resizing, rows 0..15 of the (X, Y) slice, not columns
    task = make_kaggle_task(tmp_path / "data", {"a": (raw, label)})
    cache = build_cache(dataset_config(task, tmp_path / "cache"), progress=False)
    volume = hu(raw)
    for z in range(raw.shape[2]):
        windowed = np.clip((volume[:, :, z] - (60 - 200)) / 400, 0, 1).astype(np.float32)
        want = resize_slice(windowed, 32, is_label=False)
        np.testing.assert_allclose(cache.image("a")[z], want, atol=1e-3)  # float16 storage
        assert cache.label("a")[z][:16].all() and not cache.label("a")[z][16:].any()


def test_case_ids_that_sanitise_alike_get_their_own_files(tmp_path):
    volumes = {"a b": tiny_case(0), "a_b": tiny_case(1), "021": tiny_case(2), "21": tiny_case(3)}
    task = make_kaggle_task(tmp_path / "data", volumes)
    cache = build_cache(dataset_config(task, tmp_path / "cache"), progress=False)
    files = [(c["image_file"], c["label_file"]) for c in cache.manifest["cases"]]
    assert len({f for pair in files for f in pair}) == 2 * len(volumes)
    for cid, (raw, _) in volumes.items():
        window = np.clip((hu(raw)[:, :, 0] - (60 - 200)) / 400, 0, 1).astype(np.float32)
        np.testing.assert_allclose(cache.image(cid)[0], resize_slice(window, 32, is_label=False), atol=1e-3)


# --------------------------------------------------------------------------------------- what forks the cache


def test_pixel_settings_fork_the_cache_and_split_or_context_settings_do_not(task, tmp_path):
    cache_dir = tmp_path / "cache"
    base = build_cache(dataset_config(task, cache_dir), progress=False)
    for changed in ({"window": {"level": 40, "width": 350}}, {"image_size": 64}, {"window": None},
                    {"percentiles": (1.0, 99.0)}):
        other = build_cache(dataset_config(task, cache_dir, **changed), progress=False)
        assert other.root != base.root and other.root.parent == base.root.parent, changed
    for same in ({"context_slices": 2}, {"split": {"seed": 7, "val_fraction": 0.5}}, {"labels": [1]}):
        cfg = dataset_config(task, cache_dir, **same)
        source = counting(cfg)
        assert build_cache(cfg, source, progress=False).root == base.root, same
        assert source.loads == []
    assert len(prep_dirs(cache_dir)) == 5


def test_window_is_not_a_setting_of_non_ct_data(task, tmp_path):
    ct = dataset_config(task, tmp_path)
    other = dataset_config(task, tmp_path, window={"level": 0, "width": 100})
    assert preprocessing_settings(ct, "CT") != preprocessing_settings(other, "CT")
    assert preprocessing_settings(ct, "MRI") == preprocessing_settings(other, "MRI")
    assert preprocessing_settings(ct, "MRI")["window"] is None


def test_new_data_on_disk_gets_a_new_dataset_folder(tmp_path, cases):
    task = make_kaggle_task(tmp_path / "data", cases)
    cfg = dataset_config(task, tmp_path / "cache")
    before = dataset_dir_for(cfg, open_source_from_config(cfg))
    make_kaggle_task(tmp_path / "data", {**cases, "999": tiny_case(9)})  # a case added
    assert dataset_dir_for(cfg, open_source_from_config(cfg)) != before


# --------------------------------------------------------------------------------------- half-written caches


def _truncate_npy(prep: Path) -> None:
    path = sorted(prep.glob("*.img.npy"))[0]
    path.write_bytes(path.read_bytes()[:-100])


def _incomplete_manifest(prep: Path) -> None:
    manifest = json.loads((prep / "manifest.json").read_text())
    (prep / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))


@pytest.mark.parametrize("damage", [
    lambda prep: (prep / "manifest.json").unlink(),  # interrupted before the manifest
    _truncate_npy,  # a file cut short
    _incomplete_manifest,
    lambda prep: (prep / "manifest.json").write_text('{"complete": true, "cases": [{"image_f'),  # torn JSON
], ids=["no-manifest", "truncated-npy", "complete-false", "torn-manifest"])
def test_half_written_cache_is_detected_and_rebuilt(task, tmp_path, damage):
    cfg = dataset_config(task, tmp_path / "cache")
    good = build_cache(cfg, progress=False)
    want = {cid: (np.array(good.image(cid)), np.array(good.label(cid))) for cid in good.case_ids}
    damage(good.root)

    source = counting(cfg)
    rebuilt = build_cache(cfg, source, progress=False)
    assert sorted(source.loads) == sorted(IDS)
    assert rebuilt.root == good.root and rebuilt.manifest["complete"] is True
    for cid, (image, label) in want.items():
        assert np.array_equal(rebuilt.image(cid), image) and np.array_equal(rebuilt.label(cid), label)
    assert build_cache(cfg, counting(cfg), progress=False).manifest == rebuilt.manifest


def test_failed_build_writes_nothing_in_place(task, tmp_path):
    cfg = dataset_config(task, tmp_path / "cache")
    source = counting(cfg, fail_on=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(cfg, source, progress=False)
    assert len(source.loads) == 3
    dataset_dir = dataset_dir_for(cfg, source)
    leftovers = [p.name for p in dataset_dir.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []  # no prep-<hash>/ and no .prep-<hash>.tmp-<pid>/
    assert build_cache(cfg, counting(cfg), progress=False).manifest["complete"] is True


def _shape(case) -> list[int]:  # a picklable ``case_info``: it may run in a worker process
    return list(case.image.shape)


class FaultySource:
    """A real source, picklable into worker processes, whose ``load`` raises a reader error for case ``bad``,
    SIGKILLs its own process for case ``kill`` and sleeps ``sleep`` seconds before each case."""

    def __init__(self, source, bad: str | None = None, kill: str | None = None, sleep: float = 0.0):
        self._source, self.bad, self.kill, self.sleep = source, bad, kill, sleep

    def __getattr__(self, name):  # root, labels, modality, case_ids, fingerprint: the real ones
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._source, name)

    def load(self, case_id: str):
        time.sleep(self.sleep)
        if case_id == self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if case_id == self.bad:
            raise ShapeMismatchError(f"case {case_id}: image shape != label shape")
        return self._source.load(case_id)


def leftovers(cfg, source) -> list[str]:
    return [p.name for p in dataset_dir_for(cfg, source).iterdir() if not p.name.endswith(".lock")]


def test_case_hook_sees_each_case_of_the_build_once_and_a_case_error_stops_the_build(task, tmp_path):
    """``build_cache(case_info=..., on_case=...)`` is how the data audit inspects the cases the build decodes (each
    once); a reader's error carries its case id."""
    cfg = dataset_config(task, tmp_path / "cache")
    source = counting(cfg)
    seen: list[tuple[str, list[int]]] = []
    cache = build_cache(cfg, source, progress=False, case_info=_shape, on_case=lambda c, info: seen.append((c, info)))
    assert [c for c, _ in seen] == source.loads == cache.case_ids == source.case_ids()
    assert [info for _, info in seen] == [cache.cases[c]["orig_shape"] for c in cache.case_ids]
    assert build_cache(cfg, source, progress=False, case_info=_shape, on_case=lambda *a: seen.append(a)).root \
        == cache.root and len(seen) == len(IDS)  # reused: nothing decoded

    other = dataset_config(task, tmp_path / "other")
    bad = source.case_ids()[1]
    with pytest.raises(ShapeMismatchError, match=rf"case {bad}: ") as err:  # the reader's own error
        build_cache(other, FaultySource(open_source_from_config(other), bad=bad), progress=False)
    assert err.value.case_id == bad
    assert leftovers(other, source) == []


# --------------------------------------------------------------------------------------- worker processes


def test_worker_processes_build_the_same_cache_as_one_process(task, tmp_path):
    one = dataset_config(task, tmp_path / "one", cache_workers=1)
    two = dataset_config(task, tmp_path / "two", cache_workers=2)
    seen: dict[str, list[int]] = {}
    a = build_cache(one, progress=False)
    b = build_cache(two, progress=False, case_info=_shape, on_case=seen.__setitem__)  # info computed in the workers
    assert (a.manifest["build"]["processes"], b.manifest["build"]["processes"]) == (1, 2)
    assert a.manifest["cases"] == b.manifest["cases"]  # in the source's order, whatever order the workers finished in
    assert seen == {c: b.cases[c]["orig_shape"] for c in IDS}
    for name in sorted(p.name for p in a.root.glob("*.npy")):
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes(), name


def test_auto_workers_start_processes_only_for_a_task_worth_them(task, tmp_path, monkeypatch):
    small = build_cache(dataset_config(task, tmp_path / "small"), progress=False)
    assert small.manifest["build"]["processes"] == 1  # 4 tiny cases: processes would cost more than they save
    monkeypatch.setattr("medseg.data.cache.PARALLEL_MIN_SECONDS", 0.0)
    big = build_cache(dataset_config(task, tmp_path / "big"), progress=False)
    # the first case timed here, the other three in as many processes as this machine gives (1 where pinned)
    assert big.manifest["build"]["processes"] == min(available_cores(), len(IDS) - 1)
    assert big.manifest["cases"] == small.manifest["cases"]


@pytest.mark.parametrize("fault, error, message", [
    ("kill", DataError, r"cache worker \d+ died \(killed by SIGKILL"),  # the worker process dies
    ("bad", ShapeMismatchError, r"image shape != label shape"),  # the reader refuses the case, in the worker
])
def test_a_fault_in_a_worker_fails_the_build_naming_its_case_and_leaves_nothing(task, tmp_path, fault, error,
                                                                                  message):
    cfg = dataset_config(task, tmp_path / "cache", cache_workers=2)
    source = open_source_from_config(cfg)
    victim = source.case_ids()[2]
    with pytest.raises(error, match=rf"^case {victim}: {message}") as err:
        build_cache(cfg, FaultySource(source, **{fault: victim}), progress=False)
    assert err.value.case_id == victim and "\n" not in str(err.value)
    assert leftovers(cfg, source) == []
    assert build_cache(cfg, source, progress=False).manifest["complete"] is True  # rebuilt next time


def test_auto_workers_are_capped_by_the_memory_a_case_needs(monkeypatch):
    monkeypatch.setattr("medseg.data.cache.PARALLEL_MIN_SECONDS", 1.0)
    monkeypatch.setattr("medseg.data.workers.available_cores", lambda: 8)
    monkeypatch.setattr("medseg.data.workers.available_memory_mb", lambda: 4000.0)
    # 300 MB + 8 bytes per voxel: 512x512x300 needs 900 MB a worker, 4 fit; 64x64x10 needs ~300 MB, the 8 cores fit
    assert build_processes(None, 11, 5.0, (512, 512, 300)) == 4
    assert build_processes(None, 11, 5.0, (64, 64, 10)) == 8
    assert build_processes(None, 11, 0.01, (64, 64, 10)) == 1  # 10 cases of 0.01 s: not worth a process
    assert build_processes(3, 11) == 3 and build_processes(3, 2) == 2  # an explicit count, capped by the cases


def _unpicklable_result(case_id: str):
    return lambda: case_id


def _sleepy(case_id: str) -> str:
    time.sleep(0.5)
    return case_id


def test_a_result_that_cannot_travel_is_an_error_naming_its_case_not_a_hang():
    with pytest.raises(Exception, match="pickle") as err:
        list(run_cases(_unpicklable_result, ["a", "b"], 2))
    assert err.value.case_id in {"a", "b"}


PARENT_KILLED_CHILD = """
import sys
from medseg.data.workers import run_cases
from tests.test_cache import _sleepy
for _ in run_cases(_sleepy, [str(i) for i in range(200)], 2):
    pass
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the worker processes")
def test_workers_exit_when_their_parent_is_killed():
    proc = subprocess.Popen([sys.executable, "-c", PARENT_KILLED_CHILD], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 120
    while len(workers := _children(proc.pid)) < 3:  # the resource tracker and two workers
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.kill()  # SIGKILL: no finally, no cleanup in the parent
    proc.wait()
    deadline = time.monotonic() + 30  # a worker notices between cases (0.5 s here) or within its 1 s poll
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = {pid for pid in alive if Path(f"/proc/{pid}").exists()
                 and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"}
    assert not alive


CTRL_C_CHILD = """
import sys
from medseg.data.cache import build_cache
from medseg.data.sources import open_source_from_config
from tests.test_cache import FaultySource, dataset_config
cfg = dataset_config(sys.argv[1], sys.argv[2], cache_workers=2)
build_cache(cfg, FaultySource(open_source_from_config(cfg), sleep=60), progress=False)
"""


def _children(pid: int) -> set[int]:
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the worker processes")
def test_ctrl_c_stops_every_worker_and_leaves_nothing(task, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_CHILD, str(task), str(tmp_path / "cache")],
                            cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    while len(workers := _children(proc.pid)) < 2:  # the resource tracker and two workers, once spawned
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    time.sleep(2)  # the workers are inside load (sleeping)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGINT)  # the parent only: it must stop its workers itself
    assert proc.wait(timeout=30) != 0
    assert "KeyboardInterrupt" in proc.stderr.read()
    time.sleep(0.5)
    assert [pid for pid in workers if Path(f"/proc/{pid}").exists()
            and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"] == []
    assert [p.name for p in (tmp_path / "cache").glob("*/*") if not p.name.endswith(".lock")] == []


def test_temp_folder_of_a_killed_build_is_removed(task, tmp_path):
    cfg = dataset_config(task, tmp_path / "cache")
    source = open_source_from_config(cfg)
    settings_hash = build_cache(cfg, source, progress=False).root.name
    dataset_dir = dataset_dir_for(cfg, source)
    (dataset_dir / settings_hash / "manifest.json").unlink()
    stale = dataset_dir / f".{settings_hash}.tmp-999999"  # a SIGKILLed builder never cleans up
    (stale / "junk").mkdir(parents=True)
    build_cache(cfg, source, progress=False)
    assert not stale.exists()
    assert sorted(p.name for p in dataset_dir.iterdir() if not p.name.endswith(".lock")) == [settings_hash]


# --------------------------------------------------------------------------------------- concurrency


def _build_in_child(cfg, start, results) -> None:
    """Spawned process: wait for the others, build, report (root, manifest text, cases it decoded)."""
    source = CountingSource(open_source_from_config(cfg))
    start.wait(timeout=60)
    cache = build_cache(cfg, source, progress=False)
    results.put((str(cache.root), json.dumps(cache.manifest, sort_keys=True), len(source.loads)))


def test_concurrent_builders_end_with_one_complete_cache(task, tmp_path):
    cfg = dataset_config(task, tmp_path / "cache")  # a DatasetConfig pickles without re-validating the model
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(cfg, start, results)) for _ in range(3)]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    roots, manifests, decoded = zip(*out)
    assert len(set(roots)) == 1 and len(set(manifests)) == 1
    assert sorted(decoded) == [0, 0, len(IDS)]  # one builder; the others waited on the lock and reused its cache
    prep = Path(roots[0])
    assert sorted(p.name for p in prep.parent.iterdir() if not p.name.endswith(".lock")) == [prep.name]
    assert SliceCache(prep, json.loads(manifests[0])).manifest["complete"] is True


# --------------------------------------------------------------------------------------- intensities


WINDOW = {"window": {"level": 60.0, "width": 400.0}, "percentiles": [0.5, 99.5], "image_size": 32}


def test_ct_window_hand_checked():
    volume = np.full((8, 8, 2), -1024.0, np.float32)  # air: values look like Hounsfield units
    norm, method = make_normaliser(volume, WINDOW)
    assert method == "window"
    hu_values = np.array([[-1024, -140, -40, 60, 160, 260, 3000]], np.float32)
    assert norm(hu_values)[0].tolist() == pytest.approx([0, 0, 0.25, 0.5, 0.75, 1, 1])
    assert norm(hu_values).dtype == np.float32
    assert hu_values[0, 0] == -1024  # the input plane is not modified


def test_non_hu_intensities_take_the_percentile_path():
    volume = np.linspace(0, 255, 16 * 16 * 2, dtype=np.float32).reshape(16, 16, 2)  # a 0..255 image labelled CT
    norm, method = make_normaliser(volume, {**WINDOW, "percentiles": [0.0, 100.0]})
    assert method == "percentile"
    assert norm(np.array([[0, 127.5, 255, 300]], np.float32))[0].tolist() == pytest.approx([0, 0.5, 1, 1])
    norm, _ = make_normaliser(volume, WINDOW)
    lo, hi = np.percentile(volume, [0.5, 99.5])
    assert norm(np.array([[lo, (lo + hi) / 2, hi]], np.float32))[0].tolist() == pytest.approx([0, 0.5, 1], abs=1e-6)
    # no window configured: percentiles even for HU data
    assert make_normaliser(np.full((4, 4, 1), -1000.0, np.float32), {**WINDOW, "window": None})[1] == "percentile"


def test_0_255_volumes_are_percentile_normalised_end_to_end(tmp_path):
    """A CT/ folder of unscaled 0..255 volumes (metadata still says CT): the cache must not apply the HU window."""
    rng = np.random.default_rng(0)
    volumes = {cid: (rng.integers(0, 256, (32, 32, 2)).astype(np.uint8), tiny_case(i, (32, 32, 2))[1])
               for i, cid in enumerate(("370", "394"))}
    task = make_kaggle_task(tmp_path / "data", volumes, ct="folder")
    for cid, (raw, _) in volumes.items():
        write_nifti(task / "CT" / f"{cid}.nii", raw, scaled=False)  # stored values are the intensities
    cache = build_cache(dataset_config(task, tmp_path / "cache", percentiles=(0.0, 100.0)), progress=False)
    for cid, (raw, _) in volumes.items():
        entry = cache.manifest["cases"][cache.case_ids.index(cid)]
        assert entry["normalisation"] == "percentile"
        lo, hi = int(raw.min()), int(raw.max())  # percentiles 0 and 100; 32 px: no resize
        want = (raw.astype(np.float32) - lo) / (hi - lo)
        np.testing.assert_allclose(cache.image(cid), want.transpose(2, 0, 1), atol=1e-3)


def test_real_example_is_hu_after_header_scaling(tmp_path):
    """The shared example's slices are stored as uint8 0..255 but carry scl_slope 9.16 / scl_inter -1024: read
    values are HU (-1024..1312), so the window applies."""
    task = evalseg_dir() / "TaskA_Example"
    cache = build_cache(dataset_config(task, tmp_path / "cache", allow_missing=True, image_size=64), progress=False)
    assert sorted(cache.case_ids) == ["370", "394"]
    for entry in cache.manifest["cases"]:
        assert entry["normalisation"] == "window" and entry["intensity"]["min"] == -1024
        image = np.asarray(cache.image(entry["case_id"]), np.float32)
        assert image.shape == (1, 64, 64) and image.min() == 0 and 0.5 < image.max() <= 1


# --------------------------------------------------------------------------------------- resize


def test_resize_keeps_label_values_and_shapes():
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([0, 2, 6], np.uint8), size=(100, 80))
    for size in (32, 128):
        out = resize_slice(label, size, is_label=True)
        assert out.shape == (size, size) and out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 2, 6}
    image = rng.random((100, 80), dtype=np.float32)
    for size in (32, 128):
        out = resize_slice(image, size, is_label=False)
        assert out.shape == (size, size) and out.dtype == np.float32
        assert image.min() <= out.min() and out.max() <= image.max()
    same = rng.random((32, 32), dtype=np.float32)
    assert np.array_equal(resize_slice(same, 32, is_label=False), same)


@pytest.mark.parametrize("is_label", [True, False])
def test_resize_ignores_memory_order(is_label):
    """Planes of NIfTI volumes are Fortran-ordered; the result must not depend on that."""
    rng = np.random.default_rng(1)
    plane = rng.integers(0, 4, (48, 40)).astype(np.uint8) if is_label else rng.random((48, 40), dtype=np.float32)
    for size in (32, 64):
        c_order = resize_slice(np.ascontiguousarray(plane), size, is_label=is_label)
        f_order = resize_slice(np.asfortranarray(plane), size, is_label=is_label)
        np.testing.assert_allclose(f_order, c_order, atol=1e-6)


def test_empty_task_is_an_error(tmp_path):
    """A source with no case: one-line DataError, nothing left behind."""
    task = make_kaggle_task(tmp_path / "data", {"1": tiny_case(0)})
    cfg = dataset_config(task, tmp_path / "cache")
    source = open_source_from_config(cfg)
    source.case_ids = lambda: []  # the real reader, told there is nothing to read
    with pytest.raises(DataError, match="no cases to cache"):
        build_cache(cfg, source, progress=False)
    assert [p for p in dataset_dir_for(cfg, source).iterdir() if not p.name.endswith(".lock")] == []



def test_a_2d_folder_dataset_larger_than_the_file_limit_reads_every_case(tmp_path):
    """One case per image: 600 cases would hold 1200 memory maps (one file descriptor each) if every map stayed
    open. Under a soft limit of 512 descriptors (half the usual default), reading every case must still work."""
    import subprocess
    import sys

    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(600):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(tmp_path / "images" / f"{i:04d}.png")
        Image.fromarray((rng.random((32, 32)) > 0.9).astype(np.uint8) * 255).save(tmp_path / "masks" / f"{i:04d}.png")
    dataset = {"format": "folders2d", "path": str(tmp_path), "cache_dir": str(tmp_path / "cache"), "window": None,
               "image_size": 32}
    cfg = config_from_dict({"dataset": dataset}, resolve=True).dataset
    assert len(build_cache(cfg, progress=False).case_ids) == 600
    script = f"""
import resource
import numpy as np
from medseg.config import config_from_dict
from medseg.data.cache import MAX_OPEN_MAPS, build_cache
resource.setrlimit(resource.RLIMIT_NOFILE, (512, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
cache = build_cache(config_from_dict({{"dataset": {dataset!r}}}, resolve=True).dataset, progress=False)
read = [float(np.asarray(cache.image(c), dtype=np.float32).sum()) + int(cache.label(c).sum()) for c in cache.case_ids]
assert len(cache._maps) <= MAX_OPEN_MAPS
print(len(read))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "600"
