#!/usr/bin/env python
"""Train one model from a config and track it in MLflow: python train.py --config configs/exp_000_baseline.yaml"""
import argparse

from medseg.cli import add_config_args, run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_args(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()

    from medseg.config import load_config
    from medseg.tracking import get_client, tracking_uri, train_tracked, ui_command, ui_url

    cfg = load_config(args.config, args.overrides)
    result, run_id = train_tracked(cfg, progress=not args.quiet)
    best = result.best_metrics
    print(f"run {run_id}: best epoch {result.best_epoch}/{len(result.history)} ({result.stop_reason}), "
          f"val/dice {best['val/dice']:.4f}, val/iou {best['val/iou']:.4f} "
          f"(train/dice {best['train/dice']:.4f}, train/iou {best['train/iou']:.4f})")
    print(f"checkpoint: {result.best_checkpoint}")
    experiment_id = get_client(tracking_uri(cfg)).get_run(run_id).info.experiment_id
    uri = tracking_uri(cfg)
    print(f"tracking:   {uri}  ({ui_command(uri)}, then {ui_url(experiment_id, uri=uri)})")
    return 0


if __name__ == "__main__":
    run_cli(main)
