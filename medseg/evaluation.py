"""Evaluation: a checkpoint or a predictions folder -> per-case table + summary; the leaderboard.

Checkpoints are scored at the input's original geometry (the same ``Predictor`` as infer.py), on a split
read from the saved splits.json. Refusing to score a checkpoint on a split other than the one it was
trained with is deliberate: a different split may put its training cases into the evaluation set.
"""
from __future__ import annotations

import csv
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medseg import metrics as M
from medseg.data.dataset import label_lut
from medseg.errors import DataError, MedsegError, ShapeMismatchError, UsageError
from medseg.io_utils import atomic_path, atomic_write_json, json_safe
from medseg.io_utils import format_table as format_cells

PREDICTION_SUFFIXES = (".pkl.gz", ".pkl", ".nii.gz", ".nii", "_mask.png", ".png", ".tif", ".tiff", ".gif", ".jpg",
                       ".bmp")


@dataclass
class EvalResult:
    name: str  # method name or checkpoint path
    rows: list[dict[str, Any]]  # per case: case_id + case_metrics keys
    summary: dict[str, Any]
    labels: list[int]
    info: dict[str, Any] = field(default_factory=dict)

    def per_case_dice(self) -> dict[str, float]:
        return {r["case_id"]: float(r["dice"]) for r in self.rows}

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """per_case.csv, per_case.json and summary.json in ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with atomic_path(out_dir / "per_case.csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)
        atomic_write_json(out_dir / "per_case.json", json_safe(self.rows))
        summary = {"name": self.name, "labels": self.labels, **self.info, "summary": self.summary}
        atomic_write_json(out_dir / "summary.json", json_safe(summary))
        return {"per_case_csv": out_dir / "per_case.csv", "per_case_json": out_dir / "per_case.json",
                "summary": out_dir / "summary.json"}




def score_case(case_id: str, pred: np.ndarray, target: np.ndarray, labels: Sequence[int], *,
               lesions: bool = True) -> dict[str, Any]:
    """Metrics of one case from raw label volumes (the task's own label values); ``lesions`` adds lesion-wise
    detection (connected components: the slow part on large volumes)."""
    if pred.shape != target.shape:
        raise DataError(f"case {case_id}: prediction shape {pred.shape} != ground truth shape {target.shape}")
    lut = label_lut(labels)
    classes = list(range(1, len(labels) + 1))
    metrics = M.case_metrics(lut[pred], lut[target], classes, lesion_labels=classes if lesions else None)
    return {"case_id": case_id, **metrics}


# ----------------------------------------------------------------------------------------- checkpoints


def evaluate_checkpoint(ckpt: str | Path, cfg, *, split: str = "val", flip_tta: bool = False,
                        allow_split_mismatch: bool = False, batch_size: int = 16, device: str | None = None,
                        progress: bool = True, data=None, postprocess: bool = True,
                        cases: Sequence[str] | None = None) -> EvalResult:
    """Score a checkpoint on ``split`` of the config's dataset at full (original) resolution, with the post-processing
    it carries (``postprocess=False``: without). ``cases``: only these cases of the split (e.g. those a champion
    trained on left out), in the split's order."""
    from tqdm import tqdm

    from medseg.inference import Predictor
    from medseg.training import prepare_data

    predictor = Predictor(ckpt, device=device, batch_size=batch_size, flip_tta=flip_tta, postprocess=postprocess)
    data = data or prepare_data(cfg, progress=progress)
    trained_on = predictor.meta.get("split_hash")
    if trained_on != data.split.hash and not allow_split_mismatch:
        raise UsageError(f"{ckpt}: trained with split {trained_on}, but the config gives split {data.split.hash} "
                          f"({data.split.path}); scoring there may include its training cases "
                          "(use --allow-split-mismatch to force)")
    labels = predictor.labels
    rows = []
    chosen = data.split.cases(split)
    if cases is not None:
        outside = sorted(set(cases) - set(chosen))
        if outside:
            raise UsageError(f"case {outside[0]!r} is not in split '{split}' of {data.split.path}")
        chosen = [cid for cid in chosen if cid in set(cases)]
    # the cache holds each image as the checkpoint preprocesses it: only the ground truth is decoded then
    cached = predictor.reads_cache(data.cache) and hasattr(data.source, "load_label")

    def predicted(cid: str) -> tuple[np.ndarray, np.ndarray]:
        if cached:
            label = data.source.load_label(cid)
            planes = data.cache.image(cid)
            if planes.shape[0] != label.shape[2]:
                raise ShapeMismatchError(f"{data.source.file_of(cid)} (case {cid}): ground truth has {label.shape[2]} "
                                         f"slices, the cache {data.cache.root} {planes.shape[0]}")
            return predictor.predict_planes(planes, label.shape), label
        case = data.source.load(cid)
        predictor.check_channels(case.image, f"{case.source} (case {cid})")
        return predictor.predict(case.image), case.label

    # a case is scored (connected components at full resolution: seconds on a large volume) in a thread while the
    # next one is predicted; at most one case waits to be scored, so memory stays that of two cases
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-score") as scorer:
        pending = None
        for cid in tqdm(chosen, desc=f"eval {split}", unit="case", disable=not progress, leave=False):
            pred, label = predicted(cid)
            if pending is not None:
                rows.append(pending.result())
            pending = scorer.submit(score_case, cid, pred, label, labels)
            del pred, label
        if pending is not None:
            rows.append(pending.result())
    if not rows:
        raise MedsegError(f"split '{split}' of {data.split.path} is empty")
    info = {"checkpoint": str(Path(ckpt).resolve()), "split": split, "split_hash": data.split.hash,
            "flip_tta": flip_tta, "tta_axes": predictor.tta_axes, "postprocessing": predictor.postprocessing,
            "images_from": "slice cache" if cached else "decoded",
            "dataset": str(data.source.root)}
    return EvalResult(name=str(ckpt), rows=rows, summary=M.summarize(rows), labels=labels, info=info)


# ------------------------------------------------------------------------------------ predictions folder


def find_prediction(pred_dir: Path, case_id: str) -> Path | None:
    for suffix in PREDICTION_SUFFIXES:
        path = pred_dir / f"{case_id}{suffix}"
        if path.is_file():
            return path
    return None


def read_prediction(path: Path, *, labels: dict[int, str] | None = None, case_id: str | None = None) -> np.ndarray:
    """A prediction file -> uint8 (X, Y, Z) label volume: evalseg pickle, NIfTI, or a 2D mask image (depth 1);
    ``case_id`` is named in the errors of a mask image (a colour one, values that are no labels)."""
    name = path.name.lower()
    if name.endswith((".pkl", ".pkl.gz")):
        from medseg.data.evalseg_pickle import read_label_pickle

        return read_label_pickle(path).volume
    if name.endswith((".nii", ".nii.gz")):
        from medseg.data.sources.common import load_nifti, to_label

        vol = load_nifti(path, source=str(path))
        return to_label(vol.array, source=str(path))
    from medseg.data.sources.folders2d import read_mask

    return read_mask(path, labels, case_id=case_id)


def evaluate_predictions(source, pred_dir: str | Path, *, labels: Sequence[int] | None = None,
                         case_ids: Sequence[str] | None = None, missing_as_empty: bool = False,
                         name: str | None = None, progress: bool = True, lesions: bool = True) -> EvalResult:
    """Score a folder of predictions (``<id>.pkl[.gz]``, ``<id>.nii[.gz]`` or ``<id>[_mask].png``) against the
    source's ground truth. Only ground truth is read, so tasks without CT volumes can be scored.

    Without ``case_ids``, the cases scored are those with both a ground truth and a prediction file (as the
    dataset's own reference figures are computed); ground-truth cases without a prediction are listed in
    ``info["missing"]`` and printed as a warning. With ``case_ids`` every listed case must have a prediction.
    ``missing_as_empty`` scores missing predictions as empty masks instead.
    """
    import logging

    from tqdm import tqdm

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: predictions folder not found")
    labels = list(labels) if labels else sorted(int(k) for k in source.labels if int(k) != 0)
    wanted = list(case_ids) if case_ids is not None else source.ground_truth_ids()
    found = {cid: find_prediction(pred_dir, cid) for cid in wanted}
    missing = [cid for cid, p in found.items() if p is None]
    if missing and case_ids is not None and not missing_as_empty:
        raise DataError(f"{pred_dir}: no prediction for {len(missing)} case(s): {', '.join(missing[:8])}"
                        f"{' ...' if len(missing) > 8 else ''} (use --missing-as-empty to score them as empty)")
    ids = wanted if missing_as_empty else [cid for cid in wanted if found[cid] is not None]
    if not ids:
        raise DataError(f"{pred_dir}: no prediction file matches a ground-truth case of {source.root}")
    if missing and not missing_as_empty:
        logging.getLogger(__name__).warning("%s: %d ground-truth case(s) have no prediction and are not scored: %s",
                                            pred_dir, len(missing), ", ".join(missing[:8]))
    rows = []
    for cid in tqdm(ids, desc=f"score {pred_dir.name}", unit="case", disable=not progress, leave=False):
        target = source.load_label(cid)
        pred = read_prediction(found[cid], labels=source.labels, case_id=cid) if found[cid] else np.zeros_like(target)
        rows.append(score_case(cid, pred, target, labels, lesions=lesions))
    info = {"predictions": str(pred_dir.resolve()), "missing": missing,
            "missing_scored_as_empty": missing_as_empty, "dataset": str(source.root)}
    return EvalResult(name=name or pred_dir.name, rows=rows, summary=M.summarize(rows), labels=labels, info=info)


def leaderboard(results: Sequence[EvalResult], case_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rank methods by mean per-case Dice on one common case set (the intersection, or ``case_ids``)."""
    if case_ids is not None:
        common = set(case_ids)
    else:
        common = set.intersection(*(set(r.per_case_dice()) for r in results))
    table = []
    for r in results:
        rows = [row for row in r.rows if row["case_id"] in common]
        s = M.summarize(rows)
        table.append({"method": r.name, "dice": s["dice"], "iou": s["iou"], "dice_micro": s["dice_micro"],
                      "lesion_recall": s.get("lesion_recall", float("nan")),
                      "lesion_precision": s.get("lesion_precision", float("nan")),
                      "n_cases": s["n_cases"], "n_scored": s["n_scored"]})
    table.sort(key=lambda row: -row["dice"] if row["dice"] == row["dice"] else float("inf"))
    for rank, row in enumerate(table, start=1):
        row["rank"] = rank
    return table


def format_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """Aligned plain-text table of dict rows, one column per key of ``columns`` (floats to 4 decimals)."""
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return format_cells(columns, ([fmt(r.get(c, "")) for c in columns] for r in rows))


# -------------------------------------------------------------------------------------------- tracking


def log_eval_run(cfg, result: EvalResult, out_files: dict[str, Path], *, run_name: str | None = None) -> str:
    """An MLflow run for an evaluation, linked to the training run (tag ``training_run_id``)."""
    from medseg.tracking import (
        ensure_experiment,
        get_client,
        log_metrics,
        start_run,
        tags_of,
        tracked_run,
        tracking_uri,
    )

    uri = tracking_uri(cfg)
    client = get_client(uri)
    exp = ensure_experiment(uri, cfg.output.experiment)
    info = result.info
    tags = tags_of(cfg, kind="eval", split=info.get("split", ""),
                   checkpoint=info.get("checkpoint", info.get("predictions", "")))
    if info.get("checkpoint"):
        from medseg.checkpoint import load_checkpoint
        from medseg.tracking import find_training_run

        experiments = [e.experiment_id for e in client.search_experiments()]
        meta = load_checkpoint(info["checkpoint"])["meta"]
        info["training_run_id"] = find_training_run(client, experiments, Path(info["checkpoint"]), meta)
    if info.get("training_run_id"):
        tags["training_run_id"] = info["training_run_id"]
        tags["mlflow.note.content"] = f"Evaluation of the checkpoint of training run {info['training_run_id']}"
    params = {"eval.split": str(info.get("split", "")), "eval.flip_tta": str(info.get("flip_tta", False)),
              "eval.tta_axes": str(info.get("tta_axes", [])),
              "eval.postprocessing": _postprocessing_text(info.get("postprocessing")),
              "eval.checkpoint": str(info.get("checkpoint", "")), "eval.predictions": str(info.get("predictions", ""))}
    run_id = start_run(client, exp, run_name=run_name or f"eval-{Path(result.name).stem}", params=params, tags=tags,
                       parent_run_id=None)
    with tracked_run(client, run_id):
        log_metrics(client, run_id, {f"eval/{k}": v for k, v in result.summary.items()}, step=0)
        for path in out_files.values():
            client.log_artifact(run_id, str(path), "eval")
    return run_id


def _postprocessing_text(choice) -> str:
    from medseg.postprocess import describe

    return describe(choice)[:500] if choice else "none"


def expected_mean_dice(result: EvalResult) -> tuple[float, int]:
    """Mean per-case Dice and number scored (handy for comparing with published figures)."""
    return M.mean_per_case_dice([r["dice"] for r in result.rows])


def dump_summary(result: EvalResult) -> str:
    keys = ("dice", "iou", "dice_micro", "sensitivity", "precision", "lesion_recall", "lesion_precision", "n_cases",
            "n_scored", "n_empty_empty")
    return json.dumps({k: result.summary.get(k) for k in keys}, default=lambda v: None if v != v else v)


def default_eval_dir(ckpt: Path, split: str, tta: bool) -> Path:
    """``<checkpoint folder>/eval-<split>``, except for a registered version (models/champion ->
    models/versions/<name>-vN, marked by its MODEL_CARD.md), which stays as registered: its evaluations go to
    ``./eval/<name>-vN-<split>``."""
    folder = ckpt.resolve().parent
    leaf = f"eval-{split}{'-tta' if tta else ''}"
    if (folder / "MODEL_CARD.md").exists():
        return Path.cwd() / "eval" / f"{folder.name}-{leaf.removeprefix('eval-')}"
    return folder / leaf


# ------------------------------------------------------------------------------------------- eval.py


def kaggle_task_of(pred_dir: str | Path) -> Path | None:
    """The task folder of a predictions folder in the Kaggle layout, ``<root>/<task>/Predictions/<method>`` where
    ``<task>`` holds metadata.json and GroundTruth/; None for a folder anywhere else."""
    pred_dir = Path(pred_dir).resolve()
    task = pred_dir.parent.parent
    if pred_dir.parent.name == "Predictions" and (task / "metadata.json").is_file() and (task / "GroundTruth").is_dir():
        return task
    return None


def dataset_config(data_dir: str | Path, *, overrides: Sequence[str] = ()):
    """A Config of defaults for the dataset folder ``data_dir``: its format detected (``detect_format``), its
    foreground labels those of its metadata. A Kaggle task folder (with metadata.json) becomes
    ``format: kaggle, path: <root>, task: <task folder name>``; a Kaggle root must hold a single Task* folder.
    ``overrides`` are ``--set KEY=VALUE`` strings applied on top."""
    from medseg.config import config_from_dict
    from medseg.data.sources import detect_format, open_source
    from medseg.data.sources.kaggle_evalseg import find_tasks

    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: dataset folder not found")
    fmt = detect_format(data_dir)
    path, task = data_dir, None
    if fmt == "kaggle":
        if (data_dir / "metadata.json").is_file():
            path, task = data_dir.parent, data_dir.name
        elif len(tasks := find_tasks(data_dir)) > 1:
            raise DataError(f"--data {data_dir}: holds several tasks ({', '.join(t.name for t in tasks)}); "
                            "pass --data <its task folder>")
    source = open_source(fmt, path, task=task)
    labels = sorted(int(k) for k in source.labels if int(k) != 0)
    raw = {"dataset": {"format": fmt, "path": str(path), "task": task, "labels": labels or None}}
    return config_from_dict(raw, source=f"defaults for {data_dir}", overrides=list(overrides))


def eval_config(*, config: str | Path | None = None, overrides: Sequence[str] = (),
                ckpt: str | Path | None = None, predictions: str | Path | None = None,
                data: str | Path | None = None):
    """The Config eval.py runs with: ``config`` when given (as train.py); else the checkpoint's own stored config
    (``ckpt``); else defaults for the dataset folder ``data``; else defaults for the task folder of ``predictions``
    when it lies in the Kaggle layout (``<root>/<task>/Predictions/<method>``). ``overrides`` apply in every case."""
    from medseg.checkpoint import checkpoint_config
    from medseg.config import config_from_dict, load_config
    from medseg.errors import ConfigError

    if config and data:
        raise ConfigError("give --config or --data, not both (--data builds a config of defaults for that dataset; "
                          "with --config use --set dataset.path=...)")
    if ckpt and data:
        raise ConfigError("--data applies to --predictions only: a checkpoint is scored on the dataset of its own "
                          "stored config, or of --config")
    if config:
        return load_config(config, list(overrides))
    if ckpt:
        cfg = checkpoint_config(ckpt)
        if not overrides:
            return cfg
        return config_from_dict(cfg.to_dict(), source="--set", overrides=list(overrides), resolve=False)
    if data:
        return dataset_config(data, overrides=overrides)
    if predictions is None:
        raise ConfigError("nothing to evaluate: give --ckpt and/or --predictions")
    if not Path(predictions).is_dir():
        raise DataError(f"{predictions}: predictions folder not found")
    task = kaggle_task_of(predictions)
    if task is None:
        raise ConfigError(f"--predictions {predictions}: not in a Kaggle layout (<root>/<task>/Predictions/<method>, "
                          f"the task folder holding metadata.json and GroundTruth/), so the ground truth is unknown: "
                          f"pass --data DATASET_DIR or --config CONFIG")
    return dataset_config(task, overrides=overrides)


def run_eval_cli(cfg, *, ckpt: str | Path | None = None, predictions: str | Path | None = None,
                 split: str = "val", flip_tta: bool = False, allow_split_mismatch: bool = False,
                 missing_as_empty: bool = False, with_leaderboard: bool = False, out: str | Path | None = None,
                 mlflow: bool = True, postprocess: bool = True, robustness: bool = False) -> str:
    """eval.py's job: score ``ckpt`` on ``split`` and/or the ``predictions`` folder (on the checkpoint's cases when
    both are given), optionally rank them among the task's Predictions/<method> folders; writes the tables under
    ``out`` (defaults: see eval.py --help) and returns the text to print. ``robustness``: also the checkpoint's
    robustness set (medseg.robustness: robustness.json in the same folder, metrics robust/* on the eval run)."""
    from medseg.data.sources import open_source_from_config

    out_lines = []
    results: list[EvalResult] = []
    if ckpt:
        result, text = _checkpoint_part(cfg, ckpt, out, split=split, flip_tta=flip_tta, mlflow=mlflow,
                                        allow_split_mismatch=allow_split_mismatch, postprocess=postprocess,
                                        robustness=robustness)
        out_lines.append(text)
        results.append(result)
    source = None
    if predictions:
        source = open_source_from_config(cfg.dataset)
        # with a checkpoint too, ``out`` already holds the checkpoint's tables: the predictions' go to a subfolder
        pred_out = f"eval-{Path(predictions).name}"
        pred_out = Path(out) / pred_out if out and ckpt else Path(out or pred_out)
        result, text = _predictions_part(cfg, source, predictions, pred_out, results, mlflow=mlflow,
                                         missing_as_empty=missing_as_empty)
        out_lines.append(text)
        results.append(result)
    if with_leaderboard:
        source = source or open_source_from_config(cfg.dataset)
        out_lines.append(_leaderboard_part(cfg, source, results, missing_as_empty=missing_as_empty))
    return "\n".join(out_lines)


def _checkpoint_part(cfg, ckpt: str | Path, out: str | Path | None, *, split: str, flip_tta: bool, mlflow: bool,
                     allow_split_mismatch: bool, postprocess: bool, robustness: bool) -> tuple[EvalResult, str]:
    """run_eval_cli on a checkpoint: its tables (in ``out`` or ``default_eval_dir``), eval run, text."""
    result = evaluate_checkpoint(ckpt, cfg, split=split, flip_tta=flip_tta, allow_split_mismatch=allow_split_mismatch,
                                 postprocess=postprocess)
    out_dir = Path(out) if out else default_eval_dir(Path(ckpt), split, flip_tta)
    files = result.write(out_dir)
    if mlflow:
        result.info["mlflow_run_id"] = log_eval_run(cfg, result, files)
    lines = [f"{result.name} on {split}: {dump_summary(result)}\nper-case table: {files['per_case_csv']}"]
    if result.info.get("postprocessing"):
        from medseg.postprocess import active, describe

        post = result.info["postprocessing"]
        lines.append(f"post-processing chosen on validation: {describe(post)}{', applied' if active(post) else ''}")
    if robustness:
        lines.append(_robustness(cfg, ckpt, result, out_dir, split=split, flip_tta=flip_tta, postprocess=postprocess,
                                 allow_split_mismatch=allow_split_mismatch, mlflow=mlflow))
    return result, "\n".join(lines)


def _predictions_part(cfg, source, predictions: str | Path, out_dir: Path, scored: list[EvalResult], *,
                      mlflow: bool, missing_as_empty: bool) -> tuple[EvalResult, str]:
    """run_eval_cli on a predictions folder (on the cases of ``scored[0]`` when there is one): tables, run, text."""
    case_ids = list(scored[0].per_case_dice()) if scored else None
    result = evaluate_predictions(source, predictions, labels=cfg.dataset.labels, case_ids=case_ids or None,
                                  missing_as_empty=missing_as_empty)
    files = result.write(out_dir)
    if mlflow:
        result.info["mlflow_run_id"] = log_eval_run(cfg, result, files)
    return result, f"{result.name}: {dump_summary(result)}\nper-case table: {files['per_case_csv']}"


LEADERBOARD_COLUMNS = ["rank", "method", "dice", "iou", "dice_micro", "lesion_recall", "lesion_precision", "n_scored"]


def _leaderboard_part(cfg, source, scored: list[EvalResult], *, missing_as_empty: bool) -> str:
    """``scored`` ranked among the source's Predictions/<method> folders, on the cases of ``scored[0]``."""
    methods = getattr(source, "predictions_methods", lambda: [])()
    if not methods:
        raise UsageError(f"{source.root}: no Predictions/<method> folders to rank against")
    case_ids = list(scored[0].per_case_dice()) if scored else None
    results = list(scored)
    for method in methods:
        results.append(evaluate_predictions(source, Path(source.root) / "Predictions" / method,
                                            labels=cfg.dataset.labels, case_ids=case_ids,
                                            missing_as_empty=missing_as_empty, name=method))
    return (f"leaderboard on {len(case_ids) if case_ids else 'all'} cases:\n"
            + format_table(leaderboard(results), LEADERBOARD_COLUMNS))


def _robustness(cfg, ckpt, result: EvalResult, out_dir: Path, *, mlflow: bool, **kwargs) -> str:
    """The robustness set of ``ckpt``: robustness.json next to the eval tables, metrics on the eval run; its text
    table."""
    from medseg.robustness import evaluate_robustness, format_robustness, log_robustness, write_robustness

    summary = evaluate_robustness(ckpt, cfg, **kwargs)
    path = write_robustness(summary, out_dir)
    if mlflow and result.info.get("mlflow_run_id"):
        from medseg.tracking import get_client, tracking_uri

        log_robustness(get_client(tracking_uri(cfg)), result.info["mlflow_run_id"], summary, path)
    return (f"robustness on {summary['split']} ({summary['n_cases']} cases, {summary['seconds']:.0f} s): worst Dice "
            f"drop {summary['worst_drop']:.4f} ({summary['worst']})\n{format_robustness(summary)}\n"
            f"robustness table: {path}")
