#!/usr/bin/env python
"""Evaluate a checkpoint on a split, or score a predictions folder, or rank both on a leaderboard.

  python eval.py --ckpt runs/.../best.pt [--split val] [--tta]       # with the checkpoint's own stored config
  python eval.py --config configs/exp_000_baseline.yaml --ckpt runs/.../best.pt
  python eval.py --predictions DATA/Task.../Predictions/<method>      # Kaggle layout: the task's GroundTruth/
  python eval.py --predictions preds/ --data DATA/Task...             # elsewhere: against this dataset folder
  python eval.py --config CONFIG --ckpt CKPT --leaderboard            # our model among the dataset's reference methods
  python eval.py --ckpt CKPT --robustness                             # + the robustness set (robustness.json)
"""
import argparse

from medseg.cli import add_config_args, run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, required=False)
    parser.add_argument("--data", help="dataset folder to score --predictions against, without --config (a Kaggle "
                        "task folder, an MSD / nnU-Net folder or a 2D images/ + masks/ folder); default: the task "
                        "folder of <task>/Predictions/<method>")
    parser.add_argument("--ckpt", help="checkpoint to evaluate (best.pt or models/champion/checkpoint.pt); without "
                        "--config, with the config stored in it")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"],
                        help="split of the saved splits.json")
    parser.add_argument("--tta", action="store_true", help="test-time mirroring along the axes the training "
                        "augmentation flipped (the checkpoint's tta_axes; trained without flips: a warning, no TTA)")
    parser.add_argument("--no-postprocessing", action="store_true", help="score without the post-processing the "
                        "checkpoint carries (chosen on validation after training)")
    parser.add_argument("--predictions", help="score this predictions folder (evalseg .pkl[.gz], NIfTI or PNG masks)")
    parser.add_argument("--missing-as-empty", action="store_true",
                        help="score cases without a prediction file as empty")
    parser.add_argument("--leaderboard", action="store_true",
                        help="rank --ckpt among the task's Predictions/<method> folders")
    parser.add_argument("--allow-split-mismatch", action="store_true",
                        help="score a checkpoint on a split it was not trained with")
    parser.add_argument("--out", help="output folder (default: <checkpoint folder>/eval-<split>, "
                        "./eval/<version>-<split> for a registered model, ./eval-<method> for --predictions)")
    parser.add_argument("--robustness", action="store_true", help="also score --ckpt under fixed-seed perturbations "
                        "(noise, blur, contrast, brightness, down-upsampling, CT window shift): robustness.json in the "
                        "output folder, metrics robust/* on the eval run")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    args = parser.parse_args()
    if not (args.ckpt or args.predictions):
        parser.error("give --ckpt and/or --predictions")
    if args.robustness and not args.ckpt:
        parser.error("--robustness needs --ckpt")

    from medseg.evaluation import eval_config, run_eval_cli

    cfg = eval_config(config=args.config, overrides=args.overrides, ckpt=args.ckpt, predictions=args.predictions,
                      data=args.data)
    print(run_eval_cli(cfg, ckpt=args.ckpt, predictions=args.predictions, split=args.split, flip_tta=args.tta,
                       allow_split_mismatch=args.allow_split_mismatch, missing_as_empty=args.missing_as_empty,
                       with_leaderboard=args.leaderboard, out=args.out, mlflow=not args.no_mlflow,
                       postprocess=not args.no_postprocessing, robustness=args.robustness))
    return 0


if __name__ == "__main__":
    run_cli(main)
