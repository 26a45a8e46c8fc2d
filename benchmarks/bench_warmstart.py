#!/usr/bin/env python
"""Warm start against cold start, same space, in one run.

A first study of 8 trials; then a second study of 8 trials twice on the same space and the same (other) Optuna seed:
warm (the searcher told the first study's completed trials, medseg.warmstart) and cold (``--cold``). For each second
study: the trials it needed to reach the first study's best value of the space's metric (None if it never did), in
the order Optuna proposed them, and the best it reached, whatever it is. The warm study runs before the cold one, so it
sees only the first study's trials.

  python benchmarks/bench_warmstart.py [--space search_spaces/default.yaml] [--quick]

--quick: search_spaces/smoke.yaml, 2 + 2 + 2 trials of 1 epoch (a check that the script runs; numbers mean nothing).
Studies run in a temporary work folder (own MLflow store, Ray storage, registry untouched); the embedded dataset and
its cache are the project's own (data/synthetic, cache/). Writes benchmarks/results/warmstart.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

QUICK = ["num_samples=2", "overrides.training.epochs=1", "asha.max_t=1", "asha.grace_period=1"]


def trial_order(outcome) -> list[dict]:
    """Trials in the order they started (the searcher's order): by the start time of their MLflow run, which the
    driver creates when Tune starts the trial (Tune's result grid is not in that order)."""
    from medseg.tracking import get_client

    client = get_client(outcome.tracking_uri)
    started = {t["trial_id"]: client.get_run(t["run_id"]).info.start_time if t.get("run_id") else float("inf")
               for t in outcome.trials}
    return sorted(outcome.trials, key=lambda t: started[t["trial_id"]])


def trials_to_reach(values: list[float | None], target: float, mode: str) -> int | None:
    """1-based index of the first value at least as good as ``target`` (by ``mode``), or None."""
    for i, v in enumerate(values, 1):
        if v is not None and (v >= target if mode == "max" else v <= target):
            return i
    return None


def _best(values: list[float | None], mode: str) -> float | None:
    found = [v for v in values if v is not None]
    return (max(found) if mode == "max" else min(found)) if found else None


def study_record(outcome, seconds: float) -> dict:
    trials = trial_order(outcome)
    keys = ("trial_id", "params", "status", "epochs_used", "best_value", "best_dice")
    return {"name": outcome.name, "seconds": round(seconds, 1), "epochs": sum(t["epochs_used"] for t in trials),
            "warm_start": outcome.warm_start, "trials": [{k: t[k] for k in keys} for t in trials]}


def run(space_path: Path, *, quick: bool, work: Path, sets: list[str] | None = None, second_seed: int = 1) -> dict:
    from medseg.search_space import load_space
    from medseg.tuning import run_study

    os.chdir(common.REPO)  # the space's relative paths (data/synthetic, cache/) are the project's own
    common.ensure_synthetic_task()
    overrides = common.study_work_overrides(work) + (QUICK if quick else []) + list(sets or [])
    studies = {}
    second = [f"optuna_seed={second_seed}"]
    plan = (("first", [], False), ("warm", second, False), ("cold", second, True))
    for label, extra, cold in plan:  # warm before cold: the warm study must see the first study's trials only
        space = load_space(space_path, overrides=overrides + extra)
        started = time.perf_counter()
        outcome = run_study(space, name=f"bench-warmstart-{label}", cold=cold)
        studies[label] = study_record(outcome, time.perf_counter() - started)
        best = outcome.best["best_value"] if outcome.best else float("nan")
        print(f"{label}: {len(outcome.trials)} trials, {studies[label]['epochs']} epochs, "
              f"{studies[label]['seconds']:.0f} s, best {space.metric} {best:.4f}", flush=True)
    mode, metric = space.mode, space.metric
    target = _best([t["best_value"] for t in studies["first"]["trials"]], mode)
    summary = {"metric": metric, "mode": mode, "first_study_best": target}
    for label in ("warm", "cold"):
        values = [t["best_value"] for t in studies[label]["trials"]]
        reach = trials_to_reach(values, target, mode) if target is not None else None
        summary[label] = {"trials_to_reach_first_best": reach, "best_reached": _best(values, mode),
                          "trials": len(values),
                          "running_best": [_best(values[:i], mode) for i in range(1, len(values) + 1)]}
    summary["warm_start_used"] = (studies["warm"]["warm_start"] or {}).get("used")
    return {"studies": studies, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default=None,
                        help="default: search_spaces/default.yaml (--quick: search_spaces/smoke.yaml)")
    parser.add_argument("--quick", action="store_true", help="smoke.yaml, 2 trials of 1 epoch per study")
    parser.add_argument("--second-seed", type=int, default=1, help="Optuna seed of both second studies")
    common.add_set_arg(parser, "search-space keys for all studies")
    common.add_out_arg(parser, "warmstart.json")
    args = parser.parse_args()
    default_space = common.REPO / "search_spaces" / ("smoke.yaml" if args.quick else "default.yaml")
    space_path = Path(args.space or default_space).resolve()
    clock = common.RunClock()
    with tempfile.TemporaryDirectory(prefix="bench-warmstart-") as tmp:
        report = run(space_path, quick=args.quick, work=Path(tmp), sets=args.sets, second_seed=args.second_seed)
    report.update(space=common.repo_relative(space_path), quick=args.quick, sets=args.sets,
                  machine=common.machine_info(("torch", "ray", "optuna", "segmentation-models-pytorch")),
                  **clock.record())
    common.write_results(common.out_path(args, "warmstart"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
