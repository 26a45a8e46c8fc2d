#!/usr/bin/env python
"""Noise floor of a study: the base configuration of a search space trained with several seeds, nothing else changed.

The spread of the best validation Dice over seeds is what one trial's score means: configurations whose scores
differ by less cannot be told apart by a single run each, and a scheduler cannot be asked to keep "the best" of
them to a finer ratio. The configurations' own spread is read from the ASHA benchmark's study without early
stopping (``benchmarks/results/asha_vs_full.json``) when it exists, for comparison.

Each seed is trained as a study trial is (the space's overrides, one torch thread), ``--parallel`` at a time.
Seed 0 of the default space is the base trial of ``make demo``: same curve, to the bit, on the same machine.

  python benchmarks/bench_seed_spread.py [--space search_spaces/default.yaml] [--seeds 0 1 2 3] [--parallel 2]
      [--set training.ema_decay=0.99 ...]

Writes benchmarks/results/seed_spread.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks import common


def train_seed(space_path: str, seed: int, run_dir: str, params: dict | None = None) -> dict:
    """One seed of the space's base configuration; returns its validation Dice curve."""
    os.chdir(common.REPO)  # the space's relative paths (data/synthetic, cache/) are the project's own
    from medseg.search_space import load_space
    from medseg.training import fit
    from medseg.tuning import trial_config

    space = load_space(Path(space_path))
    cfg = trial_config(params or {}, space)
    cfg.training.seed = seed
    cfg.training.threads = 1  # as a study trial with resources {cpu: 1}
    started = time.perf_counter()
    result = fit(cfg, run_dir=Path(run_dir), progress=False)
    curve = [h["val/dice"] for h in result.history]
    return {"seed": seed, "val_dice": curve, "best_dice": max(curve), "best_epoch": result.best_epoch,
            "seconds": round(time.perf_counter() - started, 1)}


def summarize(runs: list[dict], config_best: list[float] | None) -> dict:
    """Spread of the best Dice over seeds, next to the spread over configurations when given."""
    best = [r["best_dice"] for r in runs]
    out = {"seeds": len(best), "best_dice_min": min(best), "best_dice_max": max(best),
           "best_dice_range": max(best) - min(best), "best_dice_mean": statistics.fmean(best),
           "best_dice_sd": statistics.stdev(best) if len(best) > 1 else None}
    if config_best:
        out.update(configs=len(config_best), config_best_dice_range=max(config_best) - min(config_best),
                   seed_range_over_config_range=(out["best_dice_range"] / (max(config_best) - min(config_best))
                                                 if max(config_best) > min(config_best) else None))
    return out


def train_seeds(space_path: Path, seeds: list[int], params: dict, parallel: int) -> list[dict]:
    """Every seed, ``parallel`` at a time in spawned processes, each in its own run folder of a temporary one."""
    with tempfile.TemporaryDirectory(prefix="bench-seeds-") as tmp, ProcessPoolExecutor(
            max_workers=parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_seed, str(space_path), seed, str(Path(tmp) / f"seed{seed}"), params)
                   for seed in seeds]
        return [f.result() for f in futures]


def config_spread(asha: Path) -> tuple[list[float] | None, dict | None]:
    """The best Dice of each completed configuration of the ASHA benchmark's study without early stopping, and
    where they came from; (None, None) without that results file."""
    if not asha.exists():
        return None, None
    full = json.loads(asha.read_text())
    trials = full["studies"]["no_early_stopping"]["trials"]
    return ([t["best_dice"] for t in trials if t["status"] == "completed"],
            {"file": common.repo_relative(asha), "date": full.get("date")})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default=str(common.REPO / "search_spaces" / "default.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--parallel", type=int, default=2, help="seeds trained at once, one torch thread each")
    common.add_set_arg(parser, "dotted config keys changed in every seed, as a trial's parameters "
                        "(e.g. training.ema_decay=0.99)")
    parser.add_argument("--asha-results", default=str(common.RESULTS / "asha_vs_full.json"))
    common.add_out_arg(parser, "seed_spread.json")
    args = parser.parse_args()
    space_path = Path(args.space).resolve()
    from medseg.errors import ConfigError

    try:
        params = common.parse_sets(args.sets)
    except ConfigError as err:
        parser.error(str(err))
    os.chdir(common.REPO)
    from medseg.search_space import load_space
    from medseg.training import prepare_data
    from medseg.tuning import trial_config

    common.ensure_synthetic_task()
    # the cache and the split once, before the workers
    prepare_data(trial_config(params, load_space(space_path)), progress=False)
    clock = common.RunClock()
    runs = train_seeds(space_path, args.seeds, params, args.parallel)
    for r in runs:
        print(f"seed {r['seed']}: best val Dice {r['best_dice']:.4f} at epoch {r['best_epoch']} ({r['seconds']:.0f} s)")
    config_best, source = config_spread(Path(args.asha_results))
    report = {"runs": runs, "params": params, "summary": summarize(runs, config_best), "config_spread_source": source,
              "space": common.repo_relative(space_path),
              "machine": common.machine_info(("torch", "segmentation-models-pytorch")),
              "parallel": args.parallel, **clock.record()}
    common.write_results(common.out_path(args, "seed_spread"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
