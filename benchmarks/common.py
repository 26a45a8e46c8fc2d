"""What the benchmarks share: the machine description, the results JSON, child processes, wall time and load, and the
--out / --set arguments. Results are only comparable on the same machine: every results file records it."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from medseg.machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SYNTHETIC_TASK = REPO / "data" / "synthetic" / "Task900_SynthLiverTumor"  # the embedded dataset (`make data`)
CHILD = "child"  # `python benchmarks/bench_x.py child JOB_JSON`: one measurement in a fresh interpreter


# ------------------------------------------------------------------------------------------ machine and results


def versions(packages: tuple[str, ...]) -> dict:
    """Python's version and each installed package's (the ones not installed left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def machine_info(packages: tuple[str, ...], **extra) -> dict:
    """CPU count and model, platform, ``extra`` (e.g. torch threads), then the versions of Python and ``packages``."""
    return {"cpu_count": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(), **extra,
            **versions(packages)}


def write_json(path: str | Path, report: dict) -> None:
    """A benchmark's results JSON, folders created."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def write_results(path: str | Path, report: dict) -> None:
    """Write a benchmark's JSON and print its summary and where it went."""
    write_json(path, report)
    print(json.dumps(report["summary"], indent=2))
    print(f"written: {path}")


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when inside it (as results files name spaces and configs), else as is."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


class RunClock:
    """Wall time and load averages of a whole benchmark run, from its creation."""

    def __init__(self) -> None:
        self.load_before = os.getloadavg()
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 1)

    def record(self) -> dict:
        """load_average_before / _after (1, 5 and 15 min), total_seconds and date: the last keys of a results file."""
        return {"load_average_before": self.load_before, "load_average_after": os.getloadavg(),
                "total_seconds": self.seconds(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# ------------------------------------------------------------------------------------------------ child processes


@dataclass
class ChildRun:
    result: dict  # the JSON object the child printed last
    stderr: str
    wall_s: float  # with interpreter start and imports
    loadavg_1min: list[float]  # before and after, rounded


def run_child(script: str | Path, job: dict, *, what: str, cwd: Path | None = None,
              stderr_tail: int = 3000) -> ChildRun:
    """One job of a benchmark script in a fresh interpreter (its own peak memory, imports and torch state). A failed
    child ends the benchmark with ``what`` and the tail of its stderr."""
    cmd = [sys.executable, str(Path(script).resolve()), CHILD, json.dumps(job)]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{what} failed (exit {done.returncode}): {done.stderr.strip()[-stderr_tail:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return ChildRun(result, done.stderr, wall_s, [round(load_before, 2), round(os.getloadavg()[0], 2)])


def child_job(argv: list[str] | None = None) -> dict | None:
    """The job a parent gave this process (``bench_x.py child JOB_JSON``), or None when it is the parent."""
    argv = sys.argv[1:] if argv is None else argv
    return json.loads(argv[1]) if len(argv) == 2 and argv[0] == CHILD else None


def run_profiled(fn, *args, sort: str = "tottime", lines: int = 30, **kwargs):
    """``fn(*args, **kwargs)`` under cProfile; the top ``lines`` functions by ``sort`` go to stderr (which a parent
    keeps as the child's profile)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    result = profiler.runcall(fn, *args, **kwargs)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats(sort).print_stats(lines)
    print(text.getvalue(), file=sys.stderr)
    return result


def print_child_result(result: dict) -> int:
    """A child's answer: one JSON line, the last of its stdout."""
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------- arguments and data


def add_out_arg(parser: argparse.ArgumentParser, default: str) -> None:
    """--out: the results JSON (``out_path`` gives the default)."""
    parser.add_argument("--out", type=Path, help=f"results JSON (default benchmarks/results/{default})")


def out_path(args: argparse.Namespace, name: str) -> Path:
    """--out, or benchmarks/results/<name>.json."""
    return args.out or RESULTS / f"{name}.json"


def add_set_arg(parser: argparse.ArgumentParser, help_text: str) -> None:
    """--set KEY=VALUE ...: several values after one --set, and --set repeated, all kept (in ``args.sets``)."""
    parser.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help=help_text)


def parse_sets(items: list[str]) -> dict:
    """["training.ema_decay=0.99", "loss.name=tversky"] -> {"training.ema_decay": 0.99, "loss.name": "tversky"},
    parsed as train.py parses its --set values (ConfigError naming a malformed one)."""
    from medseg.config import parse_override

    return dict(parse_override(item) for item in items)


def study_work_overrides(work: Path) -> list[str]:
    """Search-space overrides that keep a benchmark's studies in ``work``: their own Ray storage, MLflow store and
    reports (the registry untouched)."""
    return [f"storage_path={work / 'ray'}", f"tracking_uri=sqlite:///{work / 'mlflow.db'}",
            f"reports_dir={work / 'reports'}"]


def ensure_synthetic_task() -> Path:
    """The embedded dataset, generated as `make data` does when data/synthetic lacks it."""
    if not (SYNTHETIC_TASK / "metadata.json").exists():
        from medseg.data.synthetic import generate_task

        generate_task(SYNTHETIC_TASK.parent)
    return SYNTHETIC_TASK
