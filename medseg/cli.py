"""Shared command-line plumbing: --config/--set parsing, and one exit-code contract for every entry point.

train.py, eval.py, infer.py, tune.py, ``python -m medseg.data {check,inspect}``, ``python -m medseg.data.synthetic``,
``python -m medseg.report`` and ``python -m medseg.export`` run their ``main`` through ``run_cli``, which prints an
error as one ``error: ...`` line (no traceback) and exits with:

  0    done
  1    the job failed (``EXIT_FAILED``): any MedsegError not named below (bad data, a checkpoint, a non-finite loss,
       ...); for ``python -m medseg.data check`` and ``tune.py --improve``: the audit ran and found hard data errors
       (``EXIT_DATA_ERRORS``), which its report lists
  2    usage or configuration error (``EXIT_USAGE``): argparse's own errors, ConfigError and UsageError
  75   ``tune.py --improve`` only: another improve run of the space holds its lock (``EXIT_LOCKED``, sysexits'
       EX_TEMPFAIL: try later)
  130  interrupted: Ctrl-C, or RunInterrupted (a study Ray Tune saved on Ctrl-C); 143 terminated: SIGTERM. The MLflow
       runs they stopped end KILLED, a study can be resumed.

The audit's verdict shares 1 with a failed job on purpose: a DataError that stops train.py and a hard error the audit
lists mean the same to a caller (fix the data), linters exit 1 on findings and 2 on misuse in the same way, and the
audit itself never fails on data (every DataError becomes a line of its report), so for it 1 is only the verdict.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Callable

from medseg.errors import ConfigError, MedsegError, RunInterrupted

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_DATA_ERRORS = EXIT_FAILED
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_LOCKED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd command
EXIT_TERMINATED = 143  # 128 + SIGTERM


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, e.g. --set training.lr=3e-4 (repeatable)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a scheduler's preemption, ``docker stop``), handled like Ctrl-C: MLflow runs
    end KILLED, a study can be resumed."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"signal {signum}")


def exit_code(err: BaseException) -> int:
    """The exit code of an entry point stopped by ``err`` (module doc); ``err`` is a MedsegError or a Ctrl-C."""
    if isinstance(err, Terminated):
        return EXIT_TERMINATED
    if isinstance(err, (KeyboardInterrupt, RunInterrupted)):
        return EXIT_INTERRUPTED
    return EXIT_USAGE if isinstance(err, ConfigError) else EXIT_FAILED


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main`` (which parses ``sys.argv`` itself) and exit with its return value, or with the code of the
    MedsegError, Ctrl-C or SIGTERM that stopped it (module doc) after one line on stderr."""
    logging.basicConfig(level=os.environ.get("MEDSEG_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = main()
    except (MedsegError, KeyboardInterrupt) as err:
        if isinstance(err, MedsegError):
            print(f"error: {err}", file=sys.stderr)
        else:
            print("terminated" if isinstance(err, Terminated) else "interrupted", file=sys.stderr)
        sys.exit(exit_code(err))
    sys.exit(code or 0)
