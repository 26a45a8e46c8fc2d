#!/usr/bin/env python
"""Real data: CVC-ClinicDB trained by medseg against a bare smp loop, same split, model and wall time, in one run.

    python benchmarks/bench_cvc.py [--config configs/cvc_clinicdb.yaml] [--set training.epochs=8] [--quick]
    python benchmarks/bench_cvc.py --set dataset.channels=rgb --out benchmarks/results/cvc_clinicdb_rgb.json

medseg: ``fit()`` on the config (augmentation, cosine schedule, best epoch by validation Dice, post-processing chosen on
validation), as ``train.py`` runs it without MLflow. Bare: the same network (``build_model`` of the same config, same
seed), plain AdamW at the config's learning rate, BCE + Dice from ``smp.losses``, every training frame once per epoch
in a shuffled order, no augmentation, no schedule, no model selection (its last weights), in float32 and contiguous
NCHW (medseg: its ``training.precision`` and channels_last), trained for the wall time medseg's whole ``fit()`` took
(its validation passes included). Both read the same cached frames (same grey levels or colours, same 128-px resize;
in colour both standardise them with the training frames' channel statistics) and are scored by the same code,
``evaluate_checkpoint``: the mean over frames of per-image Dice and IoU at the original 256-px resolution (the
convention of the polyp papers), on the validation sequences and on the test sequences, which neither run chose
anything on. Target: medseg's validation Dice / bare's >= 1.0.

For scale, under another protocol (GPU, ImageNet weights, trained on 1,450 Kvasir-SEG + CVC-ClinicDB frames), a
U-Net reaches mDice 0.823 on CVC-ClinicDB test frames (PraNet, MICCAI 2020, Table 1). Here: no pretrained weights,
grey frames, 413 training frames, a CPU budget of minutes.

--quick: 1 epoch of 32 frames (a check that the script runs; numbers mean nothing). The data must be in
``../shared/data/cvc-clinicdb`` (research and education use only: it is never copied into the repository).
Writes benchmarks/results/cvc_clinicdb.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

QUICK = {"training.epochs": 1, "training.samples_per_epoch": 32}
TARGET = 1.0


def bare_loop(cfg, data, *, seconds: float, out: Path) -> dict:
    """Train the config's network the plain way for ``seconds`` of wall time; save it as a medseg checkpoint (so the
    same eval code scores it) and return what it did."""
    import numpy as np
    import torch
    from segmentation_models_pytorch import losses as L

    from medseg.checkpoint import save_checkpoint
    from medseg.data.dataset import label_lut
    from medseg.models import build_model
    from medseg.training import checkpoint_meta_base, seed_everything

    t = cfg.training
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed, 0)
    lut = label_lut(data.labels)
    frames = [(np.asarray(data.cache.image(c), np.float32), lut[np.asarray(data.cache.label(c))])
              for c in data.split.train]
    images = np.concatenate([f[0] for f in frames])  # one slice per frame: grey (N, S, S), colour (N, 3, S, S)
    x = torch.from_numpy(images if images.ndim == 4 else images[:, None])  # (N, C, S, S)
    y = torch.from_numpy(np.concatenate([f[1] for f in frames]).astype(np.float32))[:, None]
    # the same network: in colour, medseg's input standardisation from the training frames' channel statistics
    model = build_model(cfg.model, in_channels=data.in_channels, classes=1, channel_stats=data.channel_stats)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    dice = L.DiceLoss(L.BINARY_MODE, from_logits=True)
    bce = torch.nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(t.seed)
    started, steps, epochs = time.perf_counter(), 0, 0
    model.train()
    while time.perf_counter() - started < seconds:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(order), t.batch_size):
            batch = order[start:start + t.batch_size]
            logits = model(x[batch])
            loss = 0.5 * bce(logits, y[batch]) + 0.5 * dice(logits, y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if time.perf_counter() - started >= seconds:
                break
        epochs += 1
    trained = time.perf_counter() - started
    meta = checkpoint_meta_base(cfg, data, 1, {"epoch": epochs, "metrics": {}, "trainer": "bare smp loop"})
    save_checkpoint(out, model, meta)
    return {"seconds": round(trained, 1), "steps": steps, "epochs_started": epochs, "frames_seen": steps * t.batch_size,
            "train_frames": len(x)}


def _scores(ckpt: Path, cfg, data) -> dict:
    from medseg.evaluation import evaluate_checkpoint

    out = {}
    for split in ("val", "test"):
        s = evaluate_checkpoint(ckpt, cfg, split=split, data=data, progress=False).summary
        out[split] = {"dice": round(s["dice"], 4), "iou": round(s["iou"], 4), "frames": s["n_cases"]}
    return out


def run(config: Path, sets: dict, work: Path) -> dict:
    from medseg.config import load_config
    from medseg.training import fit, prepare_data

    cfg = load_config(config, sets)
    data = prepare_data(cfg, progress=False)
    groups = {side: len({data.split.groups.get(c, c) for c in data.split.cases(side)})
              for side in ("train", "val", "test")}
    started = time.perf_counter()
    result = fit(cfg, run_dir=work / "medseg", progress=False)
    medseg_seconds = time.perf_counter() - started
    medseg = {"seconds": round(medseg_seconds, 1), "best_epoch": result.best_epoch, "epochs": cfg.training.epochs,
              **_scores(result.best_checkpoint, cfg, data)}
    print(f"medseg: {medseg}", flush=True)
    bare = bare_loop(cfg, data, seconds=medseg_seconds, out=work / "bare" / "best.pt")
    bare.update(_scores(work / "bare" / "best.pt", cfg, data))
    print(f"bare:   {bare}", flush=True)
    ratio = medseg["val"]["dice"] / bare["val"]["dice"] if bare["val"]["dice"] else None
    return {
        "summary": {"medseg_val_dice": medseg["val"]["dice"], "medseg_val_iou": medseg["val"]["iou"],
                    "bare_val_dice": bare["val"]["dice"], "bare_val_iou": bare["val"]["iou"],
                    "val_dice_ratio": round(ratio, 3) if ratio is not None else None, "target": TARGET,
                    "met": ratio is not None and ratio >= TARGET,
                    "medseg_test_dice": medseg["test"]["dice"], "bare_test_dice": bare["test"]["dice"],
                    "wall_time_s": medseg["seconds"]},
        "medseg": medseg, "bare": bare,
        "split": {side: {"frames": len(data.split.cases(side)), "sequences": groups[side]}
                  for side in ("train", "val", "test")},
        "split_hash": data.split.hash,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", default=str(common.REPO / "configs" / "cvc_clinicdb.yaml"))
    parser.add_argument("--quick", action="store_true", help="1 epoch of 32 frames: a check that it runs")
    common.add_set_arg(parser, "config keys, e.g. training.epochs=8")
    common.add_out_arg(parser, "cvc_clinicdb.json")
    args = parser.parse_args(argv)
    sets = {**(QUICK if args.quick else {}), **common.parse_sets(args.sets)}
    config = Path(args.config).resolve()
    os.chdir(common.REPO)  # the config names the data relative to the repository root
    if not (common.REPO.parent / "shared" / "data" / "cvc-clinicdb").is_dir():
        print("bench_cvc: ../shared/data/cvc-clinicdb is absent; nothing measured", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="medseg-bench-cvc-") as tmp:
        sets.setdefault("dataset.cache_dir", str(common.REPO / "cache"))
        report = run(config, sets, Path(tmp))
    import torch

    report.update(config=common.repo_relative(config), sets=sets, quick=args.quick,
                  reference="PraNet (MICCAI 2020) Table 1: U-Net mDice 0.823 on CVC-ClinicDB test frames, trained on "
                            "a GPU with ImageNet weights on 1,450 Kvasir-SEG + CVC-ClinicDB frames (another protocol)",
                  machine=common.machine_info(("torch", "segmentation-models-pytorch"),
                                              torch_threads=torch.get_num_threads()))
    common.write_results(common.out_path(args, "cvc_clinicdb"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
