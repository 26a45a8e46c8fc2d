"""Study reports: reports/<study>.md and .json, with PNG plots (parallel coordinates, Dice per epoch, ASHA budget)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from medseg.io_utils import atomic_write_json, atomic_write_text
from medseg.plots import _pyplot, save_figure
from medseg.tracking import ui_command
from medseg.tuning import resume_command

STATUSES = ("completed", "stopped_early", "stopped_by_budget", "failed")
STATUS_STYLE = {"completed": "-", "stopped_early": "--", "stopped_by_budget": "-.", "failed": ":"}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if 0.01 <= abs(v) < 10 or v == 0 else f"{v:.{digits - 1}g}"
    return str(v)


def _param(v: Any) -> str:
    """Searched values with 3 significant digits (a learning rate of 0.00125 must not print as 0.001)."""
    return f"{v:.3g}" if isinstance(v, float) else _fmt(v)


def _delta(v: float | None, ref: float | None) -> str:
    if v is None or ref is None or any(isinstance(x, float) and math.isnan(x) for x in (v, ref)):
        return "–"
    return f"{v - ref:+.4f}"


def baseline_trial(trials: list[dict[str, Any]], space) -> dict[str, Any] | None:
    """The trial run with the base config's own values (OptunaSearch evaluates it first), if any."""
    point = space.base_point()
    if point is None:
        return None
    for t in trials:
        if all(t["params"].get(k) == v for k, v in point.items()):
            return t
    return None


def parallel_coordinates_png(trials: list[dict[str, Any]], keys: list[str], metric_key: str, path: Path) -> Path:
    """One line per finished trial across the searched params (each axis scaled to [0, 1]) and the metric."""
    plt = _pyplot()
    rows = [t for t in trials if t.get(metric_key) is not None]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * (len(keys) + 1)), 4))
    axes = keys + [metric_key]
    if rows:
        columns = []
        labels = []
        for key in axes:
            values = [t["params"].get(key) if key != metric_key else t[metric_key] for t in rows]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                arr = np.asarray(values, float)
                if key != metric_key and arr.min() > 0 and arr.max() / arr.min() > 20:
                    arr = np.log10(arr)
                    key = f"log10 {key}"
                low, high = float(arr.min()), float(arr.max())
                columns.append((arr - low) / (high - low) if high > low else np.full_like(arr, 0.5))
                labels.append(f"{key}\n[{_fmt(low, 3)}, {_fmt(high, 3)}]")
            else:
                cats = sorted({str(v) for v in values})
                columns.append(np.array([cats.index(str(v)) / max(1, len(cats) - 1) for v in values]))
                labels.append(f"{key}\n{' | '.join(cats)}")
        data = np.stack(columns, axis=1)
        scores = np.array([t[metric_key] for t in rows], float)
        norm = (scores - scores.min()) / (np.ptp(scores) or 1.0)
        cmap = plt.get_cmap("viridis")
        for row, n, t in zip(data, norm, rows):
            ax.plot(range(len(axes)), row, color=cmap(n), linestyle=STATUS_STYLE.get(t["status"], "-"), marker="o", alpha=0.85)
        ax.set_xticks(range(len(axes)), labels, fontsize=7)
    ax.set_yticks([])
    ax.set_title(f"trials across searched parameters (colour: {metric_key}; dashed: stopped early)")
    return save_figure(fig, path)


def curves_png(trials: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        h = t.get("history") or []
        if h:
            ax.plot([r["epoch"] for r in h], [r["val/dice"] for r in h], linestyle=STATUS_STYLE.get(t["status"], "-"), marker=".",
                    label=f"{t['trial_id']} ({t['status']})")
    ax.set(xlabel="epoch", ylabel="validation Dice (per-case mean)", title="validation Dice per epoch, all trials")
    ax.grid(alpha=0.3)
    if len(trials) <= 12:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def budget_png(trials: list[dict[str, Any]], path: Path) -> Path:
    """Epochs each trial used, against what it trains without ASHA or a time budget (``epochs_planned``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ids = [t["trial_id"] for t in trials]
    used = [t["epochs_used"] for t in trials]
    colours = {"completed": "tab:green", "stopped_early": "tab:orange", "stopped_by_budget": "tab:purple", "failed": "tab:red"}
    ax.bar(range(len(ids)), used, color=[colours.get(t["status"], "grey") for t in trials])
    planned = [t["epochs_planned"] for t in trials]
    max_t = max(planned + [1])
    ax.axhline(max_t, color="black", linestyle="--", linewidth=1, label=f"max_t = {max_t}")
    ax.set_xticks(range(len(ids)), ids, rotation=60, fontsize=7)
    ax.set(ylabel="epochs", title=f"budget: {sum(used)} of {sum(planned)} epochs without early stopping")
    ax.legend()
    return save_figure(fig, path)


def write_study_report(outcome, space, decision=None, *, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Markdown + JSON + PNGs for a finished study. Returns the written paths."""
    out_dir = Path(out_dir or space.reports_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = outcome.name
    trials = outcome.trials
    metric = space.metric
    for t in trials:
        t["metric"] = t.get("best_value")
    keys = list(space.params) or ([] if not space.fixed_configs else ["config_file"])
    baseline = baseline_trial(trials, space)
    champion_dice = (decision.champion_before or {}).get("dice") if decision else None
    paths = {
        "parallel": parallel_coordinates_png(trials, keys, "metric", out_dir / f"{name}_parallel.png"),
        "curves": curves_png(trials, out_dir / f"{name}_curves.png"),
        "budget": budget_png(trials, out_dir / f"{name}_budget.png"),
    }
    summary = {
        "study": name, "space": space.source, "metric": metric, "mode": space.mode, "seconds": round(outcome.seconds, 1),
        "parent_run_id": outcome.parent_run_id, "tracking_uri": outcome.tracking_uri, "study_dir": str(outcome.study_dir),
        "n_trials": len(trials), "status_counts": {s: sum(t["status"] == s for t in trials) for s in STATUSES},
        "epochs_used": sum(t["epochs_used"] for t in trials), "epochs_without_early_stopping": sum(t["epochs_planned"] for t in trials),
        "best_trial": outcome.best["trial_id"] if outcome.best else None,
        "baseline_trial": baseline["trial_id"] if baseline else None,
        "decision": decision.to_dict() if decision else None,
        "trials": [{k: v for k, v in t.items()} for t in trials],
        "plots": {k: str(v) for k, v in paths.items()},
    }
    atomic_write_json(out_dir / f"{name}.json", _json_safe(summary))
    atomic_write_text(out_dir / f"{name}.md", _markdown(summary, trials, keys, baseline, champion_dice, decision, paths, space))
    paths.update(markdown=out_dir / f"{name}.md", json=out_dir / f"{name}.json")
    return paths


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _markdown(summary, trials, keys, baseline, champion_dice, decision, paths, space) -> str:
    base_dice = baseline["best_dice"] if baseline else None
    base_name = f" `{baseline['trial_id']}`" if baseline else " (not in this study)"
    lines = [f"# Study `{summary['study']}`", "",
             f"Space `{summary['space']}`: {summary['n_trials']} trials in {summary['seconds']:.0f} s, "
             f"metric `{summary['metric']}` ({summary['mode']}); "
             f"{summary['status_counts']['completed']} completed, {summary['status_counts']['stopped_early']} stopped early by ASHA, "
             + (f"{summary['status_counts']['stopped_by_budget']} stopped by the time budget, " if summary['status_counts']['stopped_by_budget'] else "")
             + f"{summary['status_counts']['failed']} failed. Epochs used: {summary['epochs_used']} of "
             f"{summary['epochs_without_early_stopping']} without early stopping.", ""]
    if decision:
        c = decision.candidate
        lines += ["## Champion decision", "",
                  f"Best trial `{summary['best_trial']}` re-evaluated by the eval code on the full validation split: "
                  f"Dice **{c['dice']:.4f}**, IoU {c['iou']:.4f}, lesion recall {_fmt(c['lesion_recall'])}, lesion precision {_fmt(c['lesion_precision'])} "
                  f"({c['n_scored']} of {c['n_cases']} cases scored).", "",
                  f"**{decision.alias.upper()}** (registry `{decision.registry_name}` v{decision.version}): {decision.reason}", ""]
        if decision.mirror:
            lines += [f"Mirrored to `{decision.mirror}` (checkpoint, config, metrics.json, MODEL_CARD.md).", ""]
    lines += ["## Trials", "",
              "Dice and IoU: best epoch's mean per-case validation score during training. "
              f"Δ baseline: against the base config's trial{base_name}; "
              "Δ champion: against the previous champion's re-evaluated Dice.", "",
              "| trial | status | " + " | ".join(keys) + " | Dice | IoU | best epoch | epochs | Δ baseline | Δ champion |",
              "|" + "---|" * (len(keys) + 8)]
    order = sorted(trials, key=lambda t: -(t["best_dice"] if t["best_dice"] is not None else -1))
    for t in order:
        params = " | ".join(_param(t["params"].get(k)) if not isinstance(t["params"].get(k), str) else f"`{Path(t['params'][k]).name}`" for k in keys)
        status = t["status"] + (f": {t['error'][:60]}" if t.get("error") else "")
        lines.append(f"| `{t['trial_id']}` | {status} | {params} | {_fmt(t['best_dice'])} | {_fmt(t['best_iou'])} | {_fmt(t['best_epoch'])} | "
                     f"{t['epochs_used']} | {_delta(t['best_dice'], base_dice)} | {_delta(t['best_dice'], champion_dice)} |")
    lines += ["", "## Plots", ""] + [f"![{k}]({Path(p).name})" for k, p in paths.items()] + [
        "", "## Reproduce and inspect", "",
        f"- MLflow: `{ui_command(summary['tracking_uri'])}` (tracking URI `{summary['tracking_uri']}`), study run `{summary['parent_run_id']}`; "
        "compare the child runs with the parallel-coordinates chart.",
        f"- Study folder: `{summary['study_dir']}`; an interrupted study continues with `{resume_command(space, summary['study'])}`.", ""]
    return "\n".join(lines)
