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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import machine_info, write_results  # noqa: E402  (benchmarks/machine.py)

QUICK = ["num_samples=2", "overrides.training.epochs=1", "asha.max_t=1", "asha.grace_period=1"]


def trial_order(outcome) -> list[dict]:
    """Trials in the order they started (the searcher's order): by the start time of their MLflow run, which the
    driver creates when Tune starts the trial (Tune's result grid is not in that order)."""
    from medseg.tracking import get_client

    client = get_client(outcome.tracking_uri)
    started = {t["trial_id"]: client.get_run(t["run_id"]).info.start_time if t.get("run_id") else float("inf") for t in outcome.trials}
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
    return {"name": outcome.name, "seconds": round(seconds, 1), "epochs": sum(t["epochs_used"] for t in trials),
            "warm_start": outcome.warm_start,
            "trials": [{k: t[k] for k in ("trial_id", "params", "status", "epochs_used", "best_value", "best_dice")} for t in trials]}


def run(space_path: Path, *, quick: bool, work: Path, sets: list[str] | None = None, second_seed: int = 1) -> dict:
    from medseg.search_space import load_space
    from medseg.tuning import run_study

    os.chdir(ROOT)  # the space's relative paths (data/synthetic, cache/) are the project's own
    if not (ROOT / "data" / "synthetic" / "Task900_SynthLiverTumor" / "metadata.json").exists():
        from medseg.data.synthetic import generate_task

        generate_task(ROOT / "data" / "synthetic")
    overrides = [f"storage_path={work / 'ray'}", f"tracking_uri=sqlite:///{work / 'mlflow.db'}", f"reports_dir={work / 'reports'}"]
    overrides += (QUICK if quick else []) + list(sets or [])
    studies = {}
    plan = (("first", [], False), ("warm", [f"optuna_seed={second_seed}"], False), ("cold", [f"optuna_seed={second_seed}"], True))
    for label, extra, cold in plan:  # warm before cold: the warm study must see the first study's trials only
        space = load_space(space_path, overrides=overrides + extra)
        started = time.perf_counter()
        outcome = run_study(space, name=f"bench-warmstart-{label}", cold=cold)
        studies[label] = study_record(outcome, time.perf_counter() - started)
        print(f"{label}: {len(outcome.trials)} trials, {studies[label]['epochs']} epochs, {studies[label]['seconds']:.0f} s, "
              f"best {space.metric} {outcome.best['best_value'] if outcome.best else float('nan'):.4f}", flush=True)
    mode, metric = space.mode, space.metric
    target = _best([t["best_value"] for t in studies["first"]["trials"]], mode)
    summary = {"metric": metric, "mode": mode, "first_study_best": target}
    for label in ("warm", "cold"):
        values = [t["best_value"] for t in studies[label]["trials"]]
        summary[label] = {"trials_to_reach_first_best": trials_to_reach(values, target, mode) if target is not None else None,
                          "best_reached": _best(values, mode), "trials": len(values),
                          "running_best": [_best(values[:i], mode) for i in range(1, len(values) + 1)]}
    summary["warm_start_used"] = (studies["warm"]["warm_start"] or {}).get("used")
    return {"studies": studies, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default=None, help="default: search_spaces/default.yaml (--quick: search_spaces/smoke.yaml)")
    parser.add_argument("--quick", action="store_true", help="smoke.yaml, 2 trials of 1 epoch per study")
    parser.add_argument("--second-seed", type=int, default=1, help="Optuna seed of both second studies")
    parser.add_argument("--set", dest="sets", nargs="+", default=[], metavar="KEY=VALUE", help="search-space keys for all studies")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "warmstart.json"))
    args = parser.parse_args()
    space_path = Path(args.space or ROOT / "search_spaces" / ("smoke.yaml" if args.quick else "default.yaml")).resolve()
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-warmstart-") as tmp:
        report = run(space_path, quick=args.quick, work=Path(tmp), sets=args.sets, second_seed=args.second_seed)
    report.update(space=str(space_path.relative_to(ROOT)) if space_path.is_relative_to(ROOT) else str(space_path), quick=args.quick,
                  sets=args.sets, machine=machine_info(("torch", "ray", "optuna", "segmentation-models-pytorch")),
                  load_average_before=load_before, load_average_after=os.getloadavg(),
                  total_seconds=round(time.perf_counter() - started, 1), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
