"""Study reports: reports/<study>.md and .json, with PNG plots (parallel coordinates, Dice per epoch, ASHA budget)."""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.io_utils import atomic_write_json, atomic_write_text, json_safe
from medseg.plots import _pyplot, save_figure
from medseg.tracking import ui_command, ui_url
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
            ax.plot(range(len(axes)), row, color=cmap(n), linestyle=STATUS_STYLE.get(t["status"], "-"), marker="o",
                    alpha=0.85)
        ax.set_xticks(range(len(axes)), labels, fontsize=7)
    ax.set_yticks([])
    ax.set_title(f"trials across searched parameters (colour: {metric_key}; dashed: stopped early)")
    return save_figure(fig, path)


def curves_png(trials: list[dict[str, Any]], path: Path) -> Path:
    """Validation Dice (per-case mean) and training Dice (micro over the epoch's patches) per epoch, all trials."""
    plt = _pyplot()
    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for index, t in enumerate(trials):
        h = t.get("history") or []
        style = dict(linestyle=STATUS_STYLE.get(t["status"], "-"), marker=".", color=f"C{index % 10}")
        ax_val.plot([r["epoch"] for r in h], [r.get("val/dice") for r in h], label=f"{t['trial_id']} ({t['status']})",
                    **style)
        ax_train.plot([r["epoch"] for r in h], [r.get("train/dice") for r in h], **style)
    ax_val.set(xlabel="epoch", ylabel="Dice", title="validation Dice per epoch (per-case mean)")
    ax_train.set(xlabel="epoch", title="training Dice per epoch (micro over patches)")
    for ax in (ax_val, ax_train):
        ax.grid(alpha=0.3)
    if len(trials) <= 12 and any(t.get("history") for t in trials):
        ax_val.legend(fontsize=7)
    return save_figure(fig, path)


def budget_png(trials: list[dict[str, Any]], path: Path) -> Path:
    """Epochs each trial used, against what it trains without ASHA or a time budget (``epochs_planned``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ids = [t["trial_id"] for t in trials]
    used = [t["epochs_used"] for t in trials]
    colours = {"completed": "tab:green", "stopped_early": "tab:orange", "stopped_by_budget": "tab:purple",
               "failed": "tab:red"}
    ax.bar(range(len(ids)), used, color=[colours.get(t["status"], "grey") for t in trials])
    planned = [t["epochs_planned"] for t in trials]
    max_t = max(planned + [1])
    ax.axhline(max_t, color="black", linestyle="--", linewidth=1, label=f"max_t = {max_t}")
    ax.set_xticks(range(len(ids)), ids, rotation=60, fontsize=7)
    ax.set(ylabel="epochs", title=f"budget: {sum(used)} of {sum(planned)} epochs without early stopping")
    ax.legend()
    return save_figure(fig, path)


def write_study_report(outcome, space, decision=None, *, out_dir: str | Path | None = None,
                       robustness: dict[str, Any] | None = None) -> dict[str, Path]:
    """Markdown + JSON + PNGs for a finished study. Returns the written paths. ``robustness``: the promoted champion's
    robustness set (``medseg.robustness.evaluate_robustness``), shown in a section of its own when given."""
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
        "study": name, "space": space.source, "metric": metric, "mode": space.mode,
        "seconds": round(outcome.seconds, 1), "parent_run_id": outcome.parent_run_id,
        "experiment_id": outcome.experiment_id, "tracking_uri": outcome.tracking_uri,
        "study_dir": str(outcome.study_dir),
        "n_trials": len(trials), "status_counts": {s: sum(t["status"] == s for t in trials) for s in STATUSES},
        "epochs_used": sum(t["epochs_used"] for t in trials),
        "epochs_without_early_stopping": sum(t["epochs_planned"] for t in trials),
        "best_trial": outcome.best["trial_id"] if outcome.best else None,
        "baseline_trial": baseline["trial_id"] if baseline else None,
        "decision": decision.to_dict() if decision else None,
        "warm_start": getattr(outcome, "warm_start", None),
        "trials": [{k: v for k, v in t.items()} for t in trials],
        "plots": {k: str(v) for k, v in paths.items()},
        "robustness": robustness,
    }
    atomic_write_json(out_dir / f"{name}.json", json_safe(summary))
    markdown = _markdown(summary, trials, keys, baseline, champion_dice, decision, paths, space, robustness)
    atomic_write_text(out_dir / f"{name}.md", markdown)
    paths.update(markdown=out_dir / f"{name}.md", json=out_dir / f"{name}.json")
    return paths


def _markdown(summary, trials, keys, baseline, champion_dice, decision, paths, space, robustness=None) -> str:
    base_name = f" `{baseline['trial_id']}`" if baseline else " (not in this study)"
    lines = [f"# Study `{summary['study']}`", "", _counts_text(summary), ""]
    if summary.get("warm_start") is not None:
        from medseg.warmstart import note

        text = note(summary["warm_start"])
        lines += [f"{text[0].upper()}{text[1:]}.", ""]
    if decision:
        lines += _decision_lines(summary, decision)
    if robustness:
        from medseg.robustness import robustness_markdown

        lines += robustness_markdown(robustness)
    lines += ["## Trials", "",
              "Dice and IoU: best epoch's mean per-case validation score during training. "
              f"Δ baseline: against the base config's trial{base_name}; "
              "Δ champion: against the previous champion's re-evaluated Dice.", ""]
    lines += _trial_table(trials, keys, baseline["best_dice"] if baseline else None, champion_dice)
    lines += ["", "## Plots", ""] + [f"![{k}]({Path(p).name})" for k, p in paths.items()] + [
        "", "## Reproduce and inspect", "",
        f"- MLflow: `{ui_command(summary['tracking_uri'])}` (tracking URI `{summary['tracking_uri']}`), then "
        f"{ui_url(summary['experiment_id'], uri=summary['tracking_uri'])}: study run `{summary['parent_run_id']}`; "
        "tick its child runs and press Compare for the parallel-coordinates chart.",
        f"- Study folder: `{summary['study_dir']}`; an interrupted study continues with "
        f"`{resume_command(space, summary['study'])}`.", ""]
    return "\n".join(lines)


def _counts_text(summary) -> str:
    """The study's opening sentence: trials by status and the epochs they used."""
    counts = summary["status_counts"]
    by_budget = f"{counts['stopped_by_budget']} stopped by the time budget, " if counts["stopped_by_budget"] else ""
    return (f"Space `{summary['space']}`: {summary['n_trials']} trials in {summary['seconds']:.0f} s, "
            f"metric `{summary['metric']}` ({summary['mode']}); "
            f"{counts['completed']} completed, {counts['stopped_early']} stopped early by ASHA, {by_budget}"
            f"{counts['failed']} failed. Epochs used: {summary['epochs_used']} of "
            f"{summary['epochs_without_early_stopping']} without early stopping.")


def _decision_lines(summary, decision) -> list[str]:
    c = decision.candidate
    lines = ["## Champion decision", "",
             f"Best trial `{summary['best_trial']}` re-evaluated by the eval code on the full validation split: "
             f"Dice **{c['dice']:.4f}**, IoU {c['iou']:.4f}, lesion recall {_fmt(c['lesion_recall'])}, "
             f"lesion precision {_fmt(c['lesion_precision'])} ({c['n_scored']} of {c['n_cases']} cases scored).", "",
             f"**{decision.alias.upper()}** (registry `{decision.registry_name}` v{decision.version}): "
             f"{decision.reason}", ""]
    comp = getattr(decision, "comparison", None) or {}
    if comp and not comp.get("same_split", True) and comp.get("n_cases") is not None:
        lines += [f"The data changed since the champion was judged (its split `{comp['champion_split']}`, this study's "
                  f"`{comp['candidate_split']}`): both were scored on the {comp['n_cases']} validation cases the "
                  f"champion never trained on; {len(comp['left_out'])} of {comp['n_val']} left out"
                  + (f" ({', '.join(map(str, comp['left_out'][:10]))}{', …' if len(comp['left_out']) > 10 else ''})"
                     if comp["left_out"] else "") + ".", ""]
    if decision.mirror:
        lines += [f"Mirrored to `{decision.mirror}` (checkpoint, config, metrics.json, MODEL_CARD.md).", ""]
    return lines


def _trial_table(trials, keys, base_dice, champion_dice) -> list[str]:
    """Markdown rows of the trials, best Dice first."""
    lines = ["| trial | status | " + " | ".join(keys)
             + " | Dice | IoU | best epoch | epochs | Δ baseline | Δ champion |",
             "|" + "---|" * (len(keys) + 8)]
    order = sorted(trials, key=lambda t: -(t["best_dice"] if t["best_dice"] is not None else -1))
    for t in order:
        params = " | ".join(_param(t["params"].get(k)) if not isinstance(t["params"].get(k), str)
                            else f"`{Path(t['params'][k]).name}`" for k in keys)
        status = t["status"] + (f": {t['error'][:60]}" if t.get("error") else "")
        lines.append(f"| `{t['trial_id']}` | {status} | {params} | {_fmt(t['best_dice'])} | {_fmt(t['best_iou'])} | "
                     f"{_fmt(t['best_epoch'])} | {t['epochs_used']} | {_delta(t['best_dice'], base_dice)} | "
                     f"{_delta(t['best_dice'], champion_dice)} |")
    return lines


# ------------------------------------------------------------------------- results table from the tracking store

RESULTS_START, RESULTS_END = "<!-- results-table:start -->", "<!-- results-table:end -->"


def _best_epoch_scores(client, run_id: str) -> tuple[float | None, float | None, int | None]:
    """(val/dice, val/iou, epoch) of the run's best validation-Dice epoch, from its metric history."""
    dice = {m.step: m.value for m in client.get_metric_history(run_id, "val/dice")}
    if not dice:
        return None, None, None
    step = max(dice, key=lambda s: (dice[s], -s))
    iou = {m.step: m.value for m in client.get_metric_history(run_id, "val/iou")}
    return dice[step], iou.get(step), step


def _experiment_rows(client, experiment_ids: list[str], prefix: str) -> list[dict[str, Any]]:
    """The latest finished run of each config named ``<prefix>*`` trained as it is: a train.py run, or a trial of a
    ``--configs`` study (sampled: the config file only); best epoch's scores. Trials of a search space whose base
    config has that name are left out: they train it with the space's overrides and sampled values."""
    runs = client.search_runs(experiment_ids,
                              filter_string=f"params.name LIKE '{prefix}%' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1000)
    latest: dict[str, Any] = {}
    for run in runs:
        if run.data.tags.get("kind") == "train" or (run.data.tags.get("kind") == "trial"
                                                     and set(_sampled_keys(run)) <= {"config_file"}):
            latest.setdefault(run.data.params["name"], run)
    rows = []
    for name in sorted(latest):
        run = latest[name]
        dice, iou, epoch = _best_epoch_scores(client, run.info.run_id)
        n_epochs = len(client.get_metric_history(run.info.run_id, "val/dice"))
        rows.append({"experiment": f"`{name}`", "change": run.data.params.get("description", ""), "dice": dice,
                     "iou": iou, "note": f"best of {n_epochs} epochs (epoch {epoch})", "run": run})
    return rows


def _sampled_keys(run) -> list[str]:
    try:
        sampled = json.loads(run.data.tags.get("sampled", "{}"))
    except ValueError:
        return ["?"]
    return list(sampled) if isinstance(sampled, dict) else ["?"]


def _sampled(run) -> str:
    try:
        sampled = json.loads(run.data.tags.get("sampled", "{}"))
    except ValueError:
        return ""
    def short(key: str) -> str:  # training.lr -> lr, loss.name -> loss
        parts = key.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]

    return ", ".join(f"{short(k)} {_param(v) if not isinstance(v, str) else Path(v).stem}" for k, v in sampled.items())


def _registry_rows(client, registry_name: str) -> list[dict[str, Any]]:
    """One row per registered version: the study's best trial, re-evaluated on the validation split."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{registry_name}'")
    except MlflowException:
        return []
    rows = []
    for version in sorted(versions, key=lambda v: int(v.version)):
        run = client.get_run(version.run_id)
        study = run.data.tags.get("study", run.data.tags.get("config_name", "?"))
        verdict = "promoted" if version.tags.get("promoted") == "true" else "kept as challenger"
        rows.append({"experiment": f"v{version.version}: best trial of study `{study}`", "change": _sampled(run),
                     "dice": float(version.tags["val_dice"]), "iou": float(version.tags["val_iou"]),
                     "note": f"re-evaluated; {verdict}", "run": run})
    return rows


def _holdout_rows(client, experiment_ids: list[str], config_name: str) -> list[dict[str, Any]]:
    """The latest evaluation run of the held-out config: the champion's masks on cases nothing was chosen on."""
    runs = client.search_runs(experiment_ids,
                              filter_string=f"tags.kind = 'eval' and tags.config_name = '{config_name}' "
                              "and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    for run in runs:
        if Path(run.data.params.get("eval.predictions", "")).name == "champion":
            m = run.data.metrics
            return [{"experiment": "champion on held-out cases",
                     "change": f"`{config_name}`: cases no run, trial or decision saw",
                     "dice": m.get("eval/dice"), "iou": m.get("eval/iou"),
                     "note": f"{int(m.get('eval/n_cases', 0))} cases, {int(m.get('eval/n_scored', 0))} scored",
                     "run": run}]
    return []


def results_table(uri: str, *, registry_name: str = "medseg", prefix: str = "exp_",
                  holdout_config: str = "holdout_synthetic", seed_spread: Path | None = None) -> str:
    """Markdown: Experiment | Key change | Val Dice | Val IoU, from the tracking store (see
    ``python -m medseg.report table``)."""
    from medseg.tracking import get_client

    client = get_client(uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    rows = (_experiment_rows(client, experiment_ids, prefix) + _registry_rows(client, registry_name)
            + _holdout_rows(client, experiment_ids, holdout_config))
    if not rows:
        raise MedsegError(f"{uri}: no run of a '{prefix}*' config, no '{registry_name}' model version and no held-out "
                          "evaluation: run `make experiments` (or `make demo`) first")
    lines = ["| Experiment | Key change | Val Dice | Val IoU | How measured |", "|---|---|---|---|---|"]
    lines += [f"| {r['experiment']} | {r['change']} | {_fmt(r['dice'])} | {_fmt(r['iou'])} | {r['note']} |"
              for r in rows]
    hosts = sorted({r["run"].data.tags.get("host", "unrecorded") for r in rows})
    lines += ["", f"Mean per-case Dice and IoU over the validation volumes (held-out row: its own cases). Runs from "
              f"{'; '.join(hosts)}. Generated by `python -m medseg.report table` from `{uri.split('/')[-1]}`."]
    spread = _seed_spread_line(seed_spread)
    if spread:
        lines.append(spread)
    return "\n".join(lines) + "\n"


def _seed_spread_line(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    data = json.loads(Path(path).read_text())
    s = data["summary"]
    return (f"Seed spread of one configuration (`benchmarks/bench_seed_spread.py`, {data['machine'].get('cpu', '?')}): "
            f"best Dice {s['best_dice_min']:.3f}-{s['best_dice_max']:.3f} over {s['seeds']} seeds "
            f"(range {s['best_dice_range']:.3f}, sd {s['best_dice_sd']:.3f}): differences smaller than that are not "
            "evidence about a configuration.")


def replace_block(path: Path, text: str, start: str = RESULTS_START, end: str = RESULTS_END) -> None:
    """Replace what lies between the ``start`` and ``end`` marker lines of a text file (atomically)."""
    content = Path(path).read_text()
    if start not in content or end not in content:
        raise MedsegError(f"{path}: markers {start} and {end} not found; add them where the table belongs")
    head, rest = content.split(start, 1)
    tail = rest.split(end, 1)[1]
    atomic_write_text(Path(path), f"{head}{start}\n{text}{end}{tail}")


# ---------------------------------------------------------------------------- registry history over time

BOOT_KEYS = ("gain", "ci_low", "ci_high", "prob_better")
_NUMBER = r"([+-]?(?:\d+\.?\d*|nan|inf))"
_BOOT_TEXT = re.compile(rf"gain {_NUMBER}, 95% CI \[{_NUMBER}, {_NUMBER}\], P\(better\) {_NUMBER}")


def version_bootstrap(version) -> dict[str, float] | None:
    """The paired bootstrap of a version's Dice gain over the champion it was judged against, or None (no champion
    then, or scored on another split). Source: the model-version tags ``gain``/``ci_low``/``ci_high``/``prob_better``
    (registry.register_version, from the full decision text); versions registered before those tags: the same
    sentence in the description (the decision text, cut at 500 characters)."""
    tags = version.tags or {}
    if all(k in tags for k in BOOT_KEYS):
        values = [tags[k] for k in BOOT_KEYS]
    else:
        found = _BOOT_TEXT.search(version.description or "")
        if not found:
            return None
        values = found.groups()
    return {k: float(v) for k, v in zip(BOOT_KEYS, values)}


def _data_fingerprint(client, run) -> str | None:
    """``dataset_fingerprint`` of a training run, or of a trial's study run (trials carry it on their parent)."""
    tags = run.data.tags
    if tags.get("dataset_fingerprint"):
        return tags["dataset_fingerprint"]
    parent = tags.get("mlflow.parentRunId")
    return client.get_run(parent).data.tags.get("dataset_fingerprint") if parent else None


def history_rows(client, registry_name: str) -> list[dict[str, Any]]:
    """One record per version of ``registry_name``, oldest first (see ``history_markdown`` for the columns)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{registry_name}'")
        aliases = {v: a for a, v in (client.get_registered_model(registry_name).aliases or {}).items()}
    except MlflowException:
        return []
    rows = []
    for version in sorted(versions, key=lambda v: int(v.version)):
        run = client.get_run(version.run_id)
        tags = version.tags or {}
        rows.append({
            "version": int(version.version), "created_ms": int(version.creation_timestamp),
            "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(version.creation_timestamp / 1000)),
            "dice": float(tags["val_dice"]) if "val_dice" in tags else None,
            "iou": float(tags["val_iou"]) if "val_iou" in tags else None,
            "bootstrap": version_bootstrap(version), "promoted": tags.get("promoted") == "true",
            "alias": aliases.get(version.version), "reason": version.description or "",
            "study": run.data.tags.get("study") or run.data.tags.get("config_name", "?"), "change": _sampled(run),
            "fingerprint": _data_fingerprint(client, run), "split_hash": tags.get("split_hash"),
            "run_id": version.run_id,
        })
    return rows


def _interval(row: dict[str, Any]) -> str:
    b = row["bootstrap"]
    if not b:
        return "–"
    return f"{b['gain']:+.4f} [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}], P {b['prob_better']:.3f}"


def history_markdown(rows: list[dict[str, Any]], registry_name: str, uri: str, plot: Path | None = None) -> str:
    """Version | date | Dice | gain [95% CI], P(better) | decision | study: change | data."""
    lines = [f"# Registry history: `{registry_name}`", "",
             "| Version | Date | Val Dice | Gain over champion [95% CI], P(better) | Decision | Study: config change "
             "| Data (fingerprint, split) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "promoted" if r["promoted"] else "challenger"
        verdict += f" (now {r['alias']})" if r["alias"] and r["alias"] != verdict else ""
        why = r["reason"].replace("|", "/").replace("\n", " ")
        data = f"`{(r['fingerprint'] or '?')[:12]}`, split `{(r['split_hash'] or '?')[:12]}`"
        lines.append(f"| v{r['version']} | {r['date']} | {_fmt(r['dice'])} | {_interval(r)} | **{verdict}**: {why} | "
                     f"`{r['study']}`: {r['change'] or '–'} | {data} |")
    lines += ["", "Val Dice: the eval code's mean per-case validation Dice, re-evaluated at registration "
              "(tag `val_dice`). "
              "Gain: paired bootstrap over validation cases against the champion of the day (tags `ci_low`/`ci_high`/"
              "`prob_better`, else the decision text); – when there was no champion to compare with. "
              f"Generated by `python -m medseg.report history` from `{uri.split('/')[-1]}`."]
    if plot is not None:
        lines += ["", f"![history]({Path(plot).name})"]
    return "\n".join(lines) + "\n"


def history_png(rows: list[dict[str, Any]], registry_name: str, path: Path) -> Path:
    """Val Dice of every version against its registration date: filled = promoted, hollow = challenger; the bar is the
    bootstrap 95% CI of the gain, drawn around the version's Dice; the step line is the champion's Dice."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    scored = [r for r in rows if r["dice"] is not None]
    dates = [np.datetime64(r["created_ms"], "ms").astype("datetime64[s]").astype(object) for r in scored]
    champion, champ_x, champ_y = None, [], []
    for r, x in zip(scored, dates):
        if r["promoted"]:
            champion = r["dice"]
        champ_x.append(x)
        champ_y.append(champion if champion is not None else np.nan)
        b = r["bootstrap"]
        if b and all(math.isfinite(b[k]) for k in ("gain", "ci_low", "ci_high")):
            low, high = r["dice"] - b["gain"] + b["ci_low"], r["dice"] - b["gain"] + b["ci_high"]
            ax.errorbar([x], [r["dice"]], yerr=[[r["dice"] - low], [high - r["dice"]]], color="grey", capsize=3,
                        zorder=1)
        ax.scatter([x], [r["dice"]], s=50, zorder=2, color="tab:green" if r["promoted"] else "white",
                   edgecolors="tab:green")
        ax.annotate(f"v{r['version']}", (x, r["dice"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if champ_x:
        ax.step(champ_x, champ_y, where="post", color="tab:green", alpha=0.5, label="champion")
        ax.legend(fontsize=8)
    ax.set(xlabel="registered", ylabel="validation Dice (re-evaluated)",
           title=f"{registry_name}: versions over time (filled: promoted; bar: bootstrap 95% CI of the gain)")
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return save_figure(fig, path)


def registry_history(uri: str, *, registry_name: str = "medseg", out: Path | None = None,
                     plot: Path | None = None) -> str:
    """The history Markdown (also written to ``out``) and its plot (``plot``, default next to ``out`` or in
    reports/)."""
    from medseg.tracking import get_client

    rows = history_rows(get_client(uri), registry_name)
    if not rows:
        raise MedsegError(f"{uri}: registry model '{registry_name}' has no version yet: run tune.py first")
    if not plot:
        plot = Path(out).with_suffix(".png") if out else Path("reports") / f"{registry_name}_history.png"
    plot = Path(plot)
    plot.parent.mkdir(parents=True, exist_ok=True)
    history_png(rows, registry_name, plot)
    text = history_markdown(rows, registry_name, uri, plot)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out), text)
    return text


TRACKING_URI_HELP = "default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db"


def _parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m medseg.report",
                                     description="Reports from the MLflow tracking store.")
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="the results table (Experiment | Key change | Val Dice | Val IoU)")
    table.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    table.add_argument("--registry-name", default="medseg")
    table.add_argument("--prefix", default="exp_", help="config names of the experiment ladder")
    table.add_argument("--holdout-config", default="holdout_synthetic", help="config name of the held-out evaluation")
    table.add_argument("--seed-spread", default="benchmarks/results/seed_spread.json", type=Path)
    table.add_argument("--update", type=Path, metavar="FILE",
                       help=f"write the table between {RESULTS_START} and {RESULTS_END} in FILE")
    history = sub.add_parser("history",
                             help="every registry version over time: Dice, bootstrap CI, decision, study, data")
    history.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    history.add_argument("--registry-name", default="medseg")
    history.add_argument("--out", type=Path, metavar="FILE.md", help="also write the Markdown here")
    history.add_argument("--plot", type=Path, metavar="FILE.png",
                         help="default: FILE.png next to --out, else reports/<name>_history.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    from medseg.tracking import default_tracking_uri

    args = _parser().parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    if args.command == "history":
        print(registry_history(uri, registry_name=args.registry_name, out=args.out, plot=args.plot), end="")
        return 0
    text = results_table(uri, registry_name=args.registry_name, prefix=args.prefix,
                         holdout_config=args.holdout_config, seed_spread=args.seed_spread)
    if args.update:
        replace_block(args.update, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    from medseg.cli import run_cli

    run_cli(main)
