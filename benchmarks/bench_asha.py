#!/usr/bin/env python
"""ASHA against no early stopping, same space, Optuna seed and sample count, in one run.

For each study: total epochs consumed, wall time, and the best trial's Dice re-evaluated by the eval code on
the full validation split. Target: ASHA uses at most half the epochs for at least 0.98 of the best Dice.
The full curves of the study without early stopping are then replayed under ASHA's stopping rule for several
(grace_period, reduction_factor) settings and many arrival orders (no training: ``asha_replay``).
Then: wall time for the best configuration found to reach a validation Dice of 0.85 (trained alone, with
every core), or the best Dice it reached within --max-epochs.

  python benchmarks/bench_asha.py [--space search_spaces/default.yaml] [--quick]
      [--set overrides.training.ema_decay=0.99]

Studies run in a temporary work folder (own MLflow store, Ray storage, registry untouched); the embedded
dataset and its cache are the project's own (data/synthetic, cache/).
Writes benchmarks/results/asha_vs_full.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    REPO,
    RunClock,
    add_out_arg,
    add_set_arg,
    ensure_synthetic_task,
    machine_info,
    out_path,
    repo_relative,
    study_work_overrides,
    write_results,
)


def asha_replay(curves: list[list[float]], *, max_t: int, grace: int, rf: int, orders: int = 2000, seed: int = 0,
                order_list: list[list[int]] | None = None, epoch_target: float = 0.5,
                dice_target: float = 0.98) -> dict:
    """ASHA's stopping rule (Ray's AsyncHyperBand, one bracket) replayed on measured full curves, one trial at a time,
    over random arrival orders: the share of orders that keep the best trial, the share that meet the benchmark's
    target (epoch ratio <= epoch_target and Dice ratio >= dice_target), and the mean epoch and Dice ratios.

    A trial reaching rung r (grace * rf**k <= max_t) with running best v stops if v < the (1 - 1/rf) quantile of the
    values recorded at r before it, as ``ASHAScheduler``'s ``_Bracket.on_result`` does. Replaying one trial at a
    time is exact for a study with several trials at once as long as epochs take equal time: a trial that started
    earlier reaches every rung earlier, so the values recorded at a rung before a trial are those of the trials that
    started before it, as here. With one given order (``order_list=[order]``), ``stopped_at`` lists each trial's
    last epoch, which is what the study run in that order should use (``bench_asha`` checks it on its own studies).
    """
    import numpy as np

    grace, rf, max_t = int(grace), float(rf), int(max_t)  # spaces may give the factor as a float (2.0)
    n_rungs = int(math.log(max_t / grace) / math.log(rf) + 1)
    rungs = [int(round(grace * rf**k)) for k in range(n_rungs)]  # _Bracket's milestones
    best_final = [float(np.maximum.accumulate(c)[-1]) for c in curves]
    winner = int(np.argmax(best_final))
    running = [np.maximum.accumulate(c[:max_t]) for c in curves]  # each trial's best so far, up to max_t
    rng = np.random.default_rng(seed)
    order_list = order_list or [list(rng.permutation(len(curves))) for _ in range(orders)]
    orders = len(order_list)
    kept = epochs = dice = met = 0.0
    stopped_at = [0] * len(curves)
    for order in order_list:
        stopped_at = _replay_order(running, order, rungs=rungs, rf=rf)
        used = sum(stopped_at[i] for i in order)
        top_value, top_trial = max((float(running[i][stopped_at[i] - 1]), int(i)) for i in order)
        kept += top_trial == winner
        epoch_ratio, dice_ratio = used / sum(min(len(c), max_t) for c in curves), top_value / best_final[winner]
        met += epoch_ratio <= epoch_target and dice_ratio >= dice_target
        epochs += epoch_ratio
        dice += dice_ratio
    out = {"grace_period": grace, "reduction_factor": rf, "rungs": rungs, "orders": orders,
           "p_keeps_best": round(kept / orders, 3), "p_meets_target": round(met / orders, 3),
           "mean_epoch_ratio": round(epochs / orders, 3), "mean_dice_ratio": round(dice / orders, 3)}
    if orders == 1:
        out["stopped_at"] = stopped_at
    return out


def _replay_order(running: list, order: list[int], *, rungs: list[int], rf: float) -> list[int]:
    """The last epoch of each trial (its running best per epoch in ``running``) when the trials arrive one after
    another in ``order`` (0 for those not in it), under ASHA's rule."""
    import numpy as np

    recorded: dict[int, list[float]] = {rung: [] for rung in rungs}
    stopped_at = [0] * len(running)
    for i in order:
        stop_at = len(running[i])
        for rung in rungs:
            if rung > len(running[i]):
                break
            value = float(running[i][rung - 1])
            stop = bool(recorded[rung]) and value < float(np.nanpercentile(recorded[rung], (1 - 1 / rf) * 100))
            recorded[rung].append(value)
            if stop:
                stop_at = rung
                break
        stopped_at[i] = stop_at
    return stopped_at


def early_rank_agreement(curves: list[list[float]]) -> list[dict]:
    """How far ASHA can trust a rung at each epoch: per epoch, Spearman's rank correlation between the trials'
    running best so far and their final best, the eventual winner's place (1 = first), and the largest drop of a
    curve between two consecutive epochs from that epoch on (the noise a rung sees)."""
    import numpy as np
    from scipy.stats import spearmanr

    n_epochs = min(len(c) for c in curves)
    raw = np.asarray([c[:n_epochs] for c in curves], float)
    running = np.maximum.accumulate(raw, axis=1)
    final = running[:, -1]
    winner = int(np.argmax(final))
    out = []
    for e in range(n_epochs):
        rho = spearmanr(running[:, e], final).statistic if np.ptp(running[:, e]) > 0 else float("nan")
        rank = int((running[:, e] > running[winner, e]).sum()) + 1  # 1 = first
        drops = raw[:, e:-1] - raw[:, e + 1:] if e < n_epochs - 1 else np.zeros((len(curves), 0))
        out.append({"epoch": e + 1, "spearman_with_final": round(float(rho), 3), "winner_rank": rank,
                    "largest_drop_from_here": round(max(0.0, float(drops.max())), 3) if drops.size else 0.0})
    return out


def analyse_curves(curves: list[list[float]], *, max_t: int, default: tuple[int, float]) -> dict:
    """What the full curves say about early stopping: rank agreement per epoch and ASHA replays for several settings,
    over random arrival orders (``replay``) and in the order the study suggested its trials, the order an ASHA study
    with the same Optuna seed runs them in (``replay_in_study_order``; ``curves`` are listed in that order)."""
    settings = sorted({default, (1, 2), (2, 2), (3, 2), (1, 3), (2, 3), (3, 3), (1, 4), (2, 4), (4, 2)})
    in_order = [list(range(len(curves)))]
    return {"early_rank_agreement": early_rank_agreement(curves),
            "replay": [asha_replay(curves, max_t=max_t, grace=g, rf=rf) for g, rf in settings],
            "replay_in_study_order": [asha_replay(curves, max_t=max_t, grace=g, rf=rf, order_list=in_order)
                                      for g, rf in settings]}


def replay_check(studies: dict, *, max_t: int, grace: int, rf: float, together: int = 1) -> dict | None:
    """The ASHA study's own setting replayed on the other study's full curves in the study order, against what the
    ASHA study measured, trial by trial. The first ``together`` trials (max_concurrent) start at the same moment and
    race to their first rung, so every order of those is tried: ``matching_order`` is the one that reproduces the
    measured epochs, or None. Returns None when the two studies did not draw the same configurations in the same
    order (e.g. more samples than Optuna's seeded start-up draws)."""
    from itertools import permutations

    a, b = studies["asha"]["trials"], studies["no_early_stopping"]["trials"]
    if [t["params"] for t in a] != [t["params"] for t in b] or any(t["status"] != "completed" for t in b):
        return None
    curves, measured = [t["val_dice"] for t in b], [t["epochs_used"] for t in a]
    k = max(1, min(together, len(b)))
    orders = [list(first) + list(range(k, len(b))) for first in permutations(range(k))]
    replays = [asha_replay(curves, max_t=max_t, grace=grace, rf=rf, order_list=[o]) for o in orders]
    matching = next((o for o, r in zip(orders, replays) if r["stopped_at"] == measured), None)
    return {"measured_epochs_per_trial": measured, "replayed_epochs_per_trial": replays[0]["stopped_at"],
            "replayed_epoch_ratio": replays[0]["mean_epoch_ratio"],
            "replayed_dice_ratio": replays[0]["mean_dice_ratio"], "matching_order": matching}


def curve_analysis(studies: dict, space) -> dict:
    """``analyse_curves`` on the completed full curves of the study without early stopping, at the space's ASHA
    setting, and ``replay_check`` (``asha_replay_check``) when the ASHA study is there too."""
    asha = space.asha
    full = studies["no_early_stopping"]["trials"]
    curves = [t["val_dice"] for t in full if t["status"] == "completed"]
    out = analyse_curves(curves, max_t=asha.max_t, default=(asha.grace_period, asha.reduction_factor))
    if "asha" in studies:
        out["asha_replay_check"] = replay_check(studies, max_t=asha.max_t, grace=asha.grace_period,
                                                rf=asha.reduction_factor, together=space.max_concurrent)
    return out


def reanalyse(path: Path) -> dict:
    """Recompute the curve analysis of a results file from the curves stored in it (no training)."""
    from medseg.search_space import load_space

    report = json.loads(path.read_text())
    space = load_space(REPO / report["space"], overrides=list(report.get("sets") or []))
    report["summary"].update(curve_analysis(report["studies"], space))
    report["summary"]["reanalysed"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_studies(space_path: Path, overrides: list[str]) -> dict:
    """The ASHA study and the study without early stopping, in that order; per study its epochs, seconds, trials
    (with their validation Dice curves) and its best trial re-evaluated on the validation split."""
    from medseg.evaluation import evaluate_checkpoint
    from medseg.search_space import load_space
    from medseg.tuning import run_study, trial_config

    results = {}
    for label, asha in (("asha", True), ("no_early_stopping", False)):
        study = [f"asha.enabled={str(asha).lower()}", f"name=bench-{label}"]
        space = load_space(space_path, overrides=overrides + study)
        started = time.perf_counter()
        outcome = run_study(space)
        seconds = time.perf_counter() - started
        best = outcome.best
        ev = evaluate_checkpoint(best["checkpoint"], trial_config(best["params"], space), split="val", progress=False)
        results[label] = {
            "seconds": round(seconds, 1), "epochs": sum(t["epochs_used"] for t in outcome.trials),
            "trials": [{**{k: t[k] for k in ("trial_id", "params", "status", "epochs_used", "best_dice")},
                        "val_dice": [h["val/dice"] for h in t["history"]]} for t in outcome.trials],
            "best_trial": best["trial_id"], "best_params": best["params"], "best_train_time_dice": best["best_dice"],
            "best_eval_dice": ev.summary["dice"], "best_eval_iou": ev.summary["iou"],
        }
        print(f"{label}: {results[label]['epochs']} epochs, {seconds:.0f} s, "
              f"best re-evaluated Dice {ev.summary['dice']:.4f}", flush=True)
    return results


def time_to_target(cfg, *, max_epochs: int, target_dice: float, run_dir: Path) -> dict:
    """Wall time for ``cfg`` (trained alone, with every core) to reach a validation Dice of ``target_dice``, or the
    best it reached within ``max_epochs``."""
    from medseg.training import fit

    cfg.training.epochs = max_epochs
    cfg.training.threads = os.cpu_count() or 1  # trained alone: the whole machine
    started = time.perf_counter()
    reached: dict = {}

    def on_epoch(report) -> bool:
        if report.metrics["val/dice"] >= target_dice and not reached:
            reached.update(epoch=report.epoch, seconds=round(time.perf_counter() - started, 1),
                           dice=report.metrics["val/dice"])
        return bool(reached)

    result = fit(cfg, on_epoch=on_epoch, run_dir=run_dir, progress=False)
    return {"target_val_dice": target_dice, "reached": bool(reached), **reached,
            "best_val_dice": max(h["val/dice"] for h in result.history), "epochs_run": len(result.history),
            "seconds_run": round(time.perf_counter() - started, 1), "threads": cfg.training.threads}


def run(space_path: Path, *, quick: bool, work: Path, max_epochs: int, target_dice: float,
        sets: list[str] | None = None) -> dict:
    import torch

    from medseg.search_space import load_space
    from medseg.tuning import trial_config

    os.chdir(REPO)  # the space's relative paths (data/synthetic, cache/) are the project's own
    ensure_synthetic_task()
    overrides = study_work_overrides(work) + (["num_samples=4"] if quick else []) + list(sets or [])
    results = run_studies(space_path, overrides)
    a, b = results["asha"], results["no_early_stopping"]
    summary = {
        "epoch_ratio": a["epochs"] / b["epochs"], "time_ratio": a["seconds"] / b["seconds"],
        "dice_ratio": a["best_eval_dice"] / b["best_eval_dice"] if b["best_eval_dice"] else None,
    }
    summary["target_met"] = summary["epoch_ratio"] <= 0.5 and (summary["dice_ratio"] or 0) >= 0.98
    # the full curves of the study without early stopping, replayed under ASHA's rule for other settings and orders
    space = load_space(space_path, overrides=overrides)
    summary.update(curve_analysis(results, space))
    # time to a validation Dice of target_dice with the best configuration found by the ASHA study
    summary["time_to_target"] = time_to_target(trial_config(a["best_params"], space), max_epochs=max_epochs,
                                               target_dice=target_dice, run_dir=work / "time_to_target")
    return {"studies": results, "summary": summary, "torch_threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "default.yaml"))
    parser.add_argument("--quick", action="store_true", help="4 samples instead of the space's num_samples")
    parser.add_argument("--max-epochs", type=int, default=30, help="epoch cap of the time-to-target run")
    parser.add_argument("--target-dice", type=float, default=0.85)
    add_set_arg(parser, "search-space keys for both studies, e.g. overrides.training.ema_decay=0.99 "
                        "(a config key for every trial)")
    add_out_arg(parser, "asha_vs_full.json")
    parser.add_argument("--reanalyse", metavar="RESULTS_JSON",
                        help="only recompute the rank agreement and replays from the curves stored in a results file")
    args = parser.parse_args()
    if args.reanalyse:
        summary = reanalyse(Path(args.reanalyse))["summary"]
        keys = ("early_rank_agreement", "replay", "replay_in_study_order", "asha_replay_check")
        print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
        return 0
    space_path = Path(args.space).resolve()
    clock = RunClock()
    with tempfile.TemporaryDirectory(prefix="bench-asha-") as tmp:
        report = run(space_path, quick=args.quick, work=Path(tmp), max_epochs=args.max_epochs,
                     target_dice=args.target_dice, sets=args.sets)
    report.update(space=repo_relative(space_path), quick=args.quick, sets=args.sets,
                  machine=machine_info(("torch", "ray", "optuna", "segmentation-models-pytorch")), **clock.record())
    write_results(out_path(args, "asha_vs_full"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
