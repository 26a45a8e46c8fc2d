"""Training throughput benchmark: the full trainer against a bare PyTorch loop, and the DataLoader alone (CPU).

Does fit() train as fast as a bare loop over the same model, batch and data, and is its DataLoader never the
bottleneck?

    python benchmarks/bench_train.py            # 3 runs of 4 epochs x 64 slices, trainer + bare epochs in each
    python benchmarks/bench_train.py --quick    # 2 runs of 3 epochs x 48 slices: a smoke run
    python benchmarks/bench_train.py --threads 1 --set training.batch_size=8   # any config key can be overridden

Duration on the 2-core machine: about 3 min (default) and 1.5 min (quick) when idle, estimated from an idle smoke
run; 6.5-11 min and 4 min measured while another job kept one to two of its cores busy.

Data: ``generate_task(cases=12, size=128, slices=(24, 32), seed=0)`` in a temp folder (or --data DIR, reused when
it already holds the task), cached once through ``prepare_data`` with configs/exp_000_baseline.yaml, read once at
the start (cache and output folders moved to the temp folder, device cpu, epochs and samples_per_epoch from the
flags) and without its augmentation: both loops train on whole cached slices, so they do the same work. When the
config has augmentation, the loader is also measured with it (``loader_with_config_augment``). On CPU: the target
is the 2-core machine the project is developed on.

  trainer: ``fit(cfg, run_dir=tmp, progress=False)`` (no MLflow). Throughput is the history's per-epoch
           ``train/images_per_s`` (the train loop only); the wall time of the whole fit (validation, checkpoints,
           final plots) is reported beside it, split into those parts.
  bare:    the same model (build_model after the same seed), loss (build_loss), AdamW (lr, weight decay), batch
           size, threads and determinism setting, on the same slices: the cache's training slices preloaded as one
           tensor, batches in the order EpochSampler gives the trainer. Forward, loss, zero_grad, backward, step,
           loss.item(), nothing else. ``--bare fp32`` (default): naive float32 in contiguous NCHW, what a plain loop
           gets from the CPU; ``--bare trainer``: in the trainer's resolved ``training.precision`` and memory
           format, when its epoch losses equal the trainer's (checked): it does the same work.
  loader:  the trainer's DataLoader (SliceDataset + EpochSampler, built as fit builds them) iterated over the same
           batches with no model: images/s of loading alone.

Interleaving: each run is a fresh interpreter in which trainer and bare epochs alternate through fit's on_epoch
callback: T1 B1 T2 B2 ... (order TB), or B1 T1 B2 T2 ... (order BT: bare epoch 1 before fit starts, then the
callback of trainer epoch e runs bare epoch e+1); runs alternate TB, BT, TB. A trainer epoch and its bare twin are
thus seconds apart, and a change of machine load (on a shared 2-core machine, another busy process slows a step
2-5x) hits both alike.
The trainer/bare ratio is the median over epoch pairs of trainer images/s / bare images/s; the first epoch of each
run is warm-up (oneDNN primitive creation, allocator growth, page faults of the memory-mapped cache) and is only
kept in the raw data. The load average and the cores other processes used (from /proc/stat) are recorded with
every run: read the figures with them. On a busy machine even adjacent epochs can land 5x apart; the load-robust
ratio then compares each loop's fastest step (warm epochs of all runs pooled), as timeit takes the minimum.

On a GPU: ``--set training.device=cuda`` (the default override is cpu) moves both loops there, with the
config's ``training.amp`` in both (autocast as fit's, GradScaler only for fp16); ``--set dataset.image_size=512``
changes the slice size (the cache is built at that size). The peak GPU memory each loop allocated
(torch.cuda.max_memory_allocated, reset between loops) is recorded as ``cuda_peak_memory_bytes``; each peak also
holds the other loop's resident weights and optimizer state. benchmarks/gpu_check.sh runs it this way.

Targets: trainer / naive float32 bare loop >= 1.5 where the trainer runs bf16 on a CPU with bf16 instructions
(``training.precision: auto`` there), >= 0.97 elsewhere; trainer / bare in the trainer's own precision (``--bare
trainer``) >= 0.95 (both ratios: median of epoch pairs and fastest steps); loader images/s >= 10 x trainer images/s.
Writes benchmarks/results/train_throughput.json (train_throughput_quick.json with --quick; --out to choose).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from benchmarks.common import (
    REPO,
    RunClock,
    add_out_arg,
    add_set_arg,
    child_job,
    machine_info,
    out_path,
    parse_sets,
    print_child_result,
    repo_relative,
    run_child,
    run_profiled,
    write_json,
)

BASE_CONFIG = REPO / "configs" / "exp_000_baseline.yaml"
RATIO_TARGET = 0.95  # trainer images/s over the bare loop's in the trainer's own precision (--bare trainer)
BF16_TARGET = 1.5  # trainer images/s over the naive float32 bare loop where the CPU has bf16 (training.precision auto)
FP32_TARGET = 0.97  # the same where it has not (auto is float32 there; channels_last is all the trainer adds)
LOADER_TARGET = 10.0  # loader images/s over trainer images/s
BUSY_CORES = 0.25  # other processes using more than this many cores (median over runs): the figures are marked busy
TASK_ARGS = {"cases": 12, "size": 128, "slices": (24, 32), "seed": 0}
PACKAGES = ("torch", "numpy", "segmentation-models-pytorch", "timm")


@dataclass
class Job:
    """One measurement in a child process, a fresh interpreter: no run inherits another's warm state."""

    kind: str  # prepare | run | loader
    task: str  # the synthetic task's folder (prepare generates it when missing)
    cache_dir: str
    config_file: str  # the base config's path, its source in errors
    config_raw: dict  # the base config as the parent read it, once
    epochs: int
    samples: int  # training.samples_per_epoch
    threads: int | None = None  # training.threads (None: the config's)
    overrides: dict = field(default_factory=dict)  # --set: dotted key -> value
    order: str = "TB"  # run: each trainer epoch before its bare twin (TB) or after it (BT)
    profile: bool = False  # run: fit alone (no bare loop) under cProfile, its top on stderr
    with_augment: bool = False  # loader: with the config's augmentation
    bare: str = "fp32"  # run: the bare loop in naive float32 (contiguous), or as the trainer ("trainer")


# ----------------------------------------------------------------------------------------- child process


def _config(job: Job):
    """The base config with this job's data, cache, output folder and epoch settings, and without augmentation
    unless ``with_augment`` (the loader measured as the config has it)."""
    from medseg.config import config_from_dict

    raw = dict(job.config_raw)
    if not job.with_augment:
        raw["augment"] = []
    task = Path(job.task)
    overrides = {"dataset.path": str(task.parent), "dataset.task": task.name, "dataset.cache_dir": job.cache_dir,
                 "output.run_dir": str(Path(job.cache_dir).parent / "runs"), "training.device": "cpu",
                 "training.epochs": job.epochs, "training.samples_per_epoch": job.samples}
    if job.threads:
        overrides["training.threads"] = job.threads
    overrides.update(job.overrides)
    cfg = config_from_dict(raw, source=job.config_file, overrides=overrides)
    if cfg.training.optimizer != "adamw" or cfg.training.grad_clip or cfg.training.patience:
        raise SystemExit("bench_train's bare loop is plain AdamW, no gradient clipping, every epoch: "
                         "the config must match")
    return cfg


class BareLoop:
    """The bare PyTorch loop over the trainer's slices, one epoch per ``run_epoch`` call."""

    def __init__(self, cfg, data, device=None, *, mode: str = "fp32"):
        import numpy as np
        import torch

        from medseg.data.dataset import EpochSampler, label_lut, stack_context
        from medseg.losses import build_loss
        from medseg.models import autocast, build_model, memory_format, n_classes, resolve_precision
        from medseg.training import seed_everything

        t = cfg.training
        # Every cached training slice in SliceDataset's order (case by case, slice by slice), float32 / int64.
        k, lut = cfg.dataset.context_slices, label_lut(data.labels)
        images, masks = [], []
        for cid in data.split.train:
            volume = data.cache.image(cid)
            images += [stack_context(volume, z, k) for z in range(volume.shape[0])]
            masks.append(lut[np.asarray(data.cache.label(cid))])
        mask_all = np.concatenate(masks)
        self.x_all = torch.from_numpy(np.stack(images))
        self.y_all = torch.from_numpy(mask_all.astype(np.int64))
        self.sampler = EpochSampler(mask_all.reshape(len(mask_all), -1).any(axis=1), n=t.samples_per_epoch,
                                    fg_fraction=t.fg_oversample, seed=t.seed)
        seed_everything(t.seed)  # as fit() does right before building its model: the same initial weights
        classes = n_classes(data.labels)
        self.device = torch.device(device or "cpu")
        # mode "fp32": the naive loop (float32, contiguous NCHW); "trainer": fit's precision and memory format
        self.precision = "fp32" if mode == "fp32" else resolve_precision(t.precision, self.device, amp=t.amp)
        self.format = memory_format(mode != "fp32" and t.channels_last)
        self.model = build_model(cfg.model, in_channels=(2 * k + 1) * data.in_channels, classes=classes).to(
            self.device, memory_format=self.format)
        self.loss_fn = build_loss(cfg.loss, classes)
        # mixed precision as fit() does it: autocast, and a GradScaler only for fp16 (disabled: a pass-through)
        self.autocast = lambda: autocast(self.device, self.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.batch = t.batch_size
        self.n_batches = len(self.sampler) // self.batch if len(self.sampler) > self.batch else 1  # fit's drop_last
        self.per_epoch, self.losses, self.step_s = [], [], []

    def run_epoch(self, epoch: int) -> None:
        import torch

        self.sampler.set_epoch(epoch)
        order = torch.as_tensor(list(self.sampler))
        model, optimizer, batch, scaler, device = self.model, self.optimizer, self.batch, self.scaler, self.device
        model.train()
        total, seen, marks = 0.0, 0, []
        started = time.perf_counter()
        for b in range(self.n_batches):
            marks.append(time.perf_counter())
            idx = order[b * batch:(b + 1) * batch]
            x, y = self.x_all[idx].to(device, memory_format=self.format), self.y_all[idx].to(device)
            with self.autocast():
                loss = self.loss_fn(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(idx)
            seen += len(idx)
        ended = time.perf_counter()
        self.per_epoch.append(seen / (ended - started))
        self.step_s.append([b - a for a, b in zip(marks, marks[1:] + [ended])])
        self.losses.append(total / seen)


def _timed_loader_class(log: list[dict]):
    """A DataLoader that logs, per pass (epoch), the seconds spent waiting in next() and each step's seconds
    (from one request for a batch to the next: loading + the training step). Installed in place of
    medseg.training.DataLoader in the run's process only, to see inside the real train loop; costs two
    perf_counter calls per batch."""
    from torch.utils.data import DataLoader

    class TimedDataLoader(DataLoader):
        def __iter__(self):
            inner, waited, marks = super().__iter__(), 0.0, []
            try:
                while True:
                    started = time.perf_counter()
                    marks.append(started)
                    try:
                        batch = next(inner)
                    except StopIteration:
                        return
                    waited += time.perf_counter() - started
                    yield batch
            finally:
                log.append({"wait_s": waited, "step_s": [b - a for a, b in zip(marks, marks[1:])]})

    return TimedDataLoader


class FitTimers:
    """Benchmark-side instrumentation of medseg.training's globals in this process (medseg itself is untouched):
    data wait and step times per epoch (``loader_log``), and the seconds spent writing checkpoints, in the final
    plots and in bare epochs (``spent``), to split the wall time of fit."""

    def __init__(self, training_module) -> None:
        T = training_module
        self.loader_log: list[dict] = []
        self.spent = {"checkpoints": 0.0, "finish_run": 0.0, "bare_epochs": 0.0}
        T.DataLoader = _timed_loader_class(self.loader_log)
        T.save_checkpoint = self.timed(T.save_checkpoint, "checkpoints")
        T._save_state = self.timed(T._save_state, "checkpoints")
        T.finish_run = self.timed(T.finish_run, "finish_run")

    def timed(self, fn, bucket: str):
        def wrapper(*a, **kw):
            started = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.spent[bucket] += time.perf_counter() - started
        return wrapper


class CudaPeaks:
    """Peak GPU memory per loop: the peak counter is read and reset around every bare epoch, so what lies between
    (a trainer epoch with its validation) counts for the trainer. Does nothing off CUDA."""

    def __init__(self, device) -> None:
        self.cuda = device.type == "cuda"
        self.peak = {"trainer": 0, "bare": 0}

    def close(self, owner: str) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak[owner] = max(self.peak[owner], torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()


def _interleaved_bare_epochs(bare: BareLoop, timers: FitTimers, peaks: CudaPeaks, *, bare_first: bool, epochs: int):
    """fit's on_epoch callback running the bare loop's epochs between the trainer's: T1 B1 T2 B2 ... (order TB), or
    B1 T1 B2 T2 ... (order BT: bare epoch 1 runs here, before fit starts; trainer epoch e's callback runs bare
    epoch e+1)."""

    def bare_epoch(epoch: int) -> None:
        peaks.close("trainer")
        bare.run_epoch(epoch)
        peaks.close("bare")

    timed_bare_epoch = timers.timed(bare_epoch, "bare_epochs")

    def on_epoch(report) -> None:
        following = report.epoch if bare_first else report.epoch - 1  # 0-based epoch of the bare loop to run now
        if following < epochs:
            timed_bare_epoch(following)

    if bare_first:
        bare_epoch(0)
    return on_epoch


def _timed_fit(T, cfg, data, *, on_epoch, work: Path, profile: bool) -> tuple:
    """fit() in a temporary run folder under ``work`` (under cProfile with ``profile``, without ``on_epoch``):
    its result, wall seconds and this process's CPU seconds."""
    run_dir = Path(tempfile.mkdtemp(prefix="fit-", dir=work))
    try:
        cpu0, started = time.process_time(), time.perf_counter()
        if profile:
            result = run_profiled(T.fit, cfg, run_dir=run_dir, data=data, progress=False)
        else:
            result = T.fit(cfg, on_epoch=on_epoch, run_dir=run_dir, data=data, progress=False)
        return result, time.perf_counter() - started, time.process_time() - cpu0
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _trainer_record(cfg, history: list[dict], timers: FitTimers, wall_s: float) -> dict:
    """The trainer's figures of one run: images/s, losses, step and data-wait times per epoch, and fit's wall time
    split into train loop, validation, checkpoints, final plots and the rest."""
    t, spent, loader_log = cfg.training, timers.spent, timers.loader_log
    per_epoch = [h["train/images_per_s"] for h in history]
    images = t.samples_per_epoch  # per epoch, as fit's drop_last leaves them
    if images > t.batch_size:
        images -= images % t.batch_size
    train_s = [images / v for v in per_epoch]
    val_s = [h["epoch_seconds"] - s for h, s in zip(history, train_s)]
    fit_s = wall_s - spent["bare_epochs"]  # the bare epochs ran inside fit, in its callback
    other_s = fit_s - sum(train_s) - sum(val_s) - spent["checkpoints"] - spent["finish_run"]
    wait_s = [e["wait_s"] for e in loader_log]
    return {"per_epoch_images_per_s": per_epoch, "train_loss": [h["train/loss"] for h in history],
            "step_s": [e["step_s"] for e in loader_log], "data_wait_s": wait_s, "train_s": train_s,
            "data_wait_fraction": sum(wait_s[1:] or wait_s) / sum(train_s[1:] or train_s),
            "fit_wall_s": fit_s,
            "fit_breakdown_s": {"train_loop": sum(train_s), "validation": sum(val_s),
                                "checkpoints": spent["checkpoints"], "finish_run": spent["finish_run"],
                                "other": other_s}}


def _precisions(cfg, device, bare: BareLoop | None) -> dict:
    """What each loop ran in: the trainer's resolved ``training.precision`` and memory format, the bare loop's."""
    import torch

    from medseg.models import cpu_native_bf16, resolve_precision

    t = cfg.training
    out = {"cpu_native_bf16": cpu_native_bf16(), "config_precision": t.precision,
           "trainer": resolve_precision(t.precision, device, amp=t.amp), "trainer_channels_last": t.channels_last}
    if bare is not None:
        out |= {"bare": bare.precision, "bare_channels_last": bare.format == torch.channels_last}
    return out


def _child_run(job: Job) -> dict:
    """fit() with the bare loop's epochs interleaved through on_epoch (fit alone under cProfile with ``profile``)."""
    import torch

    import medseg.training as T

    cfg = _config(job)
    device = T.configure_torch(cfg)  # threads and determinism already for a bare epoch run before fit (fit repeats it)
    data = T.prepare_data(cfg, progress=False)  # the cache exists: this opens it and loads the saved split
    bare = None if job.profile else BareLoop(cfg, data, device, mode=job.bare)
    timers, peaks = FitTimers(T), CudaPeaks(device)
    on_epoch = None if bare is None else _interleaved_bare_epochs(bare, timers, peaks, bare_first=job.order == "BT",
                                                                   epochs=cfg.training.epochs)
    result, wall_s, cpu_s = _timed_fit(T, cfg, data, on_epoch=on_epoch, work=Path(job.cache_dir).parent,
                                       profile=job.profile)
    peaks.close("trainer")
    if len(timers.loader_log) != cfg.training.epochs:
        raise SystemExit("fit() no longer builds its loader as medseg.training.DataLoader: update bench_train's "
                         "instrumentation (FitTimers)")
    out = {"kind": "run", "order": job.order, "torch_threads": torch.get_num_threads(),
           "interop_threads": torch.get_num_interop_threads(), "cpu_utilisation": cpu_s / wall_s,
           "trainer": _trainer_record(cfg, result.history, timers, wall_s), "config": cfg.to_dict(),
           "device": str(device), "precision": _precisions(cfg, device, bare)}
    if peaks.cuda:
        out["cuda_peak_memory_bytes"] = peaks.peak if bare else {"trainer": peaks.peak["trainer"]}
    if bare:
        out["bare"] = {"per_epoch_images_per_s": bare.per_epoch, "train_loss": bare.losses, "step_s": bare.step_s}
    return out


def _child_loader(job: Job) -> dict:
    """The trainer's DataLoader, built exactly as fit() builds it (keep in step with medseg/training.py)."""
    import torch
    from torch.utils.data import DataLoader

    from medseg.data.dataset import EpochSampler, SliceDataset, build_augmentation, seed_worker
    from medseg.training import configure_torch, epoch_seed, prepare_data

    cfg = _config(job)
    device = configure_torch(cfg)
    t = cfg.training
    data = prepare_data(cfg, progress=False)
    transform = build_augmentation(cfg.augment, seed=t.seed)
    train_set = SliceDataset(data.cache, data.split.train, labels=data.labels,
                             context_slices=cfg.dataset.context_slices, transform=transform)
    sampler = EpochSampler(train_set.has_foreground(), n=t.samples_per_epoch, fg_fraction=t.fg_oversample,
                           seed=t.seed)
    loader_gen = torch.Generator()
    loader = DataLoader(train_set, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers,
                        drop_last=len(sampler) > t.batch_size, worker_init_fn=seed_worker, generator=loader_gen,
                        persistent_workers=False, pin_memory=device.type == "cuda")
    per_epoch = []
    for epoch in range(t.epochs):
        loader_gen.manual_seed(epoch_seed(t.seed, epoch))
        sampler.set_epoch(epoch)
        if transform is not None:
            transform.set_random_seed(epoch_seed(t.seed, epoch))
        seen, started = 0, time.perf_counter()
        for x, _y in loader:
            seen += len(x)
        per_epoch.append(seen / (time.perf_counter() - started))
    return {"kind": "loader", "per_epoch_images_per_s": per_epoch, "num_workers": t.num_workers,
            "batches_per_epoch": len(loader)}


def _child_prepare(job: Job) -> dict:
    """Generate the task if needed, build the cache and the split; report the data."""
    from medseg.data.synthetic import generate_task
    from medseg.training import prepare_data

    task = Path(job.task)
    generated_s = None
    if not (task / "metadata.json").exists():
        started = time.perf_counter()
        task = generate_task(task.parent, **TASK_ARGS)
        generated_s = time.perf_counter() - started
    cfg = _config(replace(job, task=str(task)))
    started = time.perf_counter()
    data = prepare_data(cfg, progress=False)
    return {"kind": "prepare", "task": str(task), "generate_s": generated_s,
            "cache_build_s": time.perf_counter() - started,
            "train_cases": len(data.split.train), "val_cases": len(data.split.val),
            "train_slices": sum(data.cache.n_slices(c) for c in data.split.train),
            "val_slices": sum(data.cache.n_slices(c) for c in data.split.val)}


CHILDREN = {"prepare": _child_prepare, "run": _child_run, "loader": _child_loader}


# ----------------------------------------------------------------------------------------- parent


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes of the machine have spent (non-idle) since boot, from /proc/stat; None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _measure(job: Job) -> dict:
    """One job in a fresh interpreter, with its wall time, the 1-minute load average before and after, and the cores
    other processes kept busy meanwhile."""
    import resource

    busy_before, ours_before = _busy_cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
    child = run_child(__file__, asdict(job), what=f"{job.kind} measurement", cwd=REPO)
    busy_after, ours_after = _busy_cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = child.result
    result["process_wall_s"] = round(child.wall_s, 2)  # with interpreter start and imports
    result["loadavg_1min"] = child.loadavg_1min
    if busy_before is not None:
        # Cores kept busy by everything but this measurement while it ran: 0 on an idle machine.
        ours = sum(getattr(ours_after, f) - getattr(ours_before, f) for f in ("ru_utime", "ru_stime"))
        result["other_processes_cores"] = round(max(0.0, (busy_after - busy_before - ours) / child.wall_s), 2)
    if job.profile:
        result["profile"] = child.stderr
    return result


def _task_folder(data: Path | None, workdir: Path) -> Path:
    """The synthetic task in --data (the folder itself or its Task*/ folder), else where to generate it."""
    data_dir = (data or workdir / "data").resolve()
    if (data_dir / "metadata.json").exists():
        return data_dir
    return next((p.parent for p in sorted(data_dir.glob("Task*/metadata.json"))), data_dir / "Task900_SynthLiverTumor")


def _measure_repeat(base: Job, i: int, measured: dict) -> None:
    """Run i (orders alternating TB, BT, ...), then the loader alone, and with the config's augmentation if any."""
    runs, loader = measured["runs"], measured["loader"]
    runs.append(_measure(replace(base, kind="run", order="TB" if i % 2 == 0 else "BT")))
    loader.append(_measure(replace(base, kind="loader")))
    if base.config_raw.get("augment"):
        measured["loader_augment"].append(_measure(replace(base, kind="loader", with_augment=True)))
    r = runs[-1]
    epochs = {k: " ".join(f"{v:5.2f}" for v in r[k]["per_epoch_images_per_s"]) for k in ("trainer", "bare")}
    print(f"  run {i + 1} ({r['order']}): trainer {epochs['trainer']} | bare {epochs['bare']} img/s per epoch; "
          f"loader {statistics.median(_warm(loader[-1]['per_epoch_images_per_s'])):5.0f} img/s (load "
          f"{r['loadavg_1min'][1]:.2f}, other processes {r.get('other_processes_cores', float('nan')):.2f} "
          "cores)", flush=True)


def measure_all(base: Job, *, data: Path | None, repeats: int, profile: bool) -> dict:
    """The data prepared once, then ``repeats`` runs each followed by the loader alone, in a temporary work folder:
    every measurement as it came back (``prepared``, ``runs``, ``loader``, ``loader_augment``, ``profile``)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench_train-"))
    try:
        task = _task_folder(data, workdir)
        print(f"data in {task.parent}, work in {workdir}", flush=True)
        prepared = _measure(replace(base, kind="prepare", task=str(task), cache_dir=str(workdir / "cache")))
        base = replace(base, task=prepared["task"], cache_dir=str(workdir / "cache"))
        print(f"  cache: {prepared['train_cases']} train cases ({prepared['train_slices']} slices), "
              f"{prepared['val_cases']} val ({prepared['val_slices']} slices); "
              f"built in {prepared['cache_build_s']:.1f} s", flush=True)
        measured = {"prepared": prepared, "runs": [], "loader": [], "loader_augment": [], "profile": None}
        for i in range(repeats):
            _measure_repeat(base, i, measured)
        if profile:
            measured["profile"] = _measure(replace(base, kind="run", profile=True))["profile"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return measured


def _warm(per_epoch: list) -> list:
    """The epochs after the first (all of them when there is one): the first holds one-time warm-up."""
    return per_epoch[1:] or per_epoch


def _step_rates(step_s: list[float], batch: int) -> dict:
    """Images/s from pooled step times: fastest step, 10th and 25th percentile, median.

    The fastest step is the load-robust figure: on a 2-core machine another busy process makes a 2-thread step
    2-5x slower for as long as it runs, so epoch figures swing with it, while no step can run faster than its
    work allows: the fastest is what a step costs when it has the cores (timeit's reason for the minimum), and
    interleaved trainer and bare steps get the same chances at such moments. Quantiles show how often they came.
    """
    steps = sorted(step_s)
    p10, p25 = (statistics.quantiles(steps, n=20, method="inclusive")[1],
                statistics.quantiles(steps, n=4, method="inclusive")[0]) if len(steps) > 1 else (steps[0], steps[0])
    return {"fastest": round(batch / steps[0], 3), "p10": round(batch / p10, 3), "p25": round(batch / p25, 3),
            "median": round(batch / statistics.median(steps), 3), "steps": len(steps)}


def figures(measured: dict) -> dict:
    """The benchmark's figures from its runs: medians over warm epochs, epoch-pair and fastest-step ratios, the
    fit breakdown, the loss gap between the two loops and how busy the machine was."""
    runs, loader, loader_augment = measured["runs"], measured["loader"], measured["loader_augment"]
    f: dict = {"trainer_epochs": [v for r in runs for v in _warm(r["trainer"]["per_epoch_images_per_s"])],
               "bare_epochs": [v for r in runs for v in _warm(r["bare"]["per_epoch_images_per_s"])]}
    # the same epoch of the same run
    f["pair_ratios"] = [tr / ba for tr, ba in zip(f["trainer_epochs"], f["bare_epochs"])]
    f["trainer_ips"], f["bare_ips"] = statistics.median(f["trainer_epochs"]), statistics.median(f["bare_epochs"])
    f["loader_ips"] = statistics.median(v for r in loader for v in _warm(r["per_epoch_images_per_s"]))
    f["loader_augment_ips"] = statistics.median(
        v for r in loader_augment for v in _warm(r["per_epoch_images_per_s"])) if loader_augment else None
    f["ratio"] = statistics.median(f["pair_ratios"])
    f["ratio_of_medians"] = f["trainer_ips"] / f["bare_ips"]
    batch = runs[0]["config"]["training"]["batch_size"]
    f["trainer_steps"] = _step_rates([s for r in runs for e in _warm(r["trainer"]["step_s"]) for s in e], batch)
    f["bare_steps"] = _step_rates([s for r in runs for e in _warm(r["bare"]["step_s"]) for s in e], batch)
    f["robust_ratio"] = f["trainer_steps"]["fastest"] / f["bare_steps"]["fastest"]
    f["loader_over_trainer"] = f["loader_ips"] / f["trainer_ips"]
    # Share of an epoch spent loading when loading and compute run one after the other (num_workers 0):
    # seconds per image loading / (loading + bare compute).
    f["load_fraction"] = (1 / f["loader_ips"]) / (1 / f["loader_ips"] + 1 / f["bare_ips"])
    f["breakdown"] = {k: round(statistics.median(r["trainer"]["fit_breakdown_s"][k] for r in runs), 2)
                      for k in runs[0]["trainer"]["fit_breakdown_s"]}
    f["wait_fraction"] = statistics.median(r["trainer"]["data_wait_fraction"] for r in runs)
    # Same init, batches and arithmetic: equal epoch losses show the bare loop does the trainer's work, no less.
    f["loss_gap"] = max(abs(a - b) for r in runs for a, b in zip(r["trainer"]["train_loss"], r["bare"]["train_loss"]))
    f["precision"] = runs[0]["precision"]
    f["same_precision"] = (f["precision"]["trainer"] == f["precision"]["bare"]
                           and f["precision"]["trainer_channels_last"] == f["precision"]["bare_channels_last"])
    f["threads"] = sorted({r["torch_threads"] for r in runs})
    f["others"] = [r["other_processes_cores"] for r in runs if "other_processes_cores" in r]
    f["busy"] = bool(f["others"]) and statistics.median(f["others"]) > BUSY_CORES
    return f


def _machine(runs: list[dict], f: dict, clock: RunClock) -> dict:
    others, threads = f["others"], f["threads"]
    return {**machine_info(PACKAGES, torch_threads=threads[0] if len(threads) == 1 else threads,
                           interop_threads=runs[0]["interop_threads"]),
            "loadavg_start": [round(v, 2) for v in clock.load_before],
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "other_processes_cores": {"median": statistics.median(others), "max": max(others)} if others else None,
            "busy": f["busy"]}


def _params(args: argparse.Namespace, base: Job, config: dict, prepared: dict, f: dict) -> dict:
    return {"config_file": repo_relative(args.config), "overrides": base.overrides, "threads": args.threads,
            # trainer, bare and loader run without the config's augmentation
            "augment_removed": base.config_raw.get("augment") or [],
            "epochs": base.epochs, "samples_per_epoch": base.samples, "batch_size": config["training"]["batch_size"],
            "repeats": args.repeats, "quick": args.quick, "task": TASK_ARGS,
            "data": {k: prepared[k] for k in ("train_cases", "train_slices", "val_cases", "val_slices")},
            "warm_epochs": "2.." if base.epochs > 1 else "all", "epoch_pairs": len(f["pair_ratios"])}


def ratio_target(precision: dict) -> tuple[str, float]:
    """The name and target of the trainer/bare ratio for what the loops ran in (``_precisions``)."""
    if precision.get("bare") != "fp32" or precision.get("bare_channels_last"):
        return "trainer_over_bare", RATIO_TARGET  # same precision in both: the trainer's overhead
    if precision["trainer"] == "bf16" and precision["cpu_native_bf16"]:
        return "trainer_over_fp32_bare", BF16_TARGET
    return "trainer_over_fp32_bare", FP32_TARGET


def _ratios_and_targets(f: dict) -> dict:
    ratio, robust, loader = f["ratio"], f["robust_ratio"], f["loader_over_trainer"]
    name, target = ratio_target(f["precision"])
    return {
        "ratios": {"trainer_over_bare": round(ratio, 3),
                   "trainer_over_bare_per_pair": [round(p, 3) for p in f["pair_ratios"]],
                   "trainer_over_bare_of_medians": round(f["ratio_of_medians"], 3),
                   "trainer_over_bare_fastest_step": round(robust, 3),
                   "loader_over_trainer": round(loader, 1),
                   "loading_fraction_of_epoch": round(f["load_fraction"], 4)},
        "targets": {name: {"target": f">= {target}", "value": round(ratio, 3), "met": ratio >= target},
                    f"{name}_load_robust": {"target": f">= {target}", "value": round(robust, 3),
                                            "met": robust >= target,
                                            "basis": "fastest step, warm epochs of all runs pooled"},
                    "loader_over_trainer": {"target": f">= {LOADER_TARGET}", "value": round(loader, 1),
                                            "met": loader >= LOADER_TARGET}},
    }


def _note(f: dict) -> str:
    busy = ("MEASURED ON A BUSY MACHINE (other processes kept a median of "
            f"{statistics.median(f['others']):.1f} cores busy): indicative only, re-run on an idle one. "
            if f["busy"] else "")
    return busy + ("Images/s are medians over warm epochs (2..) of all runs; trainer_over_bare is the median over "
                   "epoch pairs (a trainer epoch and its interleaved bare twin); the load-robust target compares the "
                   "fastest steps (from_step_times: warm epochs of all runs pooled). Per run: loadavg_1min (before, "
                   "after), other_processes_cores (cores used by everything else while it ran), cpu_utilisation.")


def results_json(args: argparse.Namespace, base: Job, measured: dict, f: dict, clock: RunClock) -> dict:
    """The results file: machine, parameters, config, each loop's figures, ratios and targets, every run."""
    runs, loader, loader_augment = measured["runs"], measured["loader"], measured["loader_augment"]
    config = runs[0]["config"]
    for r in runs:
        r.pop("config")
    results = {
        "benchmark": "train_throughput",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": _machine(runs, f, clock),
        "params": _params(args, base, config, measured["prepared"], f),
        "config": config,
        "trainer": {"images_per_s": round(f["trainer_ips"], 3),
                    "fit_wall_s": round(statistics.median(r["trainer"]["fit_wall_s"] for r in runs), 2),
                    "fit_breakdown_s": f["breakdown"], "data_wait_fraction": round(f["wait_fraction"], 4),
                    "from_step_times": f["trainer_steps"]},
        "bare": {"images_per_s": round(f["bare_ips"], 3), "from_step_times": f["bare_steps"]},
        "loader": {"images_per_s": round(f["loader_ips"], 1), "runs": loader},
        "loader_with_config_augment": {"images_per_s": round(f["loader_augment_ips"], 1),
                                       "augment": base.config_raw.get("augment") or [],
                                       "runs": loader_augment} if loader_augment else None,
        "precision": f["precision"],
        # equal losses show the bare loop does the trainer's work; in another precision they differ by rounding
        "same_work": {"max_abs_epoch_loss_difference": f["loss_gap"], "losses_match": f["loss_gap"] <= 1e-4,
                      "same_precision": f["same_precision"]},
        "device": runs[0].get("device", "cpu"),
        "cuda_peak_memory_bytes": {k: max(r["cuda_peak_memory_bytes"][k] for r in runs) for k in ("trainer", "bare")}
        if "cuda_peak_memory_bytes" in runs[0] else None,
        **_ratios_and_targets(f),
        "runs": runs,
        "seconds_total": clock.seconds(),
        "note": _note(f),
    }
    if measured["profile"]:
        results["profile_top"] = measured["profile"]
    return results


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_summary(results: dict, f: dict, base: Job, repeats: int, out: Path) -> None:
    config = results["config"]
    loads = [v for r in results["runs"] + results["loader"]["runs"] for v in r["loadavg_1min"]]
    ratio, robust, loader = f["ratio"], f["robust_ratio"], f["loader_over_trainer"]
    print(f"training throughput, {config['name']} (batch {config['training']['batch_size']}, {repeats} runs x "
          f"{base.epochs} epochs x {base.samples} slices, trainer and bare epochs interleaved), {os.cpu_count()} "
          f"CPUs, {results['machine']['torch_threads']} torch threads, load avg {min(loads):.1f}-{max(loads):.1f}")
    print(f"  {'':28s}{'images/s':>10s}{'fastest':>10s}   (median of {len(f['trainer_epochs'])} warm epochs; "
          f"fastest of {f['trainer_steps']['steps']} steps)")
    print(f"  {'trainer (fit, train loop)':28s}{f['trainer_ips']:10.2f}{f['trainer_steps']['fastest']:10.2f}   "
          f"fit wall {results['trainer']['fit_wall_s']:.1f} s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in f["breakdown"].items()))
    print(f"  {'bare PyTorch loop':28s}{f['bare_ips']:10.2f}{f['bare_steps']['fastest']:10.2f}")
    print(f"  {'DataLoader alone':28s}{f['loader_ips']:10.1f}")
    if f["loader_augment_ips"] is not None:
        augment = ", ".join(a["name"] for a in results["loader_with_config_augment"]["augment"])
        print(f"  {'DataLoader, config augment':28s}{f['loader_augment_ips']:10.1f}   "
              f"({augment}: not in the trainer/bare comparison)")
    pairs, (name, target), p = f["pair_ratios"], ratio_target(f["precision"]), f["precision"]
    print(f"  trainer: {p['trainer']}{', channels_last' * p['trainer_channels_last']} (training.precision "
          f"{p['config_precision']}; CPU bf16 instructions: {p['cpu_native_bf16']}); bare loop: {p['bare']}"
          f"{', channels_last' * p['bare_channels_last']}")
    print(f"  {name} {ratio:.3f}, median of {len(pairs)} epoch pairs ({min(pairs):.2f}-{max(pairs):.2f}); "
          f"ratio of medians {f['ratio_of_medians']:.3f} (target >= {target}: {_met(ratio >= target)})")
    print(f"  {name} load-robust (fastest steps) {robust:.3f} ({_met(robust >= target)})")
    print(f"  loader/trainer {loader:.0f}x (target >= {LOADER_TARGET:.0f}x: {_met(loader >= LOADER_TARGET)}); "
          f"loading {100 * f['load_fraction']:.2f}% of an epoch; measured wait for data inside fit "
          f"{100 * f['wait_fraction']:.2f}%")
    print(f"  epoch losses trainer vs bare: max difference {f['loss_gap']:.2g} "
          f"({'same work' if f['loss_gap'] <= 1e-4 else 'DIFFER' if f['same_precision'] else 'other precision'})")
    if f["busy"]:
        print(f"  WARNING: other processes kept {statistics.median(f['others']):.1f} of {os.cpu_count()} cores busy "
              "(median over runs): epoch figures swing with it, read the load-robust ratio; re-run on an idle machine")
    print(f"  -> {out}  ({results['seconds_total']:.0f} s)")
    if results.get("profile_top"):
        print(results["profile_top"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 runs of 3 epochs x 48 slices (default 3 runs of 4 x 64)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default 4; quick 3); the first is warm-up")
    parser.add_argument("--samples", type=int, help="training.samples_per_epoch (default 64; quick 48)")
    parser.add_argument("--repeats", type=int,
                        help="runs, each a fresh process, orders TB/BT alternating (default 3; quick 2)")
    parser.add_argument("--threads", type=int, help="training.threads for both loops (default: the config's, "
                                                    "null = torch's default, the number of cores)")
    add_set_arg(parser, "config override, e.g. training.batch_size=8 (repeatable)")
    parser.add_argument("--config", type=Path, default=BASE_CONFIG, help="base config (default %(default)s)")
    parser.add_argument("--bare", choices=("fp32", "trainer"), default="fp32",
                        help="the bare loop in naive float32, contiguous (default: what the CPU does without "
                             "medseg's precision settings), or in the trainer's precision and memory format (its "
                             "overhead alone, losses equal)")
    parser.add_argument("--data", type=Path,
                        help="folder holding (or to receive) the synthetic task; reused when present")
    parser.add_argument("--profile", action="store_true",
                        help="also run one fit (no bare loop) under cProfile and print the top")
    add_out_arg(parser, "train_throughput[_quick].json")
    return parser


def base_job(args: argparse.Namespace, overrides: dict) -> Job:
    """What every child gets: the config as read now (even if the file is edited while the benchmark runs), the
    epochs, samples, threads and overrides; the task and cache folder come once the work folder exists."""
    import yaml

    config = args.config.resolve()
    return Job(kind="run", task="", cache_dir="", config_file=str(config),
               config_raw=yaml.safe_load(config.read_text()) or {}, epochs=args.epochs or (3 if args.quick else 4),
               samples=args.samples or (48 if args.quick else 64), threads=args.threads, overrides=overrides,
               bare=args.bare)


def main(argv: list[str] | None = None) -> int:
    job = child_job(argv)
    if job is not None:
        return print_child_result(CHILDREN[job["kind"]](Job(**job)))
    parser = _parser()
    args = parser.parse_args(argv)
    from medseg.errors import ConfigError

    try:
        overrides = parse_sets(args.sets)
    except ConfigError as err:
        parser.error(str(err))
    args.config = args.config.resolve()
    args.repeats = args.repeats or (2 if args.quick else 3)
    base = base_job(args, overrides)
    clock = RunClock()
    measured = measure_all(base, data=args.data, repeats=args.repeats, profile=args.profile)
    f = figures(measured)
    results = results_json(args, base, measured, f, clock)
    out = out_path(args, f"train_throughput{'_quick' if args.quick else ''}")
    write_json(out, results)
    print_summary(results, f, base, args.repeats, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
