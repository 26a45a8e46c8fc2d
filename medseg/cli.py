"""Shared command-line plumbing: --config/--set parsing and one-line errors instead of tracebacks."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from medseg.errors import MedsegError


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, e.g. --set training.lr=3e-4 (repeatable)")


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main``; a MedsegError (bad config, data or checkpoint) prints one line and exits 2."""
    logging.basicConfig(level=os.environ.get("MEDSEG_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        code = main()
    except MedsegError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
