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
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import (
    add_out_arg,
    child_job,
    machine_info,
    out_path,
    print_child_result,
    run_child,
    run_profiled,
    write_json,
)

TIME_RATIO_TARGET = 1.3
RSS_RATIO_TARGET = 1.1
PACKAGES = ("numpy", "torch", "nibabel", "opencv-python-headless", "opencv-python")


@dataclass
class Job:
    """One measurement, or the generation of a task, in a child process."""

    kind: str  # floor | build | generate
    task: str
    cache_dir: str | None = None  # build: an empty cache folder
    image_size: int | None = None  # build: the cache's image_size
    profile: bool = False  # build: under cProfile, its top printed to stderr
    cases: int = 1  # generate: cases of size x size x slices
    size: int | None = None
    slices: int | None = None


@dataclass
class Plan:
    """The volumes, cache size and repeats of one benchmark run (--quick: small ones)."""

    size: int  # in-plane voxels of the floor/build volume
    slices: int
    scale_slices: int  # slices per case of the 1-vs-N scaling run
    scale_cases: int
    image_size: int  # the cache's image_size
    repeats: int
    quick: bool
    profile: bool


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


def _child_generate(job: Job) -> dict:
    from medseg.data.synthetic import generate_task

    task = generate_task(job.task, cases=job.cases, size=job.size, slices=(job.slices, job.slices), seed=0)
    return {"task": str(task)}


def _decode_all(source, ids: list[str]) -> int:
    """The floor: every CT decoded as the reader does, nothing else; returns the slices read."""
    slices = 0
    for case_id in ids:
        image = source.load_image(case_id)[0]  # (the geometry object returned beside it holds the array too)
        slices += image.shape[2]
        del image
    return slices


def _build(job: Job, source) -> int:
    """``build_cache`` of the task into an empty cache folder (under cProfile with ``job.profile``); returns the
    slices cached."""
    from medseg.config import DatasetConfig
    from medseg.data.cache import build_cache

    cfg = DatasetConfig.model_validate({"format": "kaggle", "path": str(job.task), "cache_dir": job.cache_dir,
                                        "image_size": job.image_size, "window": {"level": 60, "width": 400}})
    if job.profile:
        cache = run_profiled(build_cache, cfg, source, progress=False, sort="cumulative", lines=25)
    else:
        cache = build_cache(cfg, source, progress=False)
    return sum(cache.n_slices(c) for c in cache.case_ids)


def _child_measure(job: Job) -> dict:
    """One floor or build measurement in this fresh interpreter."""
    import resource

    # The same imports for both kinds, so their peak RSS shares one baseline. DatasetConfig is validated on its
    # own: config_from_dict would also validate the model section, which imports torch (~0.5 GB of RSS).
    import cv2  # noqa: F401
    import filelock  # noqa: F401  (imported lazily by medseg: outside the timed region in both kinds)
    import nibabel  # noqa: F401
    import tqdm  # noqa: F401

    from medseg.config import DatasetConfig  # noqa: F401
    from medseg.data.cache import build_cache  # noqa: F401
    from medseg.data.sources import KaggleEvalsegSource

    source = KaggleEvalsegSource(job.task)
    ids = source.case_ids()
    before = _peak_rss_mb()
    started = time.perf_counter()
    slices = _decode_all(source, ids) if job.kind == "floor" else _build(job, source)
    seconds = time.perf_counter() - started
    return {"kind": job.kind, "cases": len(ids), "slices": slices, "seconds": seconds,
            "slices_per_s": slices / seconds, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": before,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


CHILDREN = {"generate": _child_generate, "floor": _child_measure, "build": _child_measure}


# ----------------------------------------------------------------------------------------- parent


def _measure(kind: str, task: Path, workdir: Path, image_size: int, profile: bool = False) -> dict:
    """One floor or build measurement in a fresh interpreter, with the load average before and after."""
    cache_dir = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
    job = Job(kind, str(task), cache_dir=str(cache_dir), image_size=image_size, profile=profile)
    try:
        child = run_child(__file__, asdict(job), what=f"{kind} measurement", stderr_tail=2000)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    result = child.result
    result["loadavg_1min"] = child.loadavg_1min
    if profile:
        result["profile"] = child.stderr
    return result


def _task(data_dir: Path, *, cases: int, size: int, slices: int) -> Path:
    """A synthetic task of ``cases`` volumes of size x size x slices, generated once per data folder.

    Generated in a child process, so this parent never grows (its memory would show in the children's ru_maxrss).
    """
    out = data_dir / f"synth-{cases}x{size}x{size}x{slices}"
    existing = sorted(out.glob("Task*/metadata.json"))
    if existing:
        return existing[0].parent
    started = time.perf_counter()
    job = Job("generate", str(out), cases=cases, size=size, slices=slices)
    task = Path(run_child(__file__, asdict(job), what="generating the synthetic task", stderr_tail=2000).result["task"])
    print(f"  generated {task.name}: {cases} x {size}x{size}x{slices} in {time.perf_counter() - started:.0f} s",
          flush=True)
    return task


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volumes (256 px, 64 / 32 slices)")
    parser.add_argument("--size", type=int, help="in-plane voxels of the floor/build volume (default 512; quick 256)")
    parser.add_argument("--slices", type=int, help="slices of the floor/build volume (default 200; quick 64)")
    parser.add_argument("--scale-slices", type=int,
                        help="slices per case of the 1-vs-N scaling run (default 100; quick 32)")
    parser.add_argument("--scale-cases", type=int, default=4, help="cases of the larger scaling task (default 4)")
    parser.add_argument("--image-size", type=int, help="cache image_size (default 256; quick 128)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, help="keep generated tasks here and reuse them (default: a temp dir)")
    parser.add_argument("--profile", action="store_true", help="also run one build under cProfile and print the top")
    add_out_arg(parser, "cache_build[_quick].json")
    return parser


def _plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    return Plan(size=args.size or (256 if quick else 512), slices=args.slices or (64 if quick else 200),
                scale_slices=args.scale_slices or (32 if quick else 100), scale_cases=args.scale_cases,
                image_size=args.image_size or (128 if quick else 256), repeats=args.repeats, quick=quick,
                profile=args.profile)


def _measure_all(plan: Plan, data_dir: Path | None) -> dict:
    """Floor and build interleaved on the main volume, then 1-case and N-case builds, each ``repeats`` times."""
    workdir = Path(tempfile.mkdtemp(prefix="bench_cache-"))
    data_dir = data_dir or workdir
    data_dir.mkdir(parents=True, exist_ok=True)
    runs: dict = {"floor": [], "build": [], "scale_1": [], "scale_n": [], "profile": None}
    try:
        print(f"data in {data_dir}", flush=True)
        main_task = _task(data_dir, cases=1, size=plan.size, slices=plan.slices)
        small_task = _task(data_dir, cases=1, size=plan.size, slices=plan.scale_slices)
        big_task = _task(data_dir, cases=plan.scale_cases, size=plan.size, slices=plan.scale_slices)
        for i in range(plan.repeats):
            runs["floor"].append(_measure("floor", main_task, workdir, plan.image_size))
            runs["build"].append(_measure("build", main_task, workdir, plan.image_size))
            print(f"  repeat {i + 1}: floor {runs['floor'][-1]['seconds']:.2f} s, build "
                  f"{runs['build'][-1]['seconds']:.2f} s (load {runs['build'][-1]['loadavg_1min'][1]:.2f})", flush=True)
        for i in range(plan.repeats):
            runs["scale_1"].append(_measure("build", small_task, workdir, plan.image_size))
            runs["scale_n"].append(_measure("build", big_task, workdir, plan.image_size))
            print(f"  scaling {i + 1}: peak RSS 1 case {runs['scale_1'][-1]['peak_rss_mb']:.0f} MB, "
                  f"{plan.scale_cases} cases {runs['scale_n'][-1]['peak_rss_mb']:.0f} MB", flush=True)
        if plan.profile:
            runs["profile"] = _measure("build", main_task, workdir, plan.image_size, profile=True)["profile"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return runs


def _summary(runs: list[dict]) -> dict:
    return {"seconds": round(_median(runs, "seconds"), 3), "slices_per_s": round(_median(runs, "slices_per_s"), 1),
            "peak_rss_mb": round(_median(runs, "peak_rss_mb"), 1),
            "rss_before_mb": round(_median(runs, "rss_before_mb"), 1)}


def _results(plan: Plan, runs: dict) -> dict:
    floor, build, scale_1, scale_n = runs["floor"], runs["build"], runs["scale_1"], runs["scale_n"]
    time_ratio = _median(build, "seconds") / _median(floor, "seconds")
    rss_ratio = _median(scale_n, "peak_rss_mb") / _median(scale_1, "peak_rss_mb")
    results = {
        "benchmark": "cache_build",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(PACKAGES),
        "params": {"volume": [plan.size, plan.size, plan.slices],
                   "scale_volume": [plan.size, plan.size, plan.scale_slices], "scale_cases": [1, plan.scale_cases],
                   "image_size": plan.image_size, "window": [60, 400], "repeats": plan.repeats, "quick": plan.quick},
        "floor": {**_summary(floor), "runs": floor},
        "build": {**_summary(build), "runs": build},
        "build_over_floor_time": round(time_ratio, 3),
        "scaling": {"one_case": {**_summary(scale_1), "runs": scale_1},
                    "n_cases": {**_summary(scale_n), "runs": scale_n},
                    "peak_rss_ratio": round(rss_ratio, 3)},
        "targets": {"build_over_floor_time": {"target": f"<= {TIME_RATIO_TARGET}", "value": round(time_ratio, 3),
                                              "met": time_ratio <= TIME_RATIO_TARGET},
                    "peak_rss_n_over_1": {"target": f"~1 (<= {RSS_RATIO_TARGET})", "value": round(rss_ratio, 3),
                                          "met": rss_ratio <= RSS_RATIO_TARGET}},
        "note": "timings on a shared machine: see loadavg_1min (before, after) of each run",
    }
    if runs["profile"]:
        results["profile_top"] = runs["profile"]
    return results


def _print_summary(plan: Plan, results: dict, out: Path) -> None:
    f, b = results["floor"], results["build"]
    s1, sn = results["scaling"]["one_case"], results["scaling"]["n_cases"]
    time_ratio = _median(b["runs"], "seconds") / _median(f["runs"], "seconds")
    rss_ratio = _median(sn["runs"], "peak_rss_mb") / _median(s1["runs"], "peak_rss_mb")
    loads = [r["loadavg_1min"][1] for r in f["runs"] + b["runs"] + s1["runs"] + sn["runs"]]
    print(f"cache build, {plan.size}x{plan.size}x{plan.slices} -> {plan.image_size}px, median of {plan.repeats}, "
          f"{results['machine']['cpu_count']} CPUs, load avg {min(loads):.1f}-{max(loads):.1f}")
    for label, s in (("floor (decode only)", f), ("build (build_cache)", b)):
        print(f"  {label}: {s['seconds']:7.2f} s  {s['slices_per_s']:7.1f} slices/s  peak RSS "
              f"{s['peak_rss_mb']:6.0f} MB")
    print(f"  build/floor time {time_ratio:.2f} (target <= {TIME_RATIO_TARGET}: "
          f"{'met' if time_ratio <= TIME_RATIO_TARGET else 'MISSED'})")
    print(f"  peak RSS, {plan.size}x{plan.size}x{plan.scale_slices}: 1 case {s1['peak_rss_mb']:.0f} MB, "
          f"{plan.scale_cases} cases {sn['peak_rss_mb']:.0f} MB, ratio {rss_ratio:.2f} (target <= {RSS_RATIO_TARGET}: "
          f"{'met' if rss_ratio <= RSS_RATIO_TARGET else 'MISSED'})")
    print(f"  -> {out}")
    if results.get("profile_top"):
        print(results["profile_top"])


def main(argv: list[str] | None = None) -> int:
    job = child_job(argv)
    if job is not None:
        return print_child_result(CHILDREN[job["kind"]](Job(**job)))
    args = _parser().parse_args(argv)
    plan = _plan(args)
    results = _results(plan, _measure_all(plan, args.data_dir))
    out = out_path(args, f"cache_build{'_quick' if plan.quick else ''}")
    write_json(out, results)
    _print_summary(plan, results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
