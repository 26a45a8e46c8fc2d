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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import machine_info, write_results  # noqa: E402  (benchmarks/machine.py)


def train_seed(space_path: str, seed: int, run_dir: str, params: dict | None = None) -> dict:
    """One seed of the space's base configuration; returns its validation Dice curve."""
    os.chdir(ROOT)  # the space's relative paths (data/synthetic, cache/) are the project's own
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


def parse_sets(items: list[str]) -> dict:
    """["training.ema_decay=0.99", "loss.name=tversky"] -> {"training.ema_decay": 0.99, "loss.name": "tversky"},
    parsed as train.py parses its --set values."""
    from medseg.config import parse_override

    return dict(parse_override(item) for item in items)


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "default.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--parallel", type=int, default=2, help="seeds trained at once, one torch thread each")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="dotted config keys changed in every seed, as a trial's parameters (e.g. training.ema_decay=0.99)")
    parser.add_argument("--asha-results", default=str(ROOT / "benchmarks" / "results" / "asha_vs_full.json"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "seed_spread.json"))
    args = parser.parse_args()
    space_path = Path(args.space).resolve()
    from medseg.errors import ConfigError

    try:
        params = parse_sets(args.set)
    except ConfigError as err:
        parser.error(str(err))
    os.chdir(ROOT)
    from medseg.search_space import load_space
    from medseg.training import prepare_data
    from medseg.tuning import trial_config

    if not (ROOT / "data" / "synthetic" / "Task900_SynthLiverTumor" / "metadata.json").exists():
        from medseg.data.synthetic import generate_task

        generate_task(ROOT / "data" / "synthetic")
    prepare_data(trial_config(params, load_space(space_path)), progress=False)  # cache and split once, before the workers
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-seeds-") as tmp, ProcessPoolExecutor(
            max_workers=args.parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_seed, str(space_path), seed, str(Path(tmp) / f"seed{seed}"), params) for seed in args.seeds]
        runs = [f.result() for f in futures]
    for r in runs:
        print(f"seed {r['seed']}: best val Dice {r['best_dice']:.4f} at epoch {r['best_epoch']} ({r['seconds']:.0f} s)")

    config_best, source = None, None
    asha = Path(args.asha_results)
    if asha.exists():
        full = json.loads(asha.read_text())
        trials = full["studies"]["no_early_stopping"]["trials"]
        config_best = [t["best_dice"] for t in trials if t["status"] == "completed"]
        source = {"file": str(asha.relative_to(ROOT)) if asha.is_relative_to(ROOT) else str(asha), "date": full.get("date")}
    report = {"runs": runs, "params": params, "summary": summarize(runs, config_best), "config_spread_source": source,
              "space": str(space_path.relative_to(ROOT)) if space_path.is_relative_to(ROOT) else str(space_path),
              "machine": machine_info(("torch", "segmentation-models-pytorch")), "parallel": args.parallel,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "total_seconds": round(time.perf_counter() - started, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
