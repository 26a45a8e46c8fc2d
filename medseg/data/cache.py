"""Preprocessing cache: windowed, resized 2D slices stored once per (dataset, preprocessing settings).

Layout::

    <cache_dir>/<task>-<source fingerprint>/          one folder per dataset version
        splits-<hash>/splits.json                     (medseg.data.split)
        prep-<settings hash>/
            manifest.json                              written last: its presence marks a complete cache
            <case>.img.npy   float16 (Z, S, S) in [0, 1]; colour images (C = 3 channels): (Z, C, S, S)
            <case>.lbl.npy   uint8   (Z, S, S) raw label values

Epochs and trials read the ``.npy`` files memory-mapped, so no NIfTI is decoded after the first build.
The build holds a file lock (one builder per cache; other processes wait, then reuse it), writes into a
temporary folder case by case (one case in memory), and renames it into place only when complete.
A folder without a valid manifest, or whose files do not match it, is a half-written cache: rebuilt.
2.5D context is assembled at read time from neighbouring slices, so it does not fork the cache.
A colour case is normalised with one intensity mapping for its three channels (their balance kept), and its manifest
entry holds per-channel pixel sums (``channel_sums``): the training split's mean and std per channel
(``channel_stats``) are added up from them, without reading an image.
"""
from __future__ import annotations

import errno
import functools
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from medseg.errors import DataError
from medseg.io_utils import atomic_write_json, disk_full_as_error, stable_hash

CACHE_VERSION = 2  # 2: labels resized with pixel-centre nearest neighbour (INTER_NEAREST_EXACT)
HU_LIKE_MIN = -200.0  # a CT volume whose minimum is above this is not in Hounsfield units (e.g. 0..255 PNG-like)


def preprocessing_settings(dataset_cfg, modality: str, channels: int = 1) -> dict[str, Any]:
    """The settings that change cached pixels (and nothing else: split and 2.5D context do not). ``channels``
    (the source's) enters only when there are several, so a grey cache keeps its folder."""
    window = dataset_cfg.window.model_dump() if dataset_cfg.window is not None else None
    settings = {
        "version": CACHE_VERSION,
        "modality": modality,
        "window": window if modality.upper() == "CT" else None,
        "percentiles": list(dataset_cfg.percentiles),
        "image_size": dataset_cfg.image_size,
    }
    if channels > 1:
        settings["channels"] = int(channels)
    return settings


def source_settings(dataset_cfg, source) -> dict[str, Any]:
    """``preprocessing_settings`` of ``source`` (its modality and channels)."""
    return preprocessing_settings(dataset_cfg, source.modality, int(getattr(source, "channels", 1)))


def _sample(volume: np.ndarray) -> np.ndarray:
    """A strided sub-sample (about 64x64 per slice) for cheap statistics of large volumes."""
    return volume[:: max(1, volume.shape[0] // 64), :: max(1, volume.shape[1] // 64), :]


def make_normaliser(volume: np.ndarray, settings: dict[str, Any], *, minimum: float | None = None):
    """Intensity mapping to [0, 1] for one case: the CT window when values look like HU, else percentiles.

    Returns (function applied to each (X, Y) plane, method name "window" or "percentile"). Planes are
    normalised one at a time so the build never holds a second full-size copy of the volume.
    ``minimum``: ``volume.min()`` when the caller already has it (saves a pass over a large volume).
    """
    window = settings["window"]
    lowest = float(volume.min()) if minimum is None else float(minimum)
    if window is not None and lowest <= HU_LIKE_MIN:
        low, scale = window["level"] - window["width"] / 2, 1.0 / window["width"]
        method = "window"
    else:
        p_low, p_high = np.percentile(_sample(volume), settings["percentiles"])
        low, scale = float(p_low), 1.0 / max(float(p_high - p_low), 1e-6)
        method = "percentile"

    def apply(plane: np.ndarray) -> np.ndarray:
        out = plane.astype(np.float32)  # a copy, also of float32 input: the volume itself is never modified
        out -= np.float32(low)
        out *= np.float32(scale)
        return np.clip(out, 0.0, 1.0, out=out)

    return apply, method


def resize_slice(plane: np.ndarray, size: int, *, is_label: bool) -> np.ndarray:
    """(H, W) -> (size, size): area averaging when shrinking images, bilinear when enlarging, nearest for labels.
    A colour plane (H, W, C) -> (size, size, C)."""
    import cv2

    if plane.shape[:2] == (size, size):
        return plane
    if is_label:
        interp = cv2.INTER_NEAREST_EXACT  # pixel centres, aligned with INTER_AREA image downsampling
    else:
        interp = cv2.INTER_AREA if max(plane.shape[:2]) > size else cv2.INTER_LINEAR
    # cv2 takes (width, height); plane axes are (X, Y) and stay in that order. A plane of a NIfTI volume is
    # Fortran-ordered: resizing its transpose (C-ordered, no copy) and transposing back gives the same pixels.
    if plane.ndim == 2 and plane.flags.f_contiguous and not plane.flags.c_contiguous:
        return cv2.resize(plane.T, (size, size), interpolation=interp).T
    return cv2.resize(np.ascontiguousarray(plane), (size, size), interpolation=interp)


def _intensity_stats(image: np.ndarray, low: float, high: float) -> dict[str, Any]:
    """Summary of a case's intensities from a strided sample (no full-size temporary)."""
    sample = _sample(image)
    p01, p99 = np.percentile(sample, [1, 99])
    return {"min": low, "max": high, "mean": float(sample.mean()), "std": float(sample.std()),
            "p01": float(p01), "p99": float(p99)}


@dataclass
class CaseEntry:
    case_id: str
    n_slices: int
    fg_per_slice: list[int]  # foreground pixels per cached slice (resized)


MAX_OPEN_MAPS = 256  # 128 cases (image + label) stay mapped: every 3D task's working set, a window of a 2D one


class SliceCache:
    """Read side of a complete cache: memory-mapped per-case volumes, safe for many readers at once."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest
        self.settings: dict[str, Any] = manifest["settings"]
        self.cases: dict[str, dict[str, Any]] = {c["case_id"]: c for c in manifest["cases"]}
        self._maps: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    @property
    def case_ids(self) -> list[str]:
        return list(self.cases)

    @property
    def dataset_dir(self) -> Path:
        return self.root.parent

    def _open(self, case_id: str, kind: str) -> np.ndarray:
        """The case's memory map, kept among the ``MAX_OPEN_MAPS`` most recently used: each map holds a file
        descriptor, and a 2D-folder dataset (one case per image) would otherwise exhaust them (1024 by default)."""
        key = (case_id, kind)
        arr = self._maps.get(key)
        if arr is None:
            arr = np.load(self.root / self.cases[case_id][kind], mmap_mode="r")
            self._maps[key] = arr
            while len(self._maps) > MAX_OPEN_MAPS:
                self._maps.popitem(last=False)  # closed when no batch references it any more
        else:
            self._maps.move_to_end(key)
        return arr

    @property
    def channels(self) -> int:
        """Channels of every cached image: 1, or 3 for colour (images then (Z, C, S, S))."""
        return int(self.settings.get("channels", 1))

    def image(self, case_id: str) -> np.ndarray:
        """float16 (Z, S, S) in [0, 1], or (Z, C, S, S) for colour (``channels``), memory-mapped."""
        return self._open(case_id, "image_file")

    def channel_stats(self, case_ids: Iterable[str]) -> dict[str, list[float]] | None:
        """Mean and std per channel over every cached pixel of ``case_ids`` (the training split: nothing of another
        case enters), from the manifest's per-case sums; None for one channel."""
        if self.channels == 1:
            return None
        n, total, total_sq = 0, np.zeros(self.channels), np.zeros(self.channels)
        for cid in case_ids:
            sums = self.cases[cid]["channel_sums"]
            n += int(sums["pixels"])
            total += np.asarray(sums["sum"], np.float64)
            total_sq += np.asarray(sums["sum_sq"], np.float64)
        if not n:
            raise DataError(f"{self.root}: no case to take channel statistics from")
        mean = total / n
        std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
        return {"mean": [float(v) for v in mean], "std": [float(max(v, 1e-6)) for v in std]}

    def label(self, case_id: str) -> np.ndarray:
        """uint8 (Z, S, S) raw label values, memory-mapped."""
        return self._open(case_id, "label_file")

    def fg_per_slice(self, case_id: str) -> np.ndarray:
        return np.asarray(self.cases[case_id]["fg_per_slice"], dtype=np.int64)

    def n_slices(self, case_id: str) -> int:
        return int(self.cases[case_id]["n_slices"])

    def __getstate__(self):  # memmaps are reopened in each DataLoader worker / Ray process
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()
        return state


def _valid_manifest(prep_dir: Path) -> dict[str, Any] | None:
    """The manifest if the cache folder is complete and every file matches it, else None."""
    path = prep_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        for case in manifest["cases"]:
            for kind in ("image_file", "label_file"):
                if (prep_dir / case[kind]).stat().st_size != case[kind.replace("file", "bytes")]:
                    return None
        return manifest if manifest.get("complete") else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dataset_dir_for(dataset_cfg, source) -> Path:
    """``<cache_dir>/<task name>-<fingerprint>``: one folder per version of the data on disk."""
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in Path(source.root).name)
    return Path(dataset_cfg.cache_dir) / f"{name}-{source.fingerprint()[:12]}"


def prep_dir_for(dataset_cfg, source) -> Path:
    """``<dataset dir>/prep-<settings hash>``: the cache folder of these settings, built or not."""
    settings = source_settings(dataset_cfg, source)
    return dataset_dir_for(dataset_cfg, source) / f"prep-{stable_hash(settings)}"


def existing_cache(dataset_cfg, source) -> SliceCache | None:
    """The complete cache for these settings, or None when it is missing or half-written; nothing is built."""
    prep_dir = prep_dir_for(dataset_cfg, source)
    manifest = _valid_manifest(prep_dir)
    return None if manifest is None else SliceCache(prep_dir, manifest)


def build_cache(dataset_cfg, source=None, *, progress: bool = True, case_info: Callable | None = None,
                on_case: Callable | None = None, on_first_case: Callable | None = None) -> SliceCache:
    """Return the cache for these settings, building it first if missing or half-written.

    ``case_info(case)``, a picklable function, runs on each case where it is decoded (a worker process or here) and
    ``on_case(case_id, its result)`` receives the result here: the data audit inspects each case on the way, so that
    a first audit decodes every case once. A ``DataError`` of a case carries its ``case_id``.
    ``on_first_case(CaseTiming)`` is called once, when a build has made its first case (before its ``on_case``): what
    the estimate of the whole build (``estimate_build``) is measured on, without decoding any case twice.
    """
    from filelock import FileLock

    if source is None:
        from medseg.data.sources import open_source_from_config

        source = open_source_from_config(dataset_cfg)
    cache = existing_cache(dataset_cfg, source)
    if cache is not None:
        return cache
    prep_dir = prep_dir_for(dataset_cfg, source)
    prep_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(prep_dir) + ".lock"):
        manifest = _valid_manifest(prep_dir)  # another process may have finished while we waited
        if manifest is None:
            job = BuildJob(source, source_settings(dataset_cfg, source),
                           getattr(dataset_cfg, "cache_workers", None), case_info, on_case, on_first_case)
            manifest = _build(prep_dir, job, progress=progress)
    return SliceCache(prep_dir, manifest)


PARALLEL_MIN_SECONDS = 8.0  # auto workers: start processes only when the cases left would take longer than this


def build_processes(workers: int | None, n_cases: int, first_case_seconds: float = 0.0,
                    first_case_shape: Sequence[int] = ()) -> int:
    """The processes that make the cases of a build of ``n_cases`` (the manifest's ``build.processes``; 1: this one).

    ``workers`` (dataset.cache_workers) processes, capped by the cases. Auto (None): this process makes the first case
    and its time, ``first_case_seconds``, decides for the rest: the available cores, capped by the cases left and by
    the memory available for a case like the first (``first_case_shape``), when the rest would take longer than
    ``PARALLEL_MIN_SECONDS`` in one process, else this one process.
    """
    from medseg.data.workers import available_cores, available_memory_mb

    if workers is None:
        n_cases -= 1  # the first case, made here
        workers = available_cores() if first_case_seconds * n_cases > PARALLEL_MIN_SECONDS else 1
        per_worker_mb = WORKER_BASE_MB + WORKER_BYTES_PER_VOXEL * math.prod(first_case_shape or (0,)) / 2**20
        memory = available_memory_mb()
        if math.isfinite(memory):
            workers = min(workers, max(1, int(memory // per_worker_mb)))
    return max(1, min(workers, n_cases))


# Memory of one worker process: the interpreter with numpy, cv2 and nibabel, plus a case (the decoded integer volume,
# its float32 image and uint8 label, with slack for the decoder's buffers).
WORKER_BASE_MB = 300.0
WORKER_BYTES_PER_VOXEL = 8.0


def _warm_imports() -> None:
    """Import what preprocessing a case uses (cv2, scipy.ndimage, nibabel), so the first case's time, which decides
    the processes and the estimate, is the case's own and not the imports'."""
    import cv2  # noqa: F401
    import nibabel  # noqa: F401
    from scipy import ndimage  # noqa: F401


@dataclass
class BuildJob:
    source: Any
    settings: dict[str, Any]
    workers: int | None  # None: the cores available, once the first case shows the task is worth processes
    case_info: Callable | None = None
    on_case: Callable | None = None
    on_first_case: Callable | None = None
    processes: int = 1  # set by the build: the processes that preprocessed the cases (1: this one)


def _cache_case(source, settings: dict[str, Any], out_dir: Path, stems: dict[str, str], case_info: Callable | None,
                case_id: str) -> tuple[dict[str, Any], Any, float]:
    """Decode, preprocess and write one case (in a worker process or here); returns (manifest entry, case_info,
    seconds it all took)."""
    started = time.perf_counter()
    try:
        case = source.load(case_id)
    except DataError as err:
        err.case_id = case_id
        raise
    entry = _write_case(out_dir, case, settings, stems[case_id])
    info = case_info(case) if case_info is not None else None
    # Dropped before the next load: the caller's loop would otherwise still hold this case while decoding the next,
    # two volumes in memory at the peak.
    del case
    _release_freed_memory()
    return entry, info, time.perf_counter() - started


def _case_results(job: BuildJob, tmp_dir: Path, ids: list[str], stems: dict[str, str]):
    """(case id, entry, info, seconds, peak RSS MiB of the process that made it) per case, from worker processes or
    here; ``job.processes`` is set before the first."""
    from medseg.data.workers import peak_rss_mb, run_cases

    one_case = functools.partial(_cache_case, job.source, job.settings, tmp_dir, stems, job.case_info)

    def here(case_id: str):
        return (case_id, *one_case(case_id), peak_rss_mb())

    rest, first = list(ids), None
    if job.workers is None:  # auto: the first case made here, its time (first[3]) and size decide
        _warm_imports()
        first = here(rest.pop(0))
    job.processes = build_processes(job.workers, len(ids), first[3] if first else 0.0,
                                    [*first[1]["orig_shape"], int(job.settings.get("channels", 1))] if first else ())
    if first is not None:
        yield first
    if job.processes == 1:
        for case_id in rest:
            yield here(case_id)
        return
    for case_id, result, rss in run_cases(one_case, rest, job.processes):
        yield (case_id, *result, rss)


def _build(prep_dir: Path, job: BuildJob, *, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    source = job.source
    if prep_dir.exists():  # half-written or stale: the lock guarantees nobody is writing it now
        shutil.rmtree(prep_dir)
    # Temp folders of builds that were killed (SIGKILL, power loss) before they could clean up: under the lock
    # nobody else is writing one, so all of them are garbage (each can be gigabytes).
    for stale in prep_dir.parent.glob(f".{prep_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = prep_dir.with_name(f".{prep_dir.name}.tmp-{os.getpid()}")
    tmp_dir.mkdir(parents=True)
    started = time.perf_counter()
    try:
        ids = source.case_ids()
        if not ids:
            raise DataError(f"{source.root}: no cases to cache")
        entries, peak_rss = {}, []
        with tqdm(total=len(ids), desc=f"cache {Path(source.root).name}", unit="case", disable=not progress,
                  leave=False) as bar:
            for case_id, entry, info, seconds, rss in _case_results(job, tmp_dir, ids, _file_stems(ids)):
                if not entries and job.on_first_case is not None:
                    job.on_first_case(CaseTiming(case_id, entry["n_slices"], seconds, job.processes,
                                                 int(job.settings.get("channels", 1))))
                entries[case_id] = entry
                peak_rss.append(rss)
                if job.on_case is not None:
                    job.on_case(case_id, info)
                bar.update()
        manifest = {
            "complete": True,
            "settings": job.settings,
            "source": {"root": str(source.root), "fingerprint": source.fingerprint(),
                       "labels": {str(k): v for k, v in source.labels.items()}, "modality": source.modality},
            "build_seconds": round(time.perf_counter() - started, 3),
            "build": {"processes": job.processes, "peak_rss_mb": round(max(peak_rss), 1)},
            "cases": [entries[c] for c in ids],
        }
        atomic_write_json(tmp_dir / "manifest.json", manifest)
        os.replace(tmp_dir, prep_dir)  # a folder rename is atomic: readers see all or nothing
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


_malloc_trim: Any = None  # glibc's malloc_trim, looked up on first use; False where there is none


def _release_freed_memory() -> None:
    """Hand the freed case back to the OS before the next one is decoded.

    glibc keeps part of the freed heap (its mmap threshold rises after large frees), so without this the peak
    RSS crept up with the number of cases (+25 MB over 4 cases of 512x512x100). No-op without glibc.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes

        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def _file_stems(case_ids: Iterable[str]) -> dict[str, str]:
    """case id -> file stem in the cache folder: the id itself when it is a safe name, else the sanitised id
    plus a short hash of the id, so two ids never share files ("a b" and "a_b"; "A" and "a" on a
    case-insensitive file system)."""
    stems: dict[str, str] = {}
    taken: set[str] = set()
    for case_id in case_ids:
        safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in case_id)
        if safe != case_id or safe.lower() in taken:
            safe = f"{safe}-{stable_hash(case_id, 8)}"
        taken.add(safe.lower())
        stems[case_id] = safe
    return stems


def _reserve(path: Path) -> None:
    """Allocate a memory-mapped file's blocks now: a sparse map on a full disk fails with SIGBUS when a page is first
    written (the process dies without a word), an allocation fails with ENOSPC, which ``disk_full_as_error`` words."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: as before
        return
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: as before
                return
            raise


def _write_case(out_dir: Path, case, settings: dict[str, Any], stem: str) -> dict[str, Any]:
    """Normalise, resize and store one case slice by slice; return its manifest entry.

    Nothing volume-sized is allocated here: statistics are accumulated per slice (a full-volume np.bincount
    would cast the labels to int64, 8 bytes per voxel) or taken from a strided sample.
    """
    size = settings["image_size"]
    channels = int(settings.get("channels", 1))
    image, label = case.image, case.label
    have = image.shape[3] if image.ndim == 4 else 1
    if have != channels:
        raise DataError(f"{case.source} (case {case.case_id}): image has {have} channel(s), the cache {channels}")
    low, high = float(image.min()), float(image.max())
    norm, method = make_normaliser(image, settings, minimum=low)
    n_slices = image.shape[2]
    img_name, lbl_name = f"{stem}.img.npy", f"{stem}.lbl.npy"
    kept = "the cache is not built and nothing of it is kept (its temp folder is removed)"
    img_shape = (n_slices, size, size) if channels == 1 else (n_slices, channels, size, size)
    with disk_full_as_error(out_dir / img_name, kept=kept):
        img_out = np.lib.format.open_memmap(out_dir / img_name, mode="w+", dtype=np.float16, shape=img_shape)
        _reserve(out_dir / img_name)
    with disk_full_as_error(out_dir / lbl_name, kept=kept):
        lbl_out = np.lib.format.open_memmap(out_dir / lbl_name, mode="w+", dtype=np.uint8, shape=(n_slices, size, size))
        _reserve(out_dir / lbl_name)
    fg = []
    counts = np.zeros(256, np.int64)  # voxels per label value, original resolution
    fg_sum = 0.0
    channel_sum, channel_sum_sq = np.zeros(channels), np.zeros(channels)
    for z in range(n_slices):
        plane = image[:, :, z]  # a view: Fortran-ordered (contiguous) for NIfTI volumes; (X, Y, C) for colour
        lbl = np.ascontiguousarray(label[:, :, z])  # labels decoded from pickles are C-ordered: gather the plane once
        resized = resize_slice(norm(plane), size, is_label=False)
        if channels == 1:
            img_out[z] = resized
        else:
            img_out[z] = resized.transpose(2, 0, 1)
            stored = np.asarray(img_out[z], np.float64)  # the float16 values training reads
            channel_sum += stored.sum(axis=(1, 2))
            channel_sum_sq += np.square(stored).sum(axis=(1, 2))
        small = resize_slice(lbl, size, is_label=True)
        lbl_out[z] = small
        fg.append(int(np.count_nonzero(small)))
        if lbl.any():
            on = lbl != 0
            counts += np.bincount(lbl[on], minlength=256)
            fg_sum += float(plane[on].sum(dtype=np.float64)) / channels  # colour: the mean over the channels
    img_out.flush()
    lbl_out.flush()
    del img_out, lbl_out
    n_fg = int(counts[1:].sum())
    entry = {
        "case_id": case.case_id,
        "source": case.source,
        "n_slices": n_slices,
        "orig_shape": list(case.label.shape),  # the image's geometry (its channels in the settings)
        "spacing": [float(s) for s in case.spacing],
        "normalisation": method,
        "fg_per_slice": fg,
        "image_file": img_name,
        "label_file": lbl_name,
        "image_bytes": (out_dir / img_name).stat().st_size,
        "label_bytes": (out_dir / lbl_name).stat().st_size,
        "intensity": {**_intensity_stats(image, low, high), "fg_mean": fg_sum / n_fg if n_fg else None},
        "voxels_per_label": {str(v): int(counts[v]) for v in np.flatnonzero(counts) if v != 0},
    }
    if channels > 1:
        entry["channel_sums"] = {"pixels": n_slices * size * size, "sum": channel_sum.tolist(),
                                 "sum_sq": channel_sum_sq.tolist()}
    return entry


# ------------------------------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class CaseTiming:
    """The first case a build made: what the estimate of the whole build is measured on."""

    case_id: str
    slices: int
    seconds: float  # decode, preprocess, write (and case_info) in the process that made it
    processes: int  # the build's processes (build_processes)
    channels: int = 1  # of the cached images (settings["channels"])


@dataclass
class CacheEstimate:
    """A task's cache on disk and its build time: estimated before the build (``estimate_build``) or, when the cache
    exists, read from its manifest (``of_cache``)."""

    cases: int
    slices: int
    bytes: int
    image_size: int
    processes: int | None  # None: a manifest written before the build recorded them
    seconds: float | None  # the build's wall clock
    seconds_per_slice: float | None = None  # measured on one case (None: the cache exists)
    measured_on: str | None = None  # that case's id
    exists: bool = False
    path: str | None = None  # the cache folder, when it exists

    @classmethod
    def of_cache(cls, cache: SliceCache) -> CacheEstimate:
        """The real figures of a built cache: its files' bytes, its ``build_seconds`` and processes."""
        cases = cache.manifest["cases"]
        return cls(len(cases), sum(int(c["n_slices"]) for c in cases),
                   sum(int(c["image_bytes"]) + int(c["label_bytes"]) for c in cases), int(cache.settings["image_size"]),
                   cache.manifest.get("build", {}).get("processes"), cache.manifest.get("build_seconds"), exists=True,
                   path=str(cache.root))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def npy_file_bytes(shape: tuple[int, ...], dtype) -> int:
    """Bytes of the ``.npy`` file ``np.lib.format.open_memmap`` writes for ``shape`` and ``dtype``: its header (format
    1.0, padded to a multiple of 64 bytes: 128 for a cached volume) and the data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})
    return header.tell() + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def cache_bytes(slices_per_case: Iterable[int], image_size: int, channels: int = 1) -> int:
    """Bytes on disk of a cache of cases with these slice counts: per case a float16 image and a uint8 label volume
    of (slices, image_size, image_size), as ``_write_case`` writes them (the manifest's few kB not counted); a colour
    image (``channels`` > 1) is (slices, channels, image_size, image_size)."""
    total = 0
    for n in slices_per_case:
        image = (n, image_size, image_size) if channels == 1 else (n, channels, image_size, image_size)
        total += npy_file_bytes(image, np.float16) + npy_file_bytes((n, image_size, image_size), np.uint8)
    return total


def estimate_build(dataset_cfg, slices: dict[str, int], timing: CaseTiming) -> CacheEstimate:
    """The cache of the cases ``slices`` (case id -> slices, from ``Source.shape``) at ``dataset.image_size``, and
    its build time: the per-slice cost measured by ``timing`` over every slice, spread over its processes (auto
    workers: the first case made in this process, the rest in the processes)."""
    per_slice = timing.seconds / max(1, timing.slices)
    total, size = sum(slices.values()), int(dataset_cfg.image_size)
    here = timing.slices if getattr(dataset_cfg, "cache_workers", None) is None else 0
    seconds = per_slice * (here + (total - here) / timing.processes)
    return CacheEstimate(len(slices), total, cache_bytes(slices.values(), size, timing.channels), size,
                         timing.processes, seconds, per_slice, timing.case_id)


def time_first_case(dataset_cfg, source, case_info: Callable | None = None) -> CaseTiming:
    """What a build of these settings measures first, without building: the first case decoded, preprocessed and
    written (and ``case_info`` run on it) into a temporary folder in ``dataset.cache_dir``, the disk the cache goes to;
    the folder is removed."""
    ids = source.case_ids()
    if not ids:
        raise DataError(f"{source.root}: no cases to cache")
    settings = source_settings(dataset_cfg, source)
    cache_dir = Path(dataset_cfg.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _warm_imports()
    with tempfile.TemporaryDirectory(prefix=".estimate-", dir=cache_dir) as tmp:
        entry, _, seconds = _cache_case(source, settings, Path(tmp), _file_stems(ids[:1]), case_info, ids[0])
    channels = int(settings.get("channels", 1))
    processes = build_processes(getattr(dataset_cfg, "cache_workers", None), len(ids), seconds,
                                [*entry["orig_shape"], channels])
    return CaseTiming(ids[0], entry["n_slices"], seconds, processes, channels)
