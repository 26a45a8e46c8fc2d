#!/usr/bin/env python
"""Evaluate a checkpoint on a split, or score a predictions folder, or rank both on a leaderboard.

  python eval.py --config configs/exp_000_baseline.yaml --ckpt runs/.../best.pt [--split val] [--tta]
  python eval.py --config CONFIG --predictions DATA/Task.../Predictions/<method>
  python eval.py --config CONFIG --ckpt CKPT --leaderboard        # our model among the dataset's reference methods
"""
import argparse

from medseg.cli import add_config_args, run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--ckpt", help="checkpoint to evaluate (best.pt or models/champion/checkpoint.pt)")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"], help="split of the saved splits.json")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    parser.add_argument("--predictions", help="score this predictions folder (evalseg .pkl[.gz], NIfTI or PNG masks)")
    parser.add_argument("--missing-as-empty", action="store_true", help="score cases without a prediction file as empty")
    parser.add_argument("--leaderboard", action="store_true", help="rank --ckpt among the task's Predictions/<method> folders")
    parser.add_argument("--allow-split-mismatch", action="store_true", help="score a checkpoint on a split it was not trained with")
    parser.add_argument("--out", help="output folder (default: <checkpoint folder>/eval-<split>, ./eval/<version>-<split> for a "
                        "registered model, ./eval-<method> for --predictions)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    args = parser.parse_args()
    if not (args.ckpt or args.predictions):
        parser.error("give --ckpt and/or --predictions")

    from medseg.config import load_config
    from medseg.evaluation import run_eval_cli

    cfg = load_config(args.config, args.overrides)
    print(run_eval_cli(cfg, args))
    return 0


if __name__ == "__main__":
    run_cli(main)
