"""Parallel cache build: 1 worker process against 2 on the same task, in one run.

    python benchmarks/bench_cache_parallel.py            # 4 cases of 512x512x200 in Kaggle form, 256-px cache
    python benchmarks/bench_cache_parallel.py --quick    # 4 cases of 256x256x48: a smoke run

Each build runs in a fresh interpreter (``bench_cache.py``'s child process) into an empty cache folder, with
``dataset.cache_workers`` set to 1 (the cases preprocessed in that process) or 2 (two spawned worker processes, one
case each at a time); the two alternate ``--repeats`` times so that a change in machine load hits both alike.
Peak RSS per worker: the builder's own VmHWM with 1 worker, each worker's VmHWM (reported into the cache manifest)
with 2. Targets: speedup >= 1.8, peak RSS per worker 2 / 1 <= 1.1. Also the projected build time of Task001
(87 volumes, ~35,000 512x512 slices) on 16 cores from the measured per-slice cost.
Writes benchmarks/results/cache_parallel.json (cache_parallel_quick.json with --quick; --out to choose).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.bench_cache import PACKAGES, _peak_rss_mb, _task
from benchmarks.common import add_out_arg, child_job, machine_info, out_path, print_child_result, run_child, write_json

SPEEDUP_TARGET = 1.8
RSS_RATIO_TARGET = 1.1
TASK001_SLICES = 35_000  # Task001_LiverTumor: 87 CT volumes of 512x512 by 74-987 slices (issue figures)
PROJECTED_CORES = 16


@dataclass
class Job:
    task: str
    cache_dir: str
    image_size: int
    workers: int


def _child_build(job: Job) -> dict:
    """``build_cache`` with ``job.workers`` processes, timed, in this fresh interpreter."""
    import cv2  # noqa: F401  (imported before the clock starts, as in bench_cache.py)
    import nibabel  # noqa: F401

    from medseg.config import DatasetConfig
    from medseg.data.cache import build_cache

    cfg = DatasetConfig.model_validate({"format": "kaggle", "path": job.task, "cache_dir": job.cache_dir,
                                        "image_size": job.image_size, "cache_workers": job.workers,
                                        "window": {"level": 60, "width": 400}})
    started = time.perf_counter()
    cache = build_cache(cfg, progress=False)
    seconds = time.perf_counter() - started
    slices = sum(cache.n_slices(c) for c in cache.case_ids)
    build = cache.manifest["build"]
    per_worker = build["peak_rss_mb"] if build["processes"] > 1 else _peak_rss_mb()
    cache_bytes = sum(p.stat().st_size for p in cache.root.glob("*.npy"))
    return {"workers": job.workers, "processes": build["processes"], "cases": len(cache.case_ids), "slices": slices,
            "seconds": seconds, "seconds_per_slice": seconds / slices, "peak_rss_mb_per_worker": per_worker,
            "builder_peak_rss_mb": _peak_rss_mb(), "cache_mb": cache_bytes / 2**20}


def _measure(task: Path, workdir: Path, image_size: int, workers: int) -> dict:
    cache_dir = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
    try:
        child = run_child(__file__, asdict(Job(str(task), str(cache_dir), image_size, workers)),
                          what=f"{workers}-worker build", stderr_tail=2000)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {**child.result, "loadavg_1min": child.loadavg_1min}


def _results(args, runs: dict[int, list[dict]], volume: list[int]) -> dict:
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "seconds_per_slice",
                                                                "peak_rss_mb_per_worker", "cache_mb")}
           for w, rs in runs.items()}
    speedup = med[1]["seconds"] / med[2]["seconds"]
    rss_ratio = med[2]["peak_rss_mb_per_worker"] / med[1]["peak_rss_mb_per_worker"]
    per_slice = med[1]["seconds_per_slice"]
    projected = TASK001_SLICES * per_slice / PROJECTED_CORES
    return {
        "benchmark": "cache_parallel",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(PACKAGES),
        "params": {"cases": args.cases, "volume": volume, "image_size": args.image_size, "repeats": args.repeats},
        "one_worker": {**{k: round(v, 4) for k, v in med[1].items()}, "runs": runs[1]},
        "two_workers": {**{k: round(v, 4) for k, v in med[2].items()}, "runs": runs[2]},
        "speedup": round(speedup, 3),
        "peak_rss_per_worker_ratio": round(rss_ratio, 3),
        "projection": {"task": "Task001_LiverTumor", "slices": TASK001_SLICES, "cores": PROJECTED_CORES,
                       "seconds_per_slice_one_worker": round(per_slice, 4),
                       "minutes_one_worker": round(TASK001_SLICES * per_slice / 60, 1),
                       "minutes": round(projected / 60, 1),
                       "assumes": "linear scaling with cores (bzip2 decompression, one case per worker) and at "
                                  "least 16 cases; cache size scales with image_size^2"},
        "targets": {"speedup": {"target": f">= {SPEEDUP_TARGET}", "value": round(speedup, 3),
                                "met": speedup >= SPEEDUP_TARGET},
                    "peak_rss_per_worker_ratio": {"target": f"<= {RSS_RATIO_TARGET}", "value": round(rss_ratio, 3),
                                                  "met": rss_ratio <= RSS_RATIO_TARGET}},
    }


def main(argv: list[str] | None = None) -> int:
    job = child_job(argv)
    if job is not None:
        return print_child_result(_child_build(Job(**job)))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 cases of 256x256x48")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, help="keep the generated task here and reuse it (default: temp)")
    add_out_arg(parser, "cache_parallel[_quick].json")
    args = parser.parse_args(argv)
    size, slices = (256, 48) if args.quick else (512, 200)
    workdir = Path(tempfile.mkdtemp(prefix="bench_cache_parallel-"))
    try:
        data_dir = args.data_dir or workdir
        data_dir.mkdir(parents=True, exist_ok=True)
        task = _task(data_dir, cases=args.cases, size=size, slices=slices)
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for i in range(args.repeats):
            for workers in (1, 2) if i % 2 == 0 else (2, 1):
                runs[workers].append(_measure(task, workdir, args.image_size, workers))
                r = runs[workers][-1]
                print(f"  repeat {i + 1}, {workers} worker(s): {r['seconds']:.1f} s, peak RSS per worker "
                      f"{r['peak_rss_mb_per_worker']:.0f} MB (load {r['loadavg_1min'][0]:.2f})", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = _results(args, runs, [size, size, slices])
    out = out_path(args, f"cache_parallel{'_quick' if args.quick else ''}")
    write_json(out, results)
    print(json.dumps({k: results[k] for k in ("speedup", "peak_rss_per_worker_ratio", "projection", "targets")},
                     indent=2))
    print(f"  -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
