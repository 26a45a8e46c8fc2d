#!/usr/bin/env python
"""Training precision: what ``training.precision: auto`` (with ``channels_last``) gives this CPU, in speed and Dice.

    python benchmarks/bench_precision.py            # throughput: 3 runs x 4 epochs per precision; Dice: 4 seeds each
    python benchmarks/bench_precision.py --quick    # 2 runs x 3 epochs; 2 seeds each, 2 epochs: a smoke run

1. Speed (``bench_train.py``'s measurement: trainer and bare epochs interleaved in fresh processes, same model,
   batch, cached slices and threads), the trainer with ``training.precision: auto`` and with ``fp32`` (both
   channels_last, the default), each against the naive float32 bare loop (contiguous NCHW, no autocast): what a
   plain PyTorch loop gets from this CPU. Targets: auto >= 1.5x where the CPU has bf16 instructions (AVX-512 BF16 or
   AMX: auto is bf16 there), >= 0.97x where it has not (auto is fp32 there); fp32 >= 0.97x.
2. Dice: the default search space's base trial (``bench_seed_spread.train_seed``: one torch thread, as a study
   trial), seeds 0-3, in fp32 and in bf16, two at a time. Target: the bf16 mean of the best validation Dice within
   the fp32 seeds' range of the fp32 mean (bf16 changes no more than the seed does).

Writes benchmarks/results/precision.json (precision_quick.json with --quick; --out to choose).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from benchmarks import bench_seed_spread, bench_train, common

SEEDS = (0, 1, 2, 3)


def speed(args: argparse.Namespace) -> dict:
    """The trainer in auto and in fp32 against the naive float32 bare loop: bench_train's figures and targets."""
    out = {}
    for precision in ("auto", "fp32"):
        train_args = argparse.Namespace(config=bench_train.BASE_CONFIG, epochs=3 if args.quick else 4,
                                        quick=args.quick, samples=48 if args.quick else 64, threads=None, bare="fp32",
                                        repeats=2 if args.quick else 3, profile=False, sets=[])
        base = bench_train.base_job(train_args, {"training.precision": precision})
        print(f"speed, training.precision {precision}:", flush=True)
        measured = bench_train.measure_all(base, data=args.data, repeats=train_args.repeats, profile=False)
        f = bench_train.figures(measured)
        name, target = bench_train.ratio_target(f["precision"])  # fp32 trainer: the >= 0.97 target
        out[precision] = {"precision": f["precision"], "trainer_images_per_s": round(f["trainer_ips"], 2),
                          "bare_fp32_images_per_s": round(f["bare_ips"], 2),
                          "ratio": round(f["ratio"], 3), "ratio_fastest_step": round(f["robust_ratio"], 3),
                          "pair_ratios": [round(p, 3) for p in f["pair_ratios"]],
                          "target": {"name": name, "target": f">= {target}", "met": f["ratio"] >= target},
                          "loss_gap_against_fp32_bare": f["loss_gap"], "busy": f["busy"]}
        print(f"  trainer {f['trainer_ips']:.1f} against bare fp32 {f['bare_ips']:.1f} images/s: {f['ratio']:.3f} "
              f"(target >= {target}) [{f['precision']['trainer']}]", flush=True)
    return out


def dice(args: argparse.Namespace) -> dict:
    """Best validation Dice of the default space's base trial over seeds, in fp32 and in bf16."""
    from medseg.search_space import load_space
    from medseg.training import prepare_data
    from medseg.tuning import trial_config

    space = common.REPO / "search_spaces" / "default.yaml"
    seeds = list(SEEDS[:2] if args.quick else SEEDS)
    common.ensure_synthetic_task()
    out: dict = {"space": common.repo_relative(space), "seeds": seeds}
    for precision in ("fp32", "bf16"):
        params = {"training.precision": precision, **({"training.epochs": 2} if args.quick else {})}
        prepare_data(trial_config(params, load_space(space)), progress=False)  # cache and split once
        runs = bench_seed_spread.train_seeds(space, seeds, params, parallel=2)
        for r in runs:
            print(f"  {precision} seed {r['seed']}: best val Dice {r['best_dice']:.4f} at epoch {r['best_epoch']} "
                  f"({r['seconds']:.0f} s)", flush=True)
        out[precision] = {"runs": runs, "summary": bench_seed_spread.summarize(runs, None),
                          "seconds_per_run": statistics.median(r["seconds"] for r in runs)}
    fp32, bf16 = out["fp32"]["summary"], out["bf16"]["summary"]
    gap = bf16["best_dice_mean"] - fp32["best_dice_mean"]
    out["target"] = {"bf16_mean_minus_fp32_mean": round(gap, 4), "fp32_seed_range": round(fp32["best_dice_range"], 4),
                     "target": "|bf16 mean - fp32 mean| <= fp32 seed range",
                     "met": abs(gap) <= fp32["best_dice_range"],
                     "training_time_bf16_over_fp32": round(out["bf16"]["seconds_per_run"]
                                                           / out["fp32"]["seconds_per_run"], 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", type=Path, help="bench_train's synthetic task folder, reused when present")
    parser.add_argument("--skip-dice", action="store_true", help="the speed part only")
    common.add_out_arg(parser, "precision[_quick].json")
    args = parser.parse_args(argv)
    os.chdir(common.REPO)
    from medseg.models import cpu_native_bf16

    clock = common.RunClock()
    results = {"benchmark": "precision", "machine": common.machine_info(("torch", "segmentation-models-pytorch")),
               "cpu_native_bf16": cpu_native_bf16(), "quick": args.quick, "speed": speed(args)}
    if not args.skip_dice:
        results["dice"] = dice(args)
    results |= clock.record()
    out = common.out_path(args, f"precision{'_quick' if args.quick else ''}")
    common.write_json(out, results)
    s = results["speed"]
    print(f"auto: {s['auto']['ratio']:.3f}x the float32 bare loop ({s['auto']['precision']['trainer']}), "
          f"fp32: {s['fp32']['ratio']:.3f}x; CPU bf16 instructions: {results['cpu_native_bf16']}")
    if "dice" in results:
        t = results["dice"]["target"]
        print(f"Dice bf16 - fp32 (means over seeds): {t['bf16_mean_minus_fp32_mean']:+.4f}, fp32 seed range "
              f"{t['fp32_seed_range']:.4f}: {'met' if t['met'] else 'MISSED'}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
