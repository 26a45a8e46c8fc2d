"""What machine a figure came from: trained Dice differs across CPU models (floating-point kernels differ), so every
run is tagged with it and every benchmark records it."""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def host_description() -> str:
    """One line: CPU model, cores this process may use, and the accelerator torch sees, e.g. 'AMD EPYC, 2 cores,
    CPU only'."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{cpu_model()}, {cores} cores, {gpu}, torch {torch.__version__}"
