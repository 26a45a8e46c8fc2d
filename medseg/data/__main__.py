"""``python -m medseg.data SUBCOMMAND ...``: data tools. Each subcommand is a module with ``main(argv) -> int``
that parses its own arguments; it is imported only when run. Adding one is one entry in ``SUBCOMMANDS``.
Exit codes: ``medseg.cli`` (``check``: 1 when the audit found hard data errors)."""
from __future__ import annotations

import argparse
import importlib

from medseg.cli import run_cli

# name -> (module holding main(argv) -> int, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("medseg.data.inspect", "shape, voxel size, label counts and sha256 of label files"),
    "check": ("medseg.data.check", "audit a config's dataset: load errors, spacing, leakage, split balance, "
                                   "cache size and build time (--estimate: those alone)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medseg.data",
        description="Data tools.",
        epilog="\n".join(f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="subcommand (its --help lists its options)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.main(args.args) or 0)


if __name__ == "__main__":
    run_cli(main)
