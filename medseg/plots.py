"""PNG figures: learning curves and sample-prediction overlays (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.io_utils import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def learning_curve_png(history: list[dict[str, Any]], path: Path) -> Path:
    """Train/val loss, and train and validation Dice/IoU per epoch (training: micro over the epoch's patches,
    dashed; validation: mean over cases of whole-volume scores, solid)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in ("train/loss", "val/loss"):
        ax_loss.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    for key, colour in (("dice", "C0"), ("iou", "C1")):
        for split, style in (("train", "--"), ("val", "-")):
            ax_score.plot(epochs, [h.get(f"{split}/{key}", np.nan) for h in history], linestyle=style, color=colour,
                          marker="o", label=f"{split}/{key}")
    ax_score.plot(epochs, [h.get("val/dice_micro", np.nan) for h in history], marker="o", color="C2",
                  label="val/dice_micro")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_score.set(xlabel="epoch", ylabel="score", title="Dice / IoU (train: micro over patches; val: per-case mean)",
                 ylim=(0, 1))
    for ax in (ax_loss, ax_score):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def pick_slice(target: np.ndarray, pred: np.ndarray) -> int:
    """The slice with the most ground-truth foreground (else most predicted, else the middle)."""
    for vol in (target, pred):
        counts = (vol > 0).reshape(vol.shape[0], -1).sum(axis=1)
        if counts.max() > 0:
            return int(counts.argmax())
    return target.shape[0] // 2


def show_image(ax, image: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> None:
    """An (X, Y) grey plane, or an (X, Y, 3) colour one (values from vmin to vmax, default [0, 1]), with X
    horizontal."""
    if image.ndim == 2:
        ax.imshow(image.T, cmap="gray", origin="lower", vmin=vmin, vmax=vmax)
        return
    low, high = (0.0, 1.0) if vmin is None or vmax is None else (vmin, vmax)
    rgb = (np.asarray(image, np.float32).transpose(1, 0, 2) - low) / max(high - low, 1e-6)
    ax.imshow(np.clip(rgb, 0.0, 1.0), origin="lower")


def overlay_png(image: np.ndarray, target: np.ndarray | None, pred: np.ndarray, path: Path, title: str = "") -> Path:
    """One (S, S) slice: grey image (or an (S, S, 3) colour one in [0, 1]), ground truth contour in green, prediction
    contour in red."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    show_image(ax, image)
    if target is not None and target.any():
        ax.contour((target > 0).T.astype(float), levels=[0.5], colors=["lime"], linewidths=1.0, origin="lower")
    if pred.any():
        ax.contour((pred > 0).T.astype(float), levels=[0.5], colors=["red"], linewidths=1.0, origin="lower")
    ax.set_title(title or "green: truth, red: prediction", fontsize=9)
    ax.axis("off")
    return save_figure(fig, path)


def overlay_pngs(cases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], out_dir: Path) -> list[Path]:
    """cases: id -> (image (Z, S, S) or colour (Z, S, S, 3), target (Z, S, S), prediction (Z, S, S)); one PNG per
    case."""
    out_dir = Path(out_dir)
    paths = []
    for cid, (image, target, pred) in cases.items():
        z = pick_slice(target, pred)
        paths.append(overlay_png(image[z], target[z], pred[z], out_dir / f"{cid}_z{z:03d}.png",
                                 title=f"case {cid}, slice {z}: green truth, red prediction"))
    return paths
