"""Cache build benchmark: does building the slice cache cost about what reading the data costs, and is its
peak memory independent of the number of cases?

    python benchmarks/bench_cache.py            # 1 case 512x512x200 (floor vs build); 1 vs 4 cases of 512x512x100
    python benchmarks/bench_cache.py --quick    # 256x256x64 and 256x256x32: a smoke run of a minute or two

Data: the synthetic generator's Kaggle layout (bzip2 CT.zip of NIfTI + GroundTruth pickles), written to a temp
folder (or reused from --data-dir). Each measurement runs in a fresh interpreter, so its peak RSS (VmHWM; see
``_peak_rss_mb``) is its own; timings are medians of --repeats runs, floor and build interleaved so that a change
in machine load hits both alike. The load average is recorded next to every timing.

  floor: decode every CT as the reader does (zip member as a stream -> nibabel -> float32), nothing else
  build: ``build_cache`` (CT window, --image-size) of the same task into an empty cache folder
Targets: build / floor time <= 1.3; peak RSS of a 4-case build / 1-case build ~ 1 (<= 1.1).
Writes benchmarks/results/cache_build.json (cache_build_quick.json with --quick; --out to choose).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model as _cpu_model, versions  # benchmarks/machine.py

REPO = Path(__file__).resolve().parents[1]
TIME_RATIO_TARGET = 1.3
RSS_RATIO_TARGET = 1.1


# ----------------------------------------------------------------------------------------- child process


def _peak_rss_mb() -> float:
    """Peak resident memory of this process: VmHWM, the high-water mark of this address space.

    Not ``ru_maxrss`` alone: Linux keeps it across execve, so a child started (vfork + exec) by a parent that
    once held 600 MB reports at least 600 MB whatever it does. ``ru_maxrss`` is the fallback off Linux.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def _child(args: argparse.Namespace) -> None:
    """One measurement in this fresh interpreter; prints one JSON line."""
    import resource

    sys.path.insert(0, str(REPO))
    if args.child == "generate":
        from medseg.data.synthetic import generate_task

        task = generate_task(args.task, cases=args.cases, size=args.size, slices=(args.slices, args.slices), seed=0)
        print(json.dumps({"task": str(task)}))
        return
    # The same imports for both kinds, so their peak RSS shares one baseline. DatasetConfig is validated on its
    # own: config_from_dict would also validate the model section, which imports torch (~0.5 GB of RSS).
    import cv2  # noqa: F401
    import filelock  # noqa: F401  (imported lazily by medseg: outside the timed region in both kinds)
    import nibabel  # noqa: F401
    import tqdm  # noqa: F401

    from medseg.config import DatasetConfig
    from medseg.data.cache import build_cache
    from medseg.data.sources import KaggleEvalsegSource

    source = KaggleEvalsegSource(args.task)
    ids = source.case_ids()
    before = _peak_rss_mb()
    started = time.perf_counter()
    if args.child == "floor":
        slices = 0
        for case_id in ids:
            image = source.load_image(case_id)[0]  # (the geometry object returned beside it holds the array too)
            slices += image.shape[2]
            del image
    else:
        cfg = DatasetConfig.model_validate({"format": "kaggle", "path": str(args.task), "cache_dir": args.cache_dir,
                                            "image_size": args.image_size, "window": {"level": 60, "width": 400}})
        if args.profile:
            import cProfile
            import io
            import pstats

            profiler = cProfile.Profile()
            cache = profiler.runcall(build_cache, cfg, source, progress=False)
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
            print(text.getvalue(), file=sys.stderr)
        else:
            cache = build_cache(cfg, source, progress=False)
        slices = sum(cache.n_slices(c) for c in cache.case_ids)
    seconds = time.perf_counter() - started
    print(json.dumps({"kind": args.child, "cases": len(ids), "slices": slices, "seconds": seconds,
                      "slices_per_s": slices / seconds, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": before,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _measure(kind: str, task: Path, workdir: Path, image_size: int, profile: bool = False) -> dict:
    cache_dir = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--task", str(task),
           "--cache-dir", str(cache_dir), "--image-size", str(image_size)] + (["--profile"] if profile else [])
    load_before = os.getloadavg()[0]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} measurement failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if profile:
        result["profile"] = done.stderr
    return result


# ----------------------------------------------------------------------------------------- parent


def _task(data_dir: Path, *, cases: int, size: int, slices: int) -> Path:
    """A synthetic task of ``cases`` volumes of size x size x slices, generated once per data folder.

    Generated in a child process, so this parent never grows (its memory would show in the children's ru_maxrss).
    """
    out = data_dir / f"synth-{cases}x{size}x{size}x{slices}"
    existing = sorted(out.glob("Task*/metadata.json"))
    if existing:
        return existing[0].parent
    started = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "generate", "--task", str(out),
           "--cases", str(cases), "--size", str(size), "--slices", str(slices)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"generating the synthetic task failed: {done.stderr.strip()[-2000:]}")
    task = Path(json.loads(done.stdout.strip().splitlines()[-1])["task"])
    print(f"  generated {task.name}: {cases} x {size}x{size}x{slices} in {time.perf_counter() - started:.0f} s",
          flush=True)
    return task


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _versions() -> dict:
    return versions(("numpy", "torch", "nibabel", "opencv-python-headless", "opencv-python"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volumes (256 px, 64 / 32 slices)")
    parser.add_argument("--size", type=int, help="in-plane voxels of the floor/build volume (default 512; quick 256)")
    parser.add_argument("--slices", type=int, help="slices of the floor/build volume (default 200; quick 64)")
    parser.add_argument("--scale-slices", type=int, help="slices per case of the 1-vs-N scaling run (default 100; quick 32)")
    parser.add_argument("--scale-cases", type=int, default=4, help="cases of the larger scaling task (default 4)")
    parser.add_argument("--image-size", type=int, help="cache image_size (default 256; quick 128)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, help="keep generated tasks here and reuse them (default: a temp dir)")
    parser.add_argument("--profile", action="store_true", help="also run one build under cProfile and print the top")
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/cache_build[_quick].json)")
    # internal: one measurement in a child process
    parser.add_argument("--child", choices=("floor", "build", "generate"), help=argparse.SUPPRESS)
    parser.add_argument("--cases", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    size = args.size or (256 if args.quick else 512)
    slices = args.slices or (64 if args.quick else 200)
    scale_slices = args.scale_slices or (32 if args.quick else 100)
    image_size = args.image_size or (128 if args.quick else 256)
    out_path = args.out or REPO / "benchmarks" / "results" / f"cache_build{'_quick' if args.quick else ''}.json"

    workdir = Path(tempfile.mkdtemp(prefix="bench_cache-"))
    data_dir = args.data_dir or workdir
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        print(f"data in {data_dir}", flush=True)
        main_task = _task(data_dir, cases=1, size=size, slices=slices)
        small_task = _task(data_dir, cases=1, size=size, slices=scale_slices)
        big_task = _task(data_dir, cases=args.scale_cases, size=size, slices=scale_slices)

        floor, build = [], []
        for i in range(args.repeats):
            floor.append(_measure("floor", main_task, workdir, image_size))
            build.append(_measure("build", main_task, workdir, image_size))
            print(f"  repeat {i + 1}: floor {floor[-1]['seconds']:.2f} s, build {build[-1]['seconds']:.2f} s "
                  f"(load {build[-1]['loadavg_1min'][1]:.2f})", flush=True)
        scale_1, scale_n = [], []
        for i in range(args.repeats):
            scale_1.append(_measure("build", small_task, workdir, image_size))
            scale_n.append(_measure("build", big_task, workdir, image_size))
            print(f"  scaling {i + 1}: peak RSS 1 case {scale_1[-1]['peak_rss_mb']:.0f} MB, "
                  f"{args.scale_cases} cases {scale_n[-1]['peak_rss_mb']:.0f} MB", flush=True)
        profile = _measure("build", main_task, workdir, image_size, profile=True)["profile"] if args.profile else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    time_ratio = _median(build, "seconds") / _median(floor, "seconds")
    rss_ratio = _median(scale_n, "peak_rss_mb") / _median(scale_1, "peak_rss_mb")

    def summary(runs: list[dict]) -> dict:
        return {"seconds": round(_median(runs, "seconds"), 3), "slices_per_s": round(_median(runs, "slices_per_s"), 1),
                "peak_rss_mb": round(_median(runs, "peak_rss_mb"), 1),
                "rss_before_mb": round(_median(runs, "rss_before_mb"), 1)}

    results = {
        "benchmark": "cache_build",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu_count": os.cpu_count(), "cpu": _cpu_model(), "platform": platform.platform(), **_versions()},
        "params": {"volume": [size, size, slices], "scale_volume": [size, size, scale_slices],
                   "scale_cases": [1, args.scale_cases], "image_size": image_size, "window": [60, 400],
                   "repeats": args.repeats, "quick": args.quick},
        "floor": {**summary(floor), "runs": floor},
        "build": {**summary(build), "runs": build},
        "build_over_floor_time": round(time_ratio, 3),
        "scaling": {"one_case": {**summary(scale_1), "runs": scale_1},
                    "n_cases": {**summary(scale_n), "runs": scale_n},
                    "peak_rss_ratio": round(rss_ratio, 3)},
        "targets": {"build_over_floor_time": {"target": f"<= {TIME_RATIO_TARGET}", "value": round(time_ratio, 3),
                                              "met": time_ratio <= TIME_RATIO_TARGET},
                    "peak_rss_n_over_1": {"target": f"~1 (<= {RSS_RATIO_TARGET})", "value": round(rss_ratio, 3),
                                          "met": rss_ratio <= RSS_RATIO_TARGET}},
        "note": "timings on a shared machine: see loadavg_1min (before, after) of each run",
    }
    if profile:
        results["profile_top"] = profile
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")

    f, b = results["floor"], results["build"]
    s1, sn = results["scaling"]["one_case"], results["scaling"]["n_cases"]
    loads = [r["loadavg_1min"][1] for r in floor + build + scale_1 + scale_n]
    print(f"cache build, {size}x{size}x{slices} -> {image_size}px, median of {args.repeats}, "
          f"{os.cpu_count()} CPUs, load avg {min(loads):.1f}-{max(loads):.1f}")
    print(f"  floor (decode only): {f['seconds']:7.2f} s  {f['slices_per_s']:7.1f} slices/s  peak RSS {f['peak_rss_mb']:6.0f} MB")
    print(f"  build (build_cache): {b['seconds']:7.2f} s  {b['slices_per_s']:7.1f} slices/s  peak RSS {b['peak_rss_mb']:6.0f} MB")
    print(f"  build/floor time {time_ratio:.2f} (target <= {TIME_RATIO_TARGET}: "
          f"{'met' if time_ratio <= TIME_RATIO_TARGET else 'MISSED'})")
    print(f"  peak RSS, {size}x{size}x{scale_slices}: 1 case {s1['peak_rss_mb']:.0f} MB, {args.scale_cases} cases "
          f"{sn['peak_rss_mb']:.0f} MB, ratio {rss_ratio:.2f} (target <= {RSS_RATIO_TARGET}: "
          f"{'met' if rss_ratio <= RSS_RATIO_TARGET else 'MISSED'})")
    print(f"  -> {out_path}")
    if profile:
        print(profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
