"""Shared command-line plumbing: --config/--set parsing and one-line errors instead of tracebacks."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Callable

from medseg.errors import MedsegError


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, e.g. --set training.lr=3e-4 (repeatable)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a scheduler's preemption, ``docker stop``), handled like Ctrl-C: MLflow runs
    end KILLED, a study can be resumed."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"signal {signum}")


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main``; a MedsegError (bad config, data or checkpoint) prints one line and exits 2; Ctrl-C or SIGTERM
    exit 130 / 143 after the runs they interrupted were closed."""
    logging.basicConfig(level=os.environ.get("MEDSEG_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = main()
    except MedsegError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
