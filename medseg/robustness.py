"""Robustness set: a checkpoint scored on the validation split under named perturbations at fixed severities.

Image perturbations are albumentations transforms (by name, ``p=1``, equal low/high limits so a severity is one
value, not a range) applied slice by slice to the preprocessed volume the model sees (``Predictor.preprocess``:
(Z, S, S) in [0, 1], colour (Z, 3, S, S)), with a fixed seed per case and perturbation; the CT window shift moves
the HU window level of the checkpoint's preprocessing settings before normalisation (CT checkpoints only).
Post-processing and TTA apply as in normal evaluation (``Predictor``). The table: per perturbation and severity,
Dice, lesion recall and precision (``metrics.summarize`` of ``evaluation.score_case`` over the cases) and the Dice
drop against clean.
"""
from __future__ import annotations

import copy
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medseg.inference import Predictor

WINDOW_SHIFT = "window_level"  # not an albumentations transform: a shift of the window level in HU

# name -> {severity label: spec}; a spec is {"transform": albumentations class name, "args": {...}} or, for the
# window shift, {"level_shift": HU}. Severity labels become MLflow metric names (robust/<name>_<severity>/dice).
PERTURBATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "gaussian_noise": {s: {"transform": "GaussNoise",
                           "args": {"std_range": (float(s), float(s)), "mean_range": (0.0, 0.0)}}
                       for s in ("0.03", "0.06", "0.12")},
    "gaussian_blur": {s: {"transform": "GaussianBlur", "args": {"blur_limit": 0, "sigma_limit": (float(s), float(s))}}
                      for s in ("0.75", "1.5", "3")},
    "contrast": {s: {"transform": "RandomBrightnessContrast",
                     "args": {"brightness_limit": (0.0, 0.0), "contrast_limit": (float(s), float(s))}}
                 for s in ("-0.3", "0.3")},
    "brightness": {s: {"transform": "RandomBrightnessContrast",
                       "args": {"brightness_limit": (float(s), float(s)), "contrast_limit": (0.0, 0.0)}}
                   for s in ("-0.1", "0.1")},
    # down then up again: area averaging down, bilinear up (cv2.INTER_AREA = 3, cv2.INTER_LINEAR = 1)
    "downsample": {s: {"transform": "Downscale", "args": {"scale_range": (float(s), float(s)),
                                                          "interpolation_pair": {"downscale": 3, "upscale": 1}}}
                   for s in ("0.5", "0.33", "0.25")},
    WINDOW_SHIFT: {s: {"level_shift": float(s)} for s in ("-40", "-20", "20", "40")},
}

COLUMNS = ["perturbation", "severity", "dice", "dice_drop", "lesion_recall", "lesion_precision", "n_scored"]


def build_transform(spec: dict[str, Any]):
    """An albumentations transform from a spec (always applied: ``p=1``)."""
    import albumentations as A

    return getattr(A, spec["transform"])(**spec.get("args", {}), p=1.0)


def case_seed(seed: int, case_id: str, name: str, severity: str) -> int:
    """A fixed seed per case, perturbation and severity (stable across processes, unlike ``hash``)."""
    return (seed + zlib.crc32(f"{case_id}|{name}|{severity}".encode())) % 2**31


def perturb_volume(volume: np.ndarray, spec: dict[str, Any], seed: int) -> np.ndarray:
    """(Z, S, S) float32 in [0, 1] -> the same, each slice through the spec's transform (seeded, in slice order). A
    colour volume (Z, C, S, S): each slice as the (S, S, C) image albumentations expects."""
    import albumentations as A

    pipeline = A.Compose([build_transform(spec)], seed=seed)
    if volume.ndim == 4:
        planes = [pipeline(image=np.ascontiguousarray(plane.transpose(1, 2, 0)))["image"].transpose(2, 0, 1)
                  for plane in volume]
    else:
        planes = [pipeline(image=np.ascontiguousarray(plane))["image"] for plane in volume]
    out = np.stack(planes).astype(np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


class PerturbedPredictor(Predictor):
    """A Predictor whose preprocessed volumes pass through ``self.perturb`` (None: unchanged)."""

    perturb: Callable[[np.ndarray], np.ndarray] | None = None

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        volume = super().preprocess(image)
        return self.perturb(volume) if self.perturb is not None else volume


def applicable(table: dict[str, dict[str, dict[str, Any]]],
               settings: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """The table without window shifts when the checkpoint has no CT window (percentile normalisation)."""
    return {name: sev for name, sev in table.items()
            if settings.get("window") is not None or not any("level_shift" in s for s in sev.values())}


def _predict(predictor: PerturbedPredictor, image: np.ndarray, spec: dict[str, Any] | None, seed: int) -> np.ndarray:
    clean_settings = predictor.settings
    try:
        if spec is None:
            predictor.perturb = None
        elif "level_shift" in spec:
            predictor.perturb = None
            predictor.settings = copy.deepcopy(clean_settings)
            window = predictor.settings["window"]
            window["level"] = float(window["level"]) + float(spec["level_shift"])
        else:
            predictor.perturb = lambda volume: perturb_volume(volume, spec, seed)
        return predictor.predict(image)
    finally:
        predictor.perturb, predictor.settings = None, clean_settings


def evaluate_robustness(ckpt: str | Path, cfg, *, split: str = "val", table: dict | None = None, seed: int = 0,
                        flip_tta: bool = False, postprocess: bool = True, allow_split_mismatch: bool = False,
                        batch_size: int = 16, device: str | None = None, data=None,
                        progress: bool = True) -> dict[str, Any]:
    """Score ``ckpt`` on ``split`` clean and under every perturbation of ``table`` (default ``PERTURBATIONS``).
    Returns {"rows": [clean row, one per perturbation and severity], "worst_drop", "worst", "seconds", ...}."""
    from tqdm import tqdm

    from medseg.errors import MedsegError
    from medseg.evaluation import score_case
    from medseg.training import prepare_data

    start = time.perf_counter()
    predictor = PerturbedPredictor(ckpt, device=device, batch_size=batch_size, flip_tta=flip_tta,
                                   postprocess=postprocess)
    data = data or prepare_data(cfg, progress=progress)
    if predictor.meta.get("split_hash") != data.split.hash and not allow_split_mismatch:
        raise MedsegError(f"{ckpt}: trained with split {predictor.meta.get('split_hash')}, but the config gives split "
                          f"{data.split.hash}; scoring there may include its training cases (use "
                          "--allow-split-mismatch to force)")
    table = applicable(PERTURBATIONS if table is None else table, predictor.settings)
    keys = [("clean", "-", None)] + [(name, sev, spec) for name, sevs in table.items() for sev, spec in sevs.items()]
    per_case: dict[tuple[str, str], list[dict[str, Any]]] = {(n, s): [] for n, s, _ in keys}
    case_ids = data.split.cases(split)
    if not case_ids:
        raise MedsegError(f"split '{split}' of {data.split.path} is empty")
    for cid in tqdm(case_ids, desc=f"robustness {split}", unit="case", disable=not progress, leave=False):
        case = data.source.load(cid)
        for name, sev, spec in keys:
            pred = _predict(predictor, case.image, spec, case_seed(seed, cid, name, sev))
            per_case[(name, sev)].append(score_case(cid, pred, case.label, predictor.labels))
    rows = [robustness_row(name, sev, spec, per_case[(name, sev)]) for name, sev, spec in keys]
    clean = rows[0]["dice"]
    for row in rows:
        row["dice_drop"] = clean - row["dice"]
    perturbed = [r for r in rows[1:] if r["dice_drop"] == r["dice_drop"]]
    worst = max(perturbed, key=lambda r: r["dice_drop"]) if perturbed else None
    return {"checkpoint": str(Path(ckpt).resolve()), "split": split, "split_hash": data.split.hash, "seed": seed,
            "flip_tta": flip_tta, "postprocessing": predictor.postprocessing, "n_cases": len(case_ids),
            "clean_dice": clean, "worst_drop": worst["dice_drop"] if worst else float("nan"),
            "worst": f"{worst['perturbation']}_{worst['severity']}" if worst else None,
            "seconds": round(time.perf_counter() - start, 1), "rows": rows}


def robustness_row(name: str, severity: str, spec: dict[str, Any] | None,
                   scored: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of the table from the per-case scores of one perturbation and severity (``metrics.summarize``)."""
    from medseg import metrics as M

    s = M.summarize(scored)
    return {"perturbation": name, "severity": severity, "spec": spec, "dice": s["dice"],
            "lesion_recall": s.get("lesion_recall", float("nan")),
            "lesion_precision": s.get("lesion_precision", float("nan")),
            "n_scored": s["n_scored"], "n_cases": s["n_cases"]}


def format_robustness(summary: dict[str, Any]) -> str:
    """The table as aligned text (evaluation.format_table)."""
    from medseg.evaluation import format_table

    return format_table(summary["rows"], COLUMNS)


def robustness_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics: robust/<name>_<severity>/{dice,dice_drop,lesion_recall,lesion_precision}, robust/worst_drop."""
    out = {"robust/worst_drop": summary["worst_drop"], "robust/clean_dice": summary["clean_dice"]}
    for row in summary["rows"][1:]:
        for key in ("dice", "dice_drop", "lesion_recall", "lesion_precision"):
            out[f"robust/{row['perturbation']}_{row['severity']}/{key}"] = row[key]
    return out


def write_robustness(summary: dict[str, Any], out_dir: str | Path) -> Path:
    """robustness.json in ``out_dir`` (NaN as null)."""
    from medseg.io_utils import atomic_write_json, json_safe

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "robustness.json"
    atomic_write_json(path, json_safe(summary))
    return path


def log_robustness(client, run_id: str, summary: dict[str, Any], path: Path | None = None) -> None:
    """The metrics (and the JSON as artifact ``eval/robustness.json``) on an existing MLflow run."""
    from medseg.tracking import log_metrics

    log_metrics(client, run_id, robustness_metrics(summary), step=0)
    if path is not None:
        client.log_artifact(run_id, str(path), "eval")


def robustness_markdown(summary: dict[str, Any], title: str = "Robustness (champion)") -> list[str]:
    """Lines of a markdown section for a report."""
    lines = [f"## {title}", "",
             f"Validation split ({summary['n_cases']} cases) under fixed-seed perturbations (medseg/robustness.py); "
             f"clean Dice {summary['clean_dice']:.4f}, worst drop {summary['worst_drop']:.4f} ({summary['worst']}).",
             "",
             "| perturbation | severity | Dice | drop | lesion recall | lesion precision |",
             "|---|---|---|---|---|---|"]

    def f(v):
        return "—" if v is None or v != v else f"{v:.4f}"

    for r in summary["rows"]:
        lines.append(f"| {r['perturbation']} | {r['severity']} | {f(r['dice'])} | {f(r['dice_drop'])} | "
                     f"{f(r['lesion_recall'])} | {f(r['lesion_precision'])} |")
    return lines + [""]


def strongest(table: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """One severity per perturbation, the last listed (the strongest): the study's cheaper set."""
    return {name: dict([list(sevs.items())[-1]]) for name, sevs in table.items() if sevs}


def champion_robustness(checkpoint: str | Path, cfg, *, progress: bool = False, data=None) -> dict[str, Any]:
    """The robustness set of a newly promoted champion at the strongest severities (``strongest``; about a third of
    the full set's cost), for its study report."""
    return evaluate_robustness(checkpoint, cfg, table=strongest(PERTURBATIONS), data=data, progress=progress)
