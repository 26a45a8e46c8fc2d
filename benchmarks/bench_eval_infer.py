"""Eval and infer at real size: is their peak memory independent of the number of cases, and do they run at the speed
of the model's forward pass?

    python benchmarks/bench_eval_infer.py            # 5 cases of 512x512x300 in Kaggle form: 1 case against 4
    python benchmarks/bench_eval_infer.py --quick    # 5 cases of 256x256x48: a smoke run

Data: one synthetic task (bzip2 CT.zip of NIfTI + GroundTruth pickles, bench_cache.py's ``_task``), generated once
into --data-dir or a temp folder. Checkpoint: the shipped real-data config (configs/kaggle_task001_liver_tumor.yaml:
UNet/resnet34, 2.5D, 256 px) trained by ``medseg.training.fit`` for a token epoch of 16 samples on that task
(validation on 1 case and the post-processing choice included; its quality is irrelevant here). Each measurement runs
in a fresh interpreter with the same ``torch.set_num_threads`` (--threads, default the cores available):

  eval:  ``run_eval_cli`` (eval.py --ckpt --no-mlflow --allow-split-mismatch) on a val split of 1 case and one of
         4 cases (dataset.split.val_fraction 0.2 / 0.8, test_fraction 0)
  infer: ``run_inference`` (infer.py --case ..., overlays included) on 1 and on 4 cases of the task folder
  bare:  the model of the same checkpoint on the same 4 cases' preprocessed 2.5D slices (``Predictor.preprocess``,
         stacked as ``slice_logits`` does, outside the clock), batch 16, ``torch.no_grad()``, forward only, after
         one warm-up batch (eval's 4 validation cases may differ from them by one: every case has the same size);
         once as a bare forward runs (contiguous NCHW, float32: the target's reference) and once in the predictor's
         memory format and precision (``matched``: what eval and infer add to their own forward, no target)
Peak RSS is each child's VmHWM (bench_cache.py's ``_peak_rss_mb``); eval and infer also report the seconds spent in
each stage (decode, preprocess, forward, post-processing, scoring, writing), timed around the project's functions.
Targets: peak RSS of 4 cases / 1 case <= 1.2 for eval and infer; slices/s of eval and infer on 4 cases / bare
forward >= 0.9. Writes benchmarks/results/eval_infer.json (eval_infer_quick.json with --quick; --out to choose).
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.bench_cache import _peak_rss_mb, _task
from benchmarks.common import (
    REPO,
    RunClock,
    add_out_arg,
    child_job,
    machine_info,
    out_path,
    print_child_result,
    repo_relative,
    run_child,
    write_json,
)

CONFIG = REPO / "configs" / "kaggle_task001_liver_tumor.yaml"
BATCH_SIZE = 16  # eval.py's (evaluate_checkpoint's default) and infer.py's --batch-size default
RSS_RATIO_TARGET = 1.2
SPEED_RATIO_TARGET = 0.9
VAL_FRACTIONS = {1: 0.2, 4: 0.8}  # of 5 cases, test_fraction 0: 1 and 4 validation cases
PACKAGES = ("numpy", "torch", "segmentation-models-pytorch", "nibabel", "opencv-python-headless", "scipy")


@dataclass
class Job:
    """One child process: train the checkpoint, or one eval / infer / bare measurement."""

    kind: str  # train | eval | infer | bare
    threads: int
    task: str = ""
    ckpt: str = ""
    work: str = ""  # train: its run folder; eval / infer: an empty output folder
    cache: str = ""  # train: the cache folder
    cases: int = 1  # eval: validation cases; infer / bare: the first ``cases`` cases of the task


# ----------------------------------------------------------------------------------------- child process


@dataclass
class Stages:
    """Seconds spent inside some of the project's functions (patched in this child only), and the slices predicted."""

    seconds: dict = field(default_factory=lambda: defaultdict(float))
    slices: int = 0
    cases: int = 0
    batch_size: int | None = None

    def _add(self, stage: str, started: float) -> None:
        self.seconds[stage] += time.perf_counter() - started

    def time_calls(self, owner, name: str, stage: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(stage, started)
        setattr(owner, name, timed)

    def time_iteration(self, owner, name: str, stage: str) -> None:
        """A generator function: the time spent producing its items (not the caller's time between them)."""
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            items = fn(*args, **kwargs)
            while True:
                started = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    self._add(stage, started)
                yield item
        setattr(owner, name, timed)

    def count_slices(self, predictor_class) -> None:
        """Cases and slices through ``predict_planes`` (which ``predict`` calls after preprocessing)."""
        predict = predictor_class.predict_planes

        @functools.wraps(predict)
        def counted(predictor, planes, shape, *args, **kwargs):
            self.slices += shape[2]
            self.cases += 1
            self.batch_size = predictor.batch_size
            return predict(predictor, planes, shape, *args, **kwargs)
        predictor_class.predict_planes = counted

    def report(self) -> dict:
        return {name: round(s, 3) for name, s in sorted(self.seconds.items())}


def _instrument(kind: str) -> Stages:
    """Stage timers around the functions eval.py or infer.py run (inclusive: predict, ``Predictor.predict_planes``,
    holds forward and post-processing; preprocess, when the cache cannot serve, is outside it)."""
    import medseg.evaluation
    import medseg.inference
    import medseg.plots
    import medseg.postprocess
    import medseg.training
    from medseg.data.sources.kaggle_evalseg import KaggleEvalsegSource

    stages = Stages()
    inf = medseg.inference
    stages.time_calls(inf, "model_from_checkpoint", "model_load")
    stages.time_calls(inf.Predictor, "predict_planes", "predict")
    stages.time_calls(inf.Predictor, "preprocess", "preprocess")
    stages.time_iteration(inf, "slice_logits", "forward")
    stages.time_calls(medseg.postprocess, "apply", "postprocess")
    stages.count_slices(inf.Predictor)
    if kind == "eval":
        stages.time_calls(medseg.training, "prepare_data", "prepare_data")
        stages.time_calls(KaggleEvalsegSource, "load", "decode")  # image and label, when the cache cannot serve
        stages.time_calls(KaggleEvalsegSource, "load_label", "decode_label")  # the label alone, images from the cache
        stages.time_calls(medseg.evaluation, "score_case", "score")
    else:
        stages.time_calls(KaggleEvalsegSource, "load_image", "decode")
        stages.time_calls(inf, "write_mask", "write_mask")
        stages.time_calls(medseg.plots, "overlay_png", "overlay")
    return stages


def _first_cases(task: str, n: int) -> list[str]:
    from medseg.data.sources import open_source

    return open_source("kaggle", task, allow_missing=True).image_ids()[:n]


def _run_eval(job: Job) -> None:
    from medseg.evaluation import eval_config, run_eval_cli

    split = [f"dataset.split.val_fraction={VAL_FRACTIONS[job.cases]}", "dataset.split.test_fraction=0"]
    cfg = eval_config(ckpt=job.ckpt, overrides=split)
    run_eval_cli(cfg, ckpt=job.ckpt, split="val", allow_split_mismatch=True, out=job.work, mlflow=False)


def _run_infer(job: Job) -> None:
    from medseg.inference import run_inference

    run_inference(job.ckpt, job.task, job.work, case_ids=_first_cases(job.task, job.cases), batch_size=BATCH_SIZE)


def _child_pipeline(job: Job) -> dict:
    """eval.py's or infer.py's work in this fresh interpreter: wall time, slices/s, peak RSS, stage seconds."""
    import torch

    torch.set_num_threads(job.threads)
    stages = _instrument(job.kind)
    before = _peak_rss_mb()
    started = time.perf_counter()
    (_run_eval if job.kind == "eval" else _run_infer)(job)
    seconds = time.perf_counter() - started
    return {"kind": job.kind, "cases": stages.cases, "slices": stages.slices, "seconds": seconds,
            "slices_per_s": stages.slices / seconds, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": before,
            "batch_size": stages.batch_size, "threads": torch.get_num_threads(), "stages_s": stages.report()}


def _child_bare(job: Job) -> dict:
    """The model alone on the preprocessed, 2.5D-stacked slices of the first ``job.cases`` cases, twice: as a bare
    forward runs it (the model as smp builds it: contiguous NCHW, float32) and in the predictor's own memory format
    and precision (channels_last per ``training.channels_last``): eval's and infer's overhead alone."""
    import numpy as np
    import torch

    from medseg.data.dataset import stack_context
    from medseg.data.sources import open_source
    from medseg.inference import Predictor
    from medseg.models import autocast, memory_format

    torch.set_num_threads(job.threads)
    predictor = Predictor(job.ckpt, batch_size=BATCH_SIZE)
    source = open_source("kaggle", job.task, allow_missing=True)
    batches = []
    for case_id in _first_cases(job.task, job.cases):
        volume = predictor.preprocess(source.load_image(case_id)[0])
        for start in range(0, volume.shape[0], BATCH_SIZE):
            zs = range(start, min(volume.shape[0], start + BATCH_SIZE))
            stacked = np.stack([stack_context(volume, z, predictor.context) for z in zs])
            batches.append(torch.from_numpy(stacked).to(predictor.device))
    slices = sum(len(x) for x in batches)
    model = predictor.model.eval()
    matched = memory_format(predictor.channels_last)
    timed = {}
    for name, fmt, precision in (("naive", torch.contiguous_format, "fp32"),
                                 ("matched", matched, predictor.precision)):
        model = model.to(memory_format=fmt)
        inputs = [x.contiguous(memory_format=fmt) for x in batches]  # outside the clock
        with torch.no_grad(), autocast(predictor.device, precision):
            model(inputs[0])  # warm-up: the first call picks its kernels
            _synchronize(predictor.device)
            started = time.perf_counter()
            for x in inputs:
                model(x)
            _synchronize(predictor.device)
            timed[name] = {"seconds": time.perf_counter() - started, "precision": precision,
                           "channels_last": fmt == torch.channels_last}
        timed[name]["slices_per_s"] = slices / timed[name]["seconds"]
        del inputs
    naive = timed["naive"]
    return {"kind": "bare", "cases": job.cases, "slices": slices, "seconds": naive["seconds"],
            "slices_per_s": naive["slices_per_s"], "matched": timed["matched"], "naive": naive,
            "peak_rss_mb": _peak_rss_mb(), "batch_size": BATCH_SIZE, "threads": torch.get_num_threads(),
            "device": str(predictor.device)}


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _child_train(job: Job) -> dict:
    """The token epoch of the shipped real-data config on the task: best.pt and how long it took."""
    from medseg.config import load_config
    from medseg.training import fit

    task = Path(job.task)
    overrides = [f"dataset.path={task.parent}", f"dataset.task={task.name}", f"dataset.cache_dir={job.cache}",
                 f"dataset.split.val_fraction={VAL_FRACTIONS[1]}", "dataset.split.test_fraction=0",
                 "training.epochs=1", "training.samples_per_epoch=16", "training.warmup_epochs=0",
                 "training.num_workers=0", f"training.threads={job.threads}", f"output.run_dir={job.work}"]
    started = time.perf_counter()
    result = fit(load_config(CONFIG, overrides), progress=False)
    return {"kind": "train", "checkpoint": str(result.best_checkpoint), "seconds": time.perf_counter() - started,
            "val_dice": result.best_metrics.get("val/dice"), "postprocessing": result.postprocessing,
            "overrides": overrides}


CHILDREN = {"train": _child_train, "eval": _child_pipeline, "infer": _child_pipeline, "bare": _child_bare}


# ----------------------------------------------------------------------------------------- parent


@dataclass
class Plan:
    size: int
    slices: int
    threads: int
    repeats: int
    quick: bool
    cases: int = 5  # in the task: 4 validation cases beside 1 training case


def _measure(kind: str, plan: Plan, task: Path, ckpt: str, workdir: Path, cases: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir))
    job = Job(kind, plan.threads, task=str(task), ckpt=ckpt, work=str(out), cases=cases)
    try:
        child = run_child(__file__, asdict(job), what=f"{kind} on {cases} case(s)", stderr_tail=2000)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {**child.result, "wall_s": round(child.wall_s, 2), "loadavg_1min": child.loadavg_1min}


def _train(plan: Plan, task: Path, data_dir: Path, workdir: Path) -> dict:
    """best.pt of the token epoch (its cache in ``data_dir``, reused by later runs; its run folder in ``workdir``)."""
    job = Job("train", plan.threads, task=str(task), work=str(workdir / "runs"), cache=str(data_dir / "cache"))
    result = run_child(__file__, asdict(job), what="training the checkpoint", stderr_tail=2000).result
    print(f"  checkpoint: a token epoch in {result['seconds']:.0f} s (with the cache build and validation)", flush=True)
    return result


def _measure_all(plan: Plan, data_dir: Path | None) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench_eval_infer-"))
    data_dir = data_dir or workdir
    data_dir.mkdir(parents=True, exist_ok=True)
    runs: dict = {f"{kind}_{n}": [] for kind in ("eval", "infer") for n in (1, 4)} | {"bare_4": []}
    try:
        print(f"data in {data_dir}", flush=True)
        task = _task(data_dir, cases=plan.cases, size=plan.size, slices=plan.slices)
        train = _train(plan, task, data_dir, workdir)
        for i in range(plan.repeats):
            order = [("eval", 1), ("eval", 4), ("infer", 1), ("infer", 4), ("bare", 4)]
            for kind, n in order if i % 2 == 0 else order[::-1]:
                r = _measure(kind, plan, task, train["checkpoint"], workdir, n)
                runs[f"{kind}_{n}"].append(r)
                print(f"  repeat {i + 1}, {kind} {n} case(s): {r['slices']} slices in {r['seconds']:.1f} s "
                      f"({r['slices_per_s']:.2f} slices/s), peak RSS {r['peak_rss_mb']:.0f} MB "
                      f"(load {r['loadavg_1min'][0]:.2f})", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"train": train, "runs": runs}


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _target(value: float, target: float, at_most: bool) -> dict:
    return {"target": f"{'<=' if at_most else '>='} {target}", "value": round(value, 3),
            "met": value <= target if at_most else value >= target}


def _results(plan: Plan, measured: dict, clock: RunClock) -> dict:
    runs = measured["runs"]
    med = {name: {k: round(_median(rs, k), 3) for k in ("seconds", "slices_per_s", "peak_rss_mb")}
           for name, rs in runs.items()}
    bare = med["bare_4"]["slices_per_s"]
    matched = statistics.median(r["matched"]["slices_per_s"] for r in runs["bare_4"])
    med["bare_4_matched"] = {"slices_per_s": round(matched, 3), **{k: runs["bare_4"][0]["matched"][k]
                                                                   for k in ("precision", "channels_last")}}
    ratios = {f"{kind}_peak_rss_4_over_1": med[f"{kind}_4"]["peak_rss_mb"] / med[f"{kind}_1"]["peak_rss_mb"]
              for kind in ("eval", "infer")}
    ratios |= {f"{kind}_over_bare_slices_per_s": med[f"{kind}_4"]["slices_per_s"] / bare for kind in ("eval", "infer")}
    targets = {name: _target(v, RSS_RATIO_TARGET, True) if "rss" in name else _target(v, SPEED_RATIO_TARGET, False)
               for name, v in ratios.items()}
    # no target: the same forward in the predictor's memory format and precision (what eval and infer add to it)
    ratios |= {f"{kind}_over_matched_bare_slices_per_s": med[f"{kind}_4"]["slices_per_s"] / matched
               for kind in ("eval", "infer")}
    return {
        "benchmark": "eval_infer",
        "machine": machine_info(PACKAGES, torch_threads=plan.threads),
        "params": {"volume": [plan.size, plan.size, plan.slices], "task_cases": plan.cases, "cases": [1, 4],
                   "batch_size": BATCH_SIZE, "config": repo_relative(CONFIG), "repeats": plan.repeats,
                   "quick": plan.quick},
        "checkpoint": {k: v for k, v in measured["train"].items() if k != "checkpoint"},
        "medians": med,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": targets,
        "runs": runs,
        "note": "timings on a shared machine: see loadavg_1min (before, after) of each run; stages_s are inclusive "
                "(predict holds forward and postprocess)",
        **clock.record(),
    }


def _print_summary(results: dict, out: Path) -> None:
    p, med = results["params"], results["medians"]
    print(f"eval and infer, {'x'.join(map(str, p['volume']))}, batch {p['batch_size']}, "
          f"{results['machine']['torch_threads']} threads, median of {p['repeats']}")
    for name, m in med.items():
        if "seconds" not in m:
            print(f"  {name:8s} {'':10s}  {m['slices_per_s']:7.2f} slices/s  ({m['precision']}, "
                  f"{'channels_last' if m['channels_last'] else 'contiguous'})")
            continue
        print(f"  {name:8s} {m['seconds']:8.1f} s  {m['slices_per_s']:7.2f} slices/s  "
              f"peak RSS {m['peak_rss_mb']:6.0f} MB")
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in results["ratios"].items() if "matched" in k))
    for name, t in results["targets"].items():
        print(f"  {name}: {t['value']:.3f} (target {t['target']}: {'met' if t['met'] else 'MISSED'})")
    stages = results["runs"]["infer_4"][0]["stages_s"], results["runs"]["eval_4"][0]["stages_s"]
    print(f"  stages, infer 4 cases: {stages[0]}\n  stages, eval 4 cases: {stages[1]}")
    print(f"  -> {out}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="volumes of 256x256x48")
    parser.add_argument("--size", type=int, help="in-plane voxels (default 512; quick 256)")
    parser.add_argument("--slices", type=int, help="slices per case (default 300; quick 48)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count(),
                        help="torch threads of every child (default: the cores available)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data-dir", type=Path,
                        help="keep the generated task and its cache here and reuse them (default: a temp dir)")
    add_out_arg(parser, "eval_infer[_quick].json")
    return parser


def main(argv: list[str] | None = None) -> int:
    job = child_job(argv)
    if job is not None:
        return print_child_result(CHILDREN[job["kind"]](Job(**job)))
    args = _parser().parse_args(argv)
    clock = RunClock()
    plan = Plan(size=args.size or (256 if args.quick else 512), slices=args.slices or (48 if args.quick else 300),
                threads=args.threads, repeats=args.repeats, quick=args.quick)
    results = _results(plan, _measure_all(plan, args.data_dir), clock)
    out = out_path(args, f"eval_infer{'_quick' if plan.quick else ''}")
    write_json(out, results)
    _print_summary(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
