"""Machine description shared by the benchmarks (results are only comparable on the same machine)."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks run as scripts, beside the package
from medseg.machine import cpu_model  # noqa: E402,F401  (re-exported: the benchmarks import it from here)


def versions(packages: tuple[str, ...]) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def machine_info(packages: tuple[str, ...]) -> dict:
    return {"cpu_count": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(), **versions(packages)}


def write_results(path: str | Path, report: dict) -> None:
    """Write a benchmark's JSON (folders created) and print its summary and where it went."""
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    print(f"written: {path}")
