"""fit(config, on_epoch=callback): the single-run trainer and the body of every tuning trial.

It knows nothing of Ray or MLflow: after each epoch it hands an ``EpochReport`` to ``on_epoch``, which
``tracking.py`` turns into MLflow calls and ``tuning.py`` into ``ray.tune.report``. Validation Dice is
computed per case on whole volumes (slices stacked back by ``inference.predict_volume``), never averaged over
batches. The epoch loop is linear: ``begin_epoch`` (seeds, LR), ``run_epoch`` (train, validate), ``record_epoch``
(best.pt, last.pt, history), then the callback.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from medseg import metrics as M
from medseg.checkpoint import library_versions, save_checkpoint, save_torch_atomic
from medseg.config import Config
from medseg.data.dataset import EpochSampler, SliceDataset, build_augmentation, label_lut, seed_worker
from medseg.errors import ConfigError, MedsegError, NonFiniteLossError
from medseg.inference import predict_volume
from medseg.io_utils import atomic_path, atomic_write_json
from medseg.losses import build_loss
from medseg.models import (
    autocast,
    build_model,
    cpu_native_bf16,
    memory_format,
    n_classes,
    predict_classes,
    prediction_precision,
    requested_device,
    resolve_precision,
    training_precision,
)
from medseg.tta import mirrors_from_augment

# ------------------------------------------------------------------------------------------------ data


@dataclass
class PreparedData:
    """Everything fit() and evaluation need from the data layer."""

    source: Any
    cache: Any
    split: Any
    labels: list[int]  # foreground label values learned, in class order (class i+1 = labels[i])

    @property
    def in_channels(self) -> int:
        """Channels of one slice: 1, or 3 for colour; 2.5D context is added by the caller as 2k+1 times these."""
        return self.cache.channels

    @property
    def channel_stats(self) -> dict[str, list[float]] | None:
        """Mean and std per channel of the training cases' cached pixels (colour only, else None): the model's input
        standardisation (``models.Standardised``), stored in the checkpoint."""
        return self.cache.channel_stats(self.split.train)

    def preprocessing(self, cfg: Config) -> dict[str, Any]:
        stats = self.channel_stats
        return {**self.cache.settings, "context_slices": cfg.dataset.context_slices, "labels": self.labels,
                "label_names": {str(v): self.source.labels.get(v, str(v)) for v in self.labels},
                **({"channel_mean": stats["mean"], "channel_std": stats["std"]} if stats else {})}


def prepare_data(cfg: Config, *, progress: bool = True) -> PreparedData:
    """Open the source, build or reuse the slice cache, and load or create the saved split."""
    from medseg.data.cache import build_cache
    from medseg.data.sources import open_source_from_config
    from medseg.data.split import load_or_create_split

    source = open_source_from_config(cfg.dataset)
    labels = resolve_labels(cfg.dataset.labels, source)
    cache = build_cache(cfg.dataset, source, progress=progress)
    split = load_or_create_split(cache, source, cfg.dataset.split)
    return PreparedData(source=source, cache=cache, split=split, labels=labels)


def resolve_labels(wanted: list[int] | None, source) -> list[int]:
    known = sorted(int(k) for k in source.labels if int(k) != 0)
    if wanted is None:
        return known
    unknown = [v for v in wanted if v not in known]
    if unknown or not wanted:
        raise ConfigError(f"dataset.labels: {unknown or wanted} not among the task's labels {known} ({source.root})")
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"dataset.labels: {wanted} repeats a label; list each label value once")
    return list(wanted)


# ------------------------------------------------------------------------------------------ reproducibility


def epoch_seed(seed: int, epoch: int) -> int:
    """The one seed of (run seed, epoch), for every random stream of an epoch (python, numpy, torch, the loader's
    sampler, the augmentations): each epoch is reproducible on its own."""
    return (seed * 1_000_003 + epoch) % 2**32


def seed_everything(seed: int, epoch: int = 0) -> None:
    """Seed python, numpy and torch from (seed, epoch): each epoch is reproducible on its own, so a run
    resumed from a checkpoint continues exactly as the uninterrupted run would have."""
    mixed = epoch_seed(seed, epoch)
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def configure_torch(cfg: Config) -> torch.device:
    """Threads, determinism and device from the config."""
    t = cfg.training
    if t.threads:
        torch.set_num_threads(t.threads)
    device = requested_device(t)
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device: 'cuda' requested but no CUDA device is available")
    if t.deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = device.type == "cuda"
    return device


# ------------------------------------------------------------------------------------------- schedule


def lr_factor(epoch: int, cfg: Config) -> float:
    """LR multiplier for a 0-based epoch: linear warmup, then cosine or poly decay to min_lr_ratio."""
    t = cfg.training
    if epoch < t.warmup_epochs:
        return (epoch + 1) / (t.warmup_epochs + 1)
    if t.scheduler == "none":
        return 1.0
    progress = (epoch - t.warmup_epochs) / max(1, t.epochs - t.warmup_epochs)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.scheduler == "cosine" else (1 - progress) ** t.poly_power
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay


def build_ema(model: torch.nn.Module, cfg: Config) -> AveragedModel | None:
    """Exponential moving average of the weights and BatchNorm statistics, or None without training.ema_decay.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the average follows the weights
    closely in the first steps instead of holding on to the random initialisation.
    """
    decay = cfg.training.ema_decay
    if not decay:
        return None

    @torch.no_grad()
    def update(ema_params, params, n_averaged):
        d = min(decay, (1.0 + float(n_averaged)) / (10.0 + float(n_averaged)))
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        else:  # BatchNorm's num_batches_tracked: follow the model
            for e, p in zip(ema_params, params):
                e.copy_(p)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.training
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=0.9, nesterov=True, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


# ----------------------------------------------------------------------------------------- validation


def validate(model, data: PreparedData, case_ids: list[str], cfg: Config, device: torch.device, *, loss_fn=None,
             tta_axes: list[list[int]] | None = None,
             keep_predictions: bool = False) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, np.ndarray]]:
    """Whole-volume, per-case metrics on the cached resolution. Returns (summary, per-case rows, predictions)."""
    t = cfg.training
    lut = label_lut(data.labels)
    classes = list(range(1, len(data.labels) + 1))
    rows, losses, predictions = [], [], {}
    model = model.to(memory_format=memory_format(t.channels_last))  # in place; a no-op for the trained model
    precision = prediction_precision(t, device)
    for cid in case_ids:
        target = lut[np.asarray(data.cache.label(cid))]
        pred, loss = predict_volume(model, data.cache.image(cid), context=cfg.dataset.context_slices, device=device,
                                    batch_size=t.batch_size, threshold=t.threshold, precision=precision,
                                    channels_last=t.channels_last, tta_axes=tta_axes,
                                    target=target, loss_fn=loss_fn)
        if loss is not None:
            losses.append(loss)
        rows.append({"case_id": cid, **M.case_metrics(pred, target, classes, lesion_labels=classes)})
        if keep_predictions:
            predictions[cid] = pred
    summary = M.summarize(rows)
    if losses:
        summary["loss"] = float(np.mean(losses))
    return summary, rows, predictions


# ------------------------------------------------------------------------------------------------ fit


@dataclass
class EpochReport:
    """What each epoch hands to the callback. ``metrics`` keys: train/loss, train/dice, train/iou, val/loss, val/dice,
    val/iou, ... lr."""

    epoch: int  # 1-based
    metrics: dict[str, float]
    is_best: bool
    best_value: float  # best value of training.monitor so far
    best_epoch: int
    checkpoint_dir: Path  # holds best.pt (best so far) and last.pt (resumable state)
    final: bool = False  # True on the last epoch the trainer itself runs (max epochs or patience)


@dataclass
class FitResult:
    run_dir: Path
    best_checkpoint: Path
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    stop_reason: str  # "max_epochs" | "patience" | "callback"
    per_case_csv: Path
    artifacts: list[Path] = field(default_factory=list)
    # chosen on validation after training (medseg.postprocess), also in best.pt
    postprocessing: dict[str, Any] | None = None


OnEpoch = Callable[[EpochReport], "bool | None"]


@dataclass
class TrainingParts:
    """What a run trains with, built once by ``build_training``."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: AveragedModel | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scaler: torch.amp.GradScaler
    transform: Any  # the augmentation pipeline, None without augmentation
    sampler: EpochSampler
    loader_gen: torch.Generator  # the loader's shuffling and worker seeds, reseeded per epoch
    loader: DataLoader
    classes: int  # output channels
    precision: str = "fp32"  # training precision on this device (models.resolve_precision)

    @property
    def eval_model(self) -> torch.nn.Module:
        """What is validated and checkpointed: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class RunState:
    """The loop's record: per-epoch metrics, the best epoch so far (resumable from last.pt) and its predictions."""

    sign: float  # compare sign * value of training.monitor: larger is better
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"value": -math.inf, "epoch": 0, "metrics": {}})
    best_predictions: dict[str, np.ndarray] | None = None  # the best epoch's validation class maps


def fit(cfg: Config, *, on_epoch: OnEpoch | None = None, run_dir: str | Path | None = None,
        resume_state: str | Path | None = None, data: PreparedData | None = None, progress: bool = True,
        checkpoint_meta: dict[str, Any] | None = None) -> FitResult:
    """Train per the config; after each epoch call ``on_epoch(report)`` (returning True stops the run).

    The best checkpoint is the epoch with the best ``training.monitor`` (validation Dice by default).

    run_dir receives best.pt (the best checkpoint by validation Dice, self-describing), last.pt (state to
    resume from), history.json, val_per_case.csv, learning_curve.png, overlays/, config.yaml, splits.json, and
    postprocessing.json (the post-processing chosen on the best checkpoint's validation predictions, also in best.pt).
    ``checkpoint_meta`` is stored in every checkpoint's metadata (train.py puts the MLflow run id there).
    """
    device = configure_torch(cfg)
    t = cfg.training
    run_dir = Path(run_dir or Path(cfg.output.run_dir) / (cfg.output.run_name or cfg.name)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    data = data or prepare_data(cfg, progress=progress)
    parts = build_training(cfg, data, device)
    meta_base = checkpoint_meta_base(cfg, data, parts.classes, checkpoint_meta)
    _write_run_files(run_dir, cfg, data)
    state, start_epoch = RunState(sign=1.0 if t.monitor_mode == "max" else -1.0), 0
    if resume_state is not None:
        start_epoch, state.history, state.best = _load_state(resume_state, parts.model, parts.optimizer, parts.scaler,
                                                             parts.ema)
    stop_reason, artifacts = "max_epochs", None
    for epoch in range(start_epoch + 1, t.epochs + 1):  # 1-based
        begin_epoch(parts, cfg, epoch)
        metrics, rows, predictions = run_epoch(parts, data, cfg, device, epoch=epoch, progress=progress)
        is_best = record_epoch(run_dir, parts, state, metrics, rows, predictions, epoch=epoch, cfg=cfg,
                               meta_base=meta_base)
        patience_hit = t.patience is not None and epoch - state.best["epoch"] >= t.patience
        final = epoch == t.epochs or patience_hit
        if final:  # artifacts before the last callback: a scheduler may end the process at that report
            artifacts = finish_run(run_dir, cfg, data, state.history, device, best_predictions=state.best_predictions)
        report = EpochReport(epoch=epoch, metrics=metrics, is_best=is_best, best_value=state.sign * state.best["value"],
                             best_epoch=state.best["epoch"], checkpoint_dir=run_dir, final=final)
        if on_epoch is not None and on_epoch(report):
            stop_reason = "callback"
            break
        if patience_hit:
            stop_reason = "patience"
            break
    if state.best["epoch"] == 0:
        raise MedsegError(f"{run_dir}: no epoch produced a finite {t.monitor} (are all validation cases empty?)")
    if artifacts is None:  # stopped by the callback, or resumed after the last epoch
        artifacts = finish_run(run_dir, cfg, data, state.history, device, best_predictions=state.best_predictions)
    return fit_result(run_dir, state, stop_reason, artifacts)


def build_training(cfg: Config, data: PreparedData, device: torch.device) -> TrainingParts:
    """Model (initialised from ``training.seed``), optimizer, weight average, loss, grad scaler, augmentation,
    sampler and loader of a run."""
    t = cfg.training
    context = cfg.dataset.context_slices
    classes = n_classes(data.labels)
    seed_everything(t.seed)
    model = build_model(cfg.model, in_channels=(2 * context + 1) * data.in_channels, classes=classes,
                        channel_stats=data.channel_stats).to(device, memory_format=memory_format(t.channels_last))
    optimizer = build_optimizer(model, cfg)
    ema = build_ema(model, cfg)
    loss_fn = build_loss(cfg.loss, classes)
    precision = resolve_precision(t.precision, device, amp=t.amp)
    logging.getLogger(__name__).info("training precision %s (training.precision: %s, %s; CPU bf16 instructions: %s), "
                                     "%s", precision, t.precision, device.type, cpu_native_bf16(),
                                     "channels_last" if t.channels_last else "contiguous")
    # fp16 needs a GradScaler; bf16 and fp32 do not (disabled, it passes gradients through)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    transform = build_augmentation(cfg.augment, seed=t.seed)
    train_set = SliceDataset(data.cache, data.split.train, labels=data.labels, context_slices=context,
                             transform=transform)
    sampler = EpochSampler(train_set.has_foreground(), n=t.samples_per_epoch, fg_fraction=t.fg_oversample,
                           seed=t.seed)
    loader_gen = torch.Generator()
    loader = DataLoader(train_set, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers,
                        drop_last=len(sampler) > t.batch_size, worker_init_fn=seed_worker, generator=loader_gen,
                        persistent_workers=False, pin_memory=device.type == "cuda")
    return TrainingParts(model=model, optimizer=optimizer, ema=ema, loss_fn=loss_fn, scaler=scaler,
                         transform=transform, sampler=sampler, loader_gen=loader_gen, loader=loader, classes=classes,
                         precision=precision)


def checkpoint_meta_base(cfg: Config, data: PreparedData, classes: int,
                         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata every checkpoint of a run carries (each adds its ``epoch`` and ``metrics``)."""
    return {
        "config": cfg.to_dict(), "preprocessing": data.preprocessing(cfg), "labels": data.labels,
        "in_channels": (2 * cfg.dataset.context_slices + 1) * data.in_channels, "classes": classes,
        "split_hash": data.split.hash, "split_fold": data.split.fold, "dataset_fingerprint": data.source.fingerprint(),
        "split_train": sorted(data.split.train),  # the cases it learnt from: a later champion decision leaves them out
        "versions": library_versions(),
        "tta_axes": mirrors_from_augment(cfg.augment),  # the mirrors training showed the model: what --tta may use
        "training_precision": training_precision(cfg.training),  # resolved on the machine that trained it
        **(extra or {}),
    }


def begin_epoch(parts: TrainingParts, cfg: Config, epoch: int) -> None:
    """Seed every random stream of the 1-based ``epoch`` (``epoch_seed``) and set its learning rate."""
    t = cfg.training
    seed_everything(t.seed, epoch)
    parts.loader_gen.manual_seed(epoch_seed(t.seed, epoch - 1))
    parts.sampler.set_epoch(epoch - 1)
    if parts.transform is not None:
        parts.transform.set_random_seed(epoch_seed(t.seed, epoch - 1))
    for group in parts.optimizer.param_groups:
        group["lr"] = t.lr * lr_factor(epoch - 1, cfg)


def run_epoch(parts: TrainingParts, data: PreparedData, cfg: Config, device: torch.device, *, epoch: int,
              progress: bool) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, np.ndarray]]:
    """Train the 1-based ``epoch`` and validate. Returns (metrics: train/*, val/*, lr, epoch_seconds; the per-case
    validation rows; the validation class maps)."""
    started = time.perf_counter()
    train = train_one_epoch(parts.model, parts.loader, parts.optimizer, parts.loss_fn, parts.scaler, device, cfg,
                            epoch=epoch, progress=progress, classes=parts.classes, ema=parts.ema,
                            precision=parts.precision)
    val, rows, predictions = validate(parts.eval_model, data, data.split.val, cfg, device, loss_fn=parts.loss_fn,
                                      keep_predictions=True)
    metrics = {f"train/{k}": v for k, v in train.items()}
    metrics.update({f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))})
    metrics["lr"] = parts.optimizer.param_groups[0]["lr"]
    metrics["epoch_seconds"] = time.perf_counter() - started
    if cfg.training.monitor not in metrics:
        available = sorted(k for k in metrics if k.startswith("val/"))
        raise ConfigError(f"training.monitor: '{cfg.training.monitor}' is not a validation metric; available: "
                          f"{available}")
    return metrics, rows, predictions


def record_epoch(run_dir: Path, parts: TrainingParts, state: RunState, metrics: dict[str, float],
                 rows: list[dict[str, Any]], predictions: dict[str, np.ndarray], *, epoch: int, cfg: Config,
                 meta_base: dict[str, Any]) -> bool:
    """Add the epoch to ``state``; on a new best write best.pt and val_per_case.csv; always write last.pt and
    history.json. Returns whether the epoch is the best so far."""
    value = state.sign * metrics[cfg.training.monitor]
    is_best = not math.isnan(value) and value > state.best["value"]
    if is_best:
        state.best = {"value": value, "epoch": epoch, "metrics": dict(metrics)}
        save_checkpoint(run_dir / "best.pt", parts.eval_model, {**meta_base, "epoch": epoch, "metrics": metrics})
        state.best_predictions = predictions
        _write_per_case(run_dir / "val_per_case.csv", rows)
    state.history.append({"epoch": epoch, **metrics})
    _save_state(run_dir / "last.pt", parts.model, parts.optimizer, parts.scaler, epoch, state.history, state.best,
                parts.ema)
    atomic_write_json(run_dir / "history.json", state.history)
    return is_best


def fit_result(run_dir: Path, state: RunState, stop_reason: str, artifacts: list[Path]) -> FitResult:
    choice = run_dir / POSTPROCESSING_FILE
    return FitResult(run_dir=run_dir, best_checkpoint=run_dir / "best.pt", best_epoch=state.best["epoch"],
                     best_metrics=state.best["metrics"], history=state.history, stop_reason=stop_reason,
                     per_case_csv=run_dir / "val_per_case.csv", artifacts=artifacts,
                     postprocessing=json.loads(choice.read_text()) if choice.exists() else None)


def train_one_epoch(model, loader, optimizer, loss_fn, scaler, device, cfg: Config, *, epoch: int, progress: bool,
                    classes: int, ema: AveragedModel | None = None, precision: str = "fp32") -> dict[str, float]:
    """One pass over the sampler's slices (updating ``ema`` after each step), in ``precision`` (resolved:
    ``models.resolve_precision``) and the config's memory format.

    Returns {"loss", "dice", "iou", "images_per_s"}: the mean loss over slices, and Dice and IoU of the thresholded
    training predictions from the confusion counts pooled over the epoch's patches (micro, as the weights changed
    during the epoch and on augmented patches: a training signal, not comparable with the per-case validation Dice).
    """
    from tqdm import tqdm

    model.train()
    total, seen = 0.0, 0
    counts = M.BatchCounts(max(2, classes))  # one output channel (sigmoid) still scores background and foreground
    started = time.perf_counter()
    for step, (x, y) in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress, unit="batch")):
        x = x.to(device, non_blocking=True, memory_format=memory_format(cfg.training.channels_last))
        y = y.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"epoch {epoch} step {step}: training loss is {loss.item()} "
                                     f"(lr {optimizer.param_groups[0]['lr']:.3g}); "
                                     "lower training.lr or enable training.grad_clip")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.training.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update_parameters(model)
        counts.update(predict_classes(logits.detach(), cfg.training.threshold), y)
        total += loss.item() * len(x)
        seen += len(x)
    images_per_s = seen / max(time.perf_counter() - started, 1e-9)
    return {"loss": total / max(seen, 1), **counts.summary(), "images_per_s": images_per_s}


# --------------------------------------------------------------------------------------- state & files


def _save_state(path: Path, model, optimizer, scaler, epoch: int, history, best, ema=None) -> None:
    """Resumable training state (weights_only-loadable: tensors and plain containers only)."""
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "history": history, "best": best}
    if ema is not None:
        state["ema"] = ema.state_dict()
    save_torch_atomic(path, state)  # a full disk: one line naming last.pt, the previous one kept


def _load_state(path, model, optimizer, scaler, ema=None) -> tuple[int, list, dict]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    if ema is not None:
        if "ema" not in state:
            raise MedsegError(f"{path}: no weight average in this state, but training.ema_decay is set; resume with "
                              "the config it was saved with")
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    best = dict(state["best"])
    return int(state["epoch"]), list(state["history"]), best


def _write_run_files(run_dir: Path, cfg: Config, data: PreparedData) -> None:
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    with atomic_path(run_dir / "splits.json") as tmp:
        tmp.write_bytes(Path(data.split.path).read_bytes())


def _write_per_case(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def finish_run(run_dir: Path, cfg: Config, data: PreparedData, history, device,
               best_predictions: dict[str, np.ndarray] | None = None) -> list[Path]:
    """Learning curve, post-processing chosen on validation (``choose_postprocessing``) and overlays of fixed validation
    cases, from the best checkpoint. ``best_predictions``: its validation class maps when the loop kept them (else
    they are predicted again from best.pt, e.g. after a resume)."""
    from medseg.checkpoint import model_from_checkpoint
    from medseg.plots import learning_curve_png, overlay_pngs

    paths = [learning_curve_png(history, run_dir / "learning_curve.png")]
    if not (run_dir / "best.pt").exists():  # no finite validation metric: fit() reports it
        return paths
    if best_predictions is None or set(best_predictions) != set(data.split.val):
        model, _, _ = model_from_checkpoint(run_dir / "best.pt", device=device)
        _, _, best_predictions = validate(model, data, data.split.val, cfg, device, keep_predictions=True)
    paths.append(choose_postprocessing(run_dir, data, best_predictions))
    if cfg.training.val_overlays:
        cases = sorted(data.split.val)[: cfg.training.val_overlays]
        lut = label_lut(data.labels)
        # colour (Z, C, S, S) shown as (Z, S, S, C)
        volumes = {cid: (np.asarray(data.cache.image(cid)) if data.in_channels == 1
                         else np.moveaxis(np.asarray(data.cache.image(cid)), 1, -1),
                         lut[np.asarray(data.cache.label(cid))], best_predictions[cid]) for cid in cases}
        paths += overlay_pngs(volumes, run_dir / "overlays")
    return paths


POSTPROCESSING_FILE = "postprocessing.json"


def choose_postprocessing(run_dir: Path, data: PreparedData, predictions: dict[str, np.ndarray]) -> Path:
    """Choose the post-processing on the best checkpoint's validation predictions (``medseg.postprocess``), store it
    in best.pt's metadata (``postprocessing``) and in ``postprocessing.json``; returns that file."""
    from medseg.checkpoint import update_checkpoint_meta
    from medseg.postprocess import select_for_run

    choice = select_for_run(predictions, data)
    meta = update_checkpoint_meta(run_dir / "best.pt", {"postprocessing": choice})
    atomic_write_json(run_dir / POSTPROCESSING_FILE, {**choice, "epoch": int(meta.get("epoch", 0))})
    return run_dir / POSTPROCESSING_FILE
