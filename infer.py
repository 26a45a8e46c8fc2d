#!/usr/bin/env python
"""Segment a NIfTI volume, a Kaggle task case, an image, or a folder with a checkpoint.

  python infer.py --ckpt models/champion/checkpoint.pt --input volume.nii.gz --out predictions/
  python infer.py --ckpt CKPT --input data/synthetic/Task900_SynthLiverTumor --case 003 --out predictions/
"""
import argparse
import json

from medseg.cli import run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="medseg checkpoint (carries its config and preprocessing)")
    parser.add_argument("--input", required=True,
                        help="NIfTI file, image file, folder of either, or a Kaggle task folder")
    parser.add_argument("--case", action="append", help="case id of a Kaggle task (repeatable; default: every case)")
    parser.add_argument("--out", required=True, help="output folder for masks and overlays/")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")
    parser.add_argument("--tta", action="store_true", help="test-time mirroring along the axes the training "
                        "augmentation flipped (the checkpoint's tta_axes; trained without flips: a warning, no TTA)")
    parser.add_argument("--no-postprocessing", action="store_true",
                        help="without the post-processing the checkpoint carries")
    parser.add_argument("--no-overlays", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    args = parser.parse_args()

    from medseg.inference import run_inference

    records = run_inference(args.ckpt, args.input, args.out, case_ids=args.case, batch_size=args.batch_size,
                            flip_tta=args.tta, overlays=not args.no_overlays, device=args.device,
                            postprocess=not args.no_postprocessing)
    for record in records:
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    run_cli(main)
