"""Machine description shared by the benchmarks (results are only comparable on the same machine)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def versions(packages: tuple[str, ...]) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info(packages: tuple[str, ...]) -> dict:
    return {"cpu_count": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(), **versions(packages)}
