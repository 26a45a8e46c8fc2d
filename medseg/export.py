"""Export a champion as a small, committed deliverable: half-precision checkpoint, config, card, metrics, overlays.

    python -m medseg.export --ckpt models/champion/checkpoint.pt --out docs/champion
                            [--config CONFIG] [--set KEY=VALUE]

The weights are stored in float16 (half the size); the export re-scores both the original and the float16
checkpoint on the validation split and refuses to write when their mean per-case Dice differ in the third
decimal. ``config.yaml`` holds the champion's config with the dataset and cache paths relative to the repository
root (in ``config.yaml`` and in the checkpoint itself), so ``make data`` then ``eval.py --ckpt <out>/checkpoint.pt``
reproduces the figures from a fresh clone. Overlays show image, ground truth and prediction of a few validation cases
chosen by their Dice (best, quartiles, worst, and a lesion-free case when there is one), not the flattering ones only.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medseg.checkpoint import load_checkpoint
from medseg.errors import MedsegError
from medseg.io_utils import atomic_write_json, atomic_write_text, json_safe, sha256_bytes

DICE_DECIMALS = 3


def half_precision_copy(ckpt: Path, dest: Path, config: dict[str, Any] | None = None) -> Path:
    """The checkpoint with its floating-point weights and buffers in float16 (``weights_dtype`` added to the metadata)
    and, when given, ``config`` as its stored config. Loading casts the weights back to the model's float32."""
    from medseg.checkpoint import model_from_checkpoint, save_checkpoint

    model, meta, _ = model_from_checkpoint(ckpt)
    meta = {**meta, "weights_dtype": "float16", "exported_from": Path(ckpt).name,
            **({"config": config} if config else {})}
    return save_checkpoint(dest, model.half(), meta)


def relative_config(cfg, root: Path) -> dict[str, Any]:
    """The config as a dict with dataset.path and dataset.cache_dir relative to ``root`` where they lie inside it."""
    raw = cfg.to_dict()
    for key in ("path", "cache_dir"):
        value = raw["dataset"].get(key)
        if value and Path(value).is_absolute() and Path(value).resolve().is_relative_to(root.resolve()):
            raw["dataset"][key] = str(Path(value).resolve().relative_to(root.resolve()))
    raw["output"] = {**raw["output"], "run_dir": "runs", "tracking_uri": None}
    return raw


def _truth_empty(row: dict[str, Any]) -> bool:
    return all(row[k] + row["fn/" + k.split("/", 1)[1]] == 0 for k in row if k.startswith("tp/"))


def pick_cases(rows: list[dict[str, Any]], n: int = 5) -> list[str]:
    """Case ids spanning the Dice distribution: best, quartiles and worst case with a lesion, plus one lesion-free
    case."""
    scored = sorted((r for r in rows if not _truth_empty(r)), key=lambda r: -r["dice"])
    chosen = [scored[round(q * (len(scored) - 1))]["case_id"] for q in np.linspace(0, 1, n - 1)] if scored else []
    return list(dict.fromkeys(chosen + [r["case_id"] for r in rows if _truth_empty(r)][:1]))


def overlay_triptych(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: Path, title: str, window) -> Path:
    """(X, Y) slice (colour: (X, Y, 3)) in three panels: the image, the ground truth (green) and the prediction (red)
    over it."""
    from medseg.plots import _pyplot, save_figure, show_image

    plt = _pyplot()
    if window:
        low, high = window["level"] - window["width"] / 2, window["level"] + window["width"] / 2
    else:
        low, high = np.percentile(image, [1, 99])
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    panels = zip(axes, (None, truth, pred), ("image", "ground truth", "prediction"), ("", "lime", "red"))
    for ax, mask, name, colour in panels:
        show_image(ax, image, low, high)
        if mask is not None and mask.any():
            ax.imshow(np.ma.masked_equal((mask > 0).T.astype(float), 0),
                      cmap=plt.matplotlib.colors.ListedColormap([colour]), origin="lower", alpha=0.45)
            ax.contour((mask > 0).T.astype(float), levels=[0.5], colors=[colour], linewidths=0.8, origin="lower")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def write_overlays(ckpt: Path, data, case_ids: list[str], rows: dict[str, dict], out_dir: Path) -> list[Path]:
    from medseg.inference import Predictor
    from medseg.plots import pick_slice

    predictor = Predictor(ckpt, device="cpu")
    window = predictor.settings.get("window")
    paths = []
    for cid in case_ids:
        case = data.source.load(cid)
        pred = predictor.predict(case.image)
        image, truth, pred = (np.moveaxis(a, 2, 0) for a in (case.image, case.label, pred))  # (Z, X, Y[, C])
        z = pick_slice(truth, pred)
        dice, lesion_free = rows[cid]["dice"], _truth_empty(rows[cid])
        if not lesion_free:
            verdict = f"Dice {dice:.3f}"
        else:
            verdict = "no lesion, none predicted" if dice != dice else "no lesion: a false positive scores Dice 0"
        title = f"case {cid}, slice {z}: {verdict}"
        paths.append(overlay_triptych(image[z], truth[z], pred[z], out_dir / f"case_{cid}_z{z:03d}.png", title, window))
    return paths


def export_champion(ckpt: str | Path, cfg, out_dir: str | Path, *, root: Path, champion_dir: Path | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """Write ``out_dir``: checkpoint.pt (float16), config.yaml, metrics.json, MODEL_CARD.md, eval/ and overlays/."""
    import yaml

    from medseg.evaluation import evaluate_checkpoint
    from medseg.training import prepare_data

    ckpt, out_dir = Path(ckpt), Path(out_dir)
    data = prepare_data(cfg, progress=progress)
    with tempfile.TemporaryDirectory(prefix="medseg-export-") as tmp:
        # with the relative config stored in it, eval.py --ckpt alone works
        half = half_precision_copy(ckpt, Path(tmp) / "checkpoint.pt", relative_config(cfg, root))
        full = evaluate_checkpoint(ckpt, cfg, data=data, progress=progress)
        exported = evaluate_checkpoint(half, cfg, data=data, progress=progress)
        if round(full.summary["dice"], DICE_DECIMALS) != round(exported.summary["dice"], DICE_DECIMALS):
            raise MedsegError(f"{ckpt}: float16 weights change the mean Dice from {full.summary['dice']:.4f} to "
                              f"{exported.summary['dice']:.4f}; export refused")
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(half, out_dir / "checkpoint.pt")
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(relative_config(cfg, root), sort_keys=False))
    exported.write(out_dir / "eval")
    rows = {r["case_id"]: r for r in exported.rows}
    overlays = write_overlays(out_dir / "checkpoint.pt", data, pick_cases(exported.rows), rows, out_dir / "overlays")
    meta = load_checkpoint(out_dir / "checkpoint.pt")["meta"]
    keys = ("dice", "iou", "dice_micro", "lesion_recall", "lesion_precision", "n_cases", "n_scored", "n_empty_empty")
    metrics = {"split": "val", "split_hash": data.split.hash, "dataset_fingerprint": data.source.fingerprint(),
               "source_checkpoint_sha256": sha256_bytes(ckpt.read_bytes()), "weights_dtype": "float16",
               "val": {k: exported.summary.get(k) for k in keys}, "val_float32": {k: full.summary.get(k) for k in keys},
               "mlflow_run_id": meta.get("mlflow_run_id") or _mirror_run_id(champion_dir), "epoch": meta.get("epoch"),
               "overlays": [p.name for p in overlays]}
    atomic_write_json(out_dir / "metrics.json", json_safe(metrics))
    card = Path(champion_dir or ckpt.parent) / "MODEL_CARD.md"
    if card.is_file():  # paths of the exporting machine become paths relative to the repository root
        text = card.read_text().replace(f"{Path(root).resolve()}/", "")
        atomic_write_text(out_dir / "MODEL_CARD.md",
                          text + f"\nThis copy: float16 weights (`{out_dir.name}/checkpoint.pt`), validation "
                          f"Dice {metrics['val']['dice']:.4f} (float32 {metrics['val_float32']['dice']:.4f}); "
                          "see metrics.json.\n")
    return metrics


def _mirror_run_id(champion_dir: Path | None) -> str | None:
    """The MLflow run of a mirrored champion (``models/champion/metrics.json``): a trial's checkpoint does not hold
    it."""
    import json

    path = Path(champion_dir or "") / "metrics.json"
    return json.loads(path.read_text()).get("candidate", {}).get("run_id") if champion_dir and path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    import argparse

    from medseg.config import load_config
    from medseg.evaluation import eval_config

    parser = argparse.ArgumentParser(prog="python -m medseg.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint to export (models/champion/checkpoint.pt)")
    parser.add_argument("--config", help="config whose dataset and split the checkpoint was validated on "
                        "(default: its stored config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="docs/champion", help="output folder (committed)")
    args = parser.parse_args(argv)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        cfg = eval_config(ckpt=args.ckpt, overrides=args.overrides)
    metrics = export_champion(args.ckpt, cfg, args.out, root=Path.cwd(), champion_dir=Path(args.ckpt).resolve().parent)
    print(f"{args.out}: val Dice {metrics['val']['dice']:.4f} (float32 {metrics['val_float32']['dice']:.4f}), "
          f"IoU {metrics['val']['iou']:.4f}; overlays: {', '.join(metrics['overlays'])}")
    return 0


if __name__ == "__main__":
    from medseg.cli import run_cli

    run_cli(main)
