"""Synthetic twin of Kaggle "Medical Image Segmentation" Task001 (liver tumour): phantom abdominal CT, evalseg layout.

The command line, ``python -m medseg.data.synthetic``. ``__main__`` runs ``main`` through ``medseg.cli.run_cli``:
an error is one line on stderr; a bad argument (argparse, or a ConfigError from ``build_task``) and an occupied
task folder without ``--force`` (UsageError) exit 2, any other MedsegError 1.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from medseg.data.synthetic.methods import METHODS
from medseg.data.synthetic.writer import DEFAULT_METHODS, DEFAULT_TASK_NAME, build_task


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the task and print a one-line summary; returns 0. A MedsegError propagates to ``run_cli``."""
    parser = argparse.ArgumentParser(prog="python -m medseg.data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/synthetic", help="folder to hold the task folder (default %(default)s)")
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--size", type=int, default=128, help="in-plane voxels per side")
    parser.add_argument("--slices", type=int, nargs=2, default=(24, 48), metavar=("MIN", "MAX"),
                        help="slice count drawn per case in [MIN, MAX]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task-name", default=DEFAULT_TASK_NAME)
    parser.add_argument("--methods", nargs="+", default=[",".join(DEFAULT_METHODS)],
                        help=f"reference methods, comma- or space-separated, from {sorted(METHODS)}")
    parser.add_argument("--force", action="store_true", help="replace an existing task folder")
    args = parser.parse_args(argv)
    methods = [m for item in args.methods for m in item.split(",") if m]
    summary = build_task(args.out, cases=args.cases, size=args.size, slices=tuple(args.slices), seed=args.seed,
                         task_name=args.task_name, methods=methods, force=args.force)
    print(summary.line())
    return 0
