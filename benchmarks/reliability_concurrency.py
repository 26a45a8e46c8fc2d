#!/usr/bin/env python
"""Concurrent tracking (issue 14, guarantee 2): train.py processes started together on one fresh embedded sqlite
MLflow store (no ``mlflow.db`` yet, so their first use races on creating its tables), then the store checked against
what each run reports: every metric of every epoch of its ``history.json`` in the run's metric history, no run left
RUNNING, no "database is locked" nor other sqlite error nor traceback on any process's stderr.

Each process imports what train.py needs (torch, MLflow, medseg) first and then waits at a gate (a file), so that all
of them reach the store within milliseconds: without it the imports (seconds, uneven on a loaded machine) spread them
out and the race is hit by chance only. ``run(quick)`` is the concurrent_tracking section of
benchmarks/bench_reliability.py: ``ROUNDS`` rounds of ``PROCESSES`` processes, each round on a new store (one tiny
synthetic task made here for all), each followed by the same gated start with plain MlflowClients (``mlflow_alone``:
what medseg's schema lock prevents); ~5 min on 2 cores shared with another job, ~17 s of CPU a train.py process.

  python benchmarks/reliability_concurrency.py          (prints the section)

Tested by tests/test_concurrent_tracking.py (one round on the session's tiny task, a store held locked, a study
beside train.py runs).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import REPO

PROCESSES, ROUNDS = 4, 3
QUICK_ROUNDS = 1
EXPERIMENT = "concurrent"
# What no process may print: sqlite's lock errors, any other sqlite / SQLAlchemy error, a Python traceback.
FORBIDDEN = ("database is locked", "database table is locked", "OperationalError", "IntegrityError", "Traceback")

# Imports first, then the gate; then the script (train.py, tune.py) itself as ``python SCRIPT ARGS`` would run it.
GATED_TRAIN = r"""
import os, runpy, sys, time
from pathlib import Path
gate, script = Path(sys.argv[1]), sys.argv[2]
import mlflow, torch  # noqa: F401  the slow imports, before the gate
import medseg.tracking, medseg.training  # noqa: F401
if Path(script).name == "tune.py":
    import medseg.search_space, medseg.study  # noqa: F401
Path(f"{gate}.ready-{os.getpid()}").touch()
while not gate.exists():
    time.sleep(0.005)
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


# The same race with MLflow alone (no medseg): each process opens the store with a plain MlflowClient (which creates
# and migrates the tables of a new store on first use), then creates a run and logs a metric.
GATED_MLFLOW_ALONE = r"""
import os, sys, time
from pathlib import Path
gate, uri = Path(sys.argv[1]), sys.argv[2]
from mlflow import MlflowClient
Path(f"{gate}.ready-{os.getpid()}").touch()
while not gate.exists():
    time.sleep(0.005)
client = MlflowClient(tracking_uri=uri)
run = client.create_run("0")
client.log_metric(run.info.run_id, "m", 1.0, step=1)
client.set_terminated(run.info.run_id)
"""


def tiny_config(data_root: Path, cache_dir: Path, work: Path) -> dict[str, Any]:
    """A 1-epoch config of the tiny model (tests/conftest.py's TINY_MODEL) on a tiny synthetic task, tracked in
    ``work/mlflow.db``."""
    return {
        "name": "concurrent",
        "dataset": {"format": "kaggle", "path": str(data_root), "task": "Task900_SynthLiverTumor", "labels": [1],
                    "image_size": 64, "cache_dir": str(cache_dir), "split": {"seed": 0, "val_fraction": 0.25}},
        "model": {"arch": "Unet", "encoder": "tu-mobilenetv3_small_050", "encoder_depth": 3,
                  "decoder_channels": [16, 8, 8]},
        "loss": {"name": "bce_dice"},
        "training": {"epochs": 1, "batch_size": 8, "samples_per_epoch": 16, "fg_oversample": 0.5, "lr": 0.003,
                     "seed": 0, "threads": 1, "val_overlays": 0},
        "output": {"run_dir": str(work / "runs"), "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
                   "experiment": EXPERIMENT},
    }


def child_env() -> dict[str, str]:
    """The children import this checkout's medseg whatever their working folder, one thread each."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}


def start_together(work: Path, config: dict[str, Any], processes: int, *, timeout: float = 600) -> list[dict]:
    """``processes`` gated train.py runs of ``config`` (run names p0, p1, ...) released at once; each one's exit code,
    stdout, stderr and the run id it printed."""
    commands = []
    for i in range(processes):
        path = work / f"p{i}.yaml"
        path.write_text(yaml.safe_dump({**config, "output": {**config["output"], "run_name": f"p{i}"}}))
        commands.append(["-c", GATED_TRAIN, str(work / "gate"), str(REPO / "train.py"), "--config", str(path),
                         "--quiet"])
    return release_together(work, commands, timeout=timeout)


def release_together(work: Path, commands: list[list[str]], *, timeout: float = 600) -> list[dict]:
    """Python processes (``commands``: their arguments) that wait at the gate ``work/gate`` once ready; released
    together when all are; each one's exit code, stdout, stderr and the run id it printed ("run <id>: ...")."""
    gate = work / "gate"
    procs = [subprocess.Popen([sys.executable, *args], cwd=work, env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    processes = len(procs)
    deadline = time.monotonic() + timeout
    while len(list(work.glob("gate.ready-*"))) < processes:
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            break  # a process died before the gate (reported with its stderr below)
        time.sleep(0.05)
    gate.touch()
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        run_id = next((line.split()[1].rstrip(":") for line in stdout.splitlines() if line.startswith("run ")), None)
        out.append({"returncode": proc.returncode, "stdout": stdout, "stderr": stderr, "run_id": run_id})
    return out


def check_store(uri: str, reported: list[dict]) -> dict[str, Any]:
    """The store against what the processes reported: per run, every finite metric of every epoch of its
    history.json (folder from the run's ``run_dir`` tag) at that step with that value; runs not FINISHED; lines of
    the processes' stderr holding a forbidden text."""
    from medseg.tracking import get_client

    client = get_client(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    expected = present = 0
    missing: list[str] = []
    for run in runs:
        history_file = Path(run.data.tags.get("run_dir", "")) / "history.json"
        history = json.loads(history_file.read_text()) if history_file.is_file() else []
        logged: dict[str, dict[int, float]] = {}
        for record in history:
            for key, value in record.items():
                if key == "epoch" or not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                expected += 1
                if key not in logged:
                    logged[key] = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                if math.isclose(logged[key].get(record["epoch"], math.nan), value, rel_tol=1e-9, abs_tol=1e-12):
                    present += 1
                else:
                    missing.append(f"{run.info.run_name}:{key}@{record['epoch']}")
    error_lines = [line for r in reported for line in r["stderr"].splitlines() if any(t in line for t in FORBIDDEN)]
    run_ids = {r.info.run_id for r in runs}
    return {"processes": len(reported), "exit_codes": [r["returncode"] for r in reported],
            "failed_processes": sum(r["returncode"] != 0 for r in reported),
            "runs": len(runs), "runs_reported_missing": sum(r["run_id"] not in run_ids for r in reported),
            "runs_left_running": sum(r.info.status == "RUNNING" for r in runs),
            "runs_not_finished": sum(r.info.status != "FINISHED" for r in runs),
            "metrics_expected": expected, "metrics_present": present, "missing": missing[:20],
            "lock_errors": sum(any(t in line for t in FORBIDDEN[:2]) for line in error_lines),
            "error_lines": error_lines[:10],
            "stderr_tails": [r["stderr"].strip()[-400:] for r in reported if r["returncode"] != 0][:4]}


def one_round(work: Path, config: dict[str, Any], processes: int = PROCESSES) -> dict[str, Any]:
    """One round: ``processes`` train.py runs released together on the store of ``config`` (which must not exist
    yet), the store checked (``check_store``), the wall time."""
    uri = config["output"]["tracking_uri"]
    started = time.perf_counter()
    reported = start_together(work, config, processes)
    return {**check_store(uri, reported), "seconds": round(time.perf_counter() - started, 1)}


def mlflow_alone_round(work: Path, processes: int = PROCESSES) -> dict[str, Any]:
    """The race without medseg's schema lock: ``processes`` plain MlflowClients released together on a new store;
    how many failed, and with what (the last line of each failure)."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    reported = release_together(work, [["-c", GATED_MLFLOW_ALONE, str(work / "gate"), uri]] * processes)
    failures = [_last_error_line(r["stderr"]) or f"exit {r['returncode']}" for r in reported if r["returncode"] != 0]
    return {"processes": processes, "failed_processes": len(failures), "errors": failures}


def _last_error_line(stderr: str) -> str | None:
    """The last ``SomeError: message`` line of a traceback on ``stderr`` (SQLAlchemy adds lines after it)."""
    lines = [line for line in stderr.splitlines() if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return lines[-1][:200] if lines else None


def lost_nothing(result: dict[str, Any]) -> bool:
    return (result["failed_processes"] == 0 and result["runs"] == result["processes"]
            and result["runs_reported_missing"] == 0 and result["runs_not_finished"] == 0
            and result["metrics_present"] == result["metrics_expected"] > 0 and not result["error_lines"])


def run(quick: bool, rounds: int | None = None, processes: int = PROCESSES) -> dict[str, Any]:
    """``rounds`` rounds (``ROUNDS``; ``QUICK_ROUNDS`` when quick), each on a new store, summed."""
    from medseg.config import config_from_dict
    from medseg.data.cache import build_cache
    from medseg.data.synthetic import generate_task

    rounds = rounds or (QUICK_ROUNDS if quick else ROUNDS)
    results, alone = [], []
    with tempfile.TemporaryDirectory(prefix="medseg-concurrent-") as tmp:
        data = Path(tmp) / "data"
        generate_task(data, cases=8, size=64, slices=(6, 10), seed=0)
        cache = Path(tmp) / "cache"
        base = tiny_config(data, cache, Path(tmp))
        build_cache(config_from_dict(base, source="concurrent").dataset, progress=False)  # tracking, not the cache
        for i in range(rounds):
            work = Path(tmp) / f"round{i}"
            work.mkdir()
            result = one_round(work, tiny_config(data, cache, work), processes)
            print(f"round {i}: {json.dumps(result)}", flush=True)
            results.append(result)
            (Path(tmp) / f"alone{i}").mkdir()
            alone.append(mlflow_alone_round(Path(tmp) / f"alone{i}", processes))
            print(f"round {i}, MLflow alone: {json.dumps(alone[-1])}", flush=True)
    keys = ("failed_processes", "runs", "runs_reported_missing", "runs_left_running", "runs_not_finished",
            "metrics_expected", "metrics_present", "lock_errors")
    totals = {key: sum(r[key] for r in results) for key in keys}
    return {"processes": processes, "rounds": rounds, **totals,
            "error_lines": sum(len(r["error_lines"]) for r in results),
            "seconds_per_round": [r["seconds"] for r in results],
            "nothing_lost": all(lost_nothing(r) for r in results), "rounds_detail": results,
            # the same start without medseg's schema lock: plain MlflowClients on a new store (what it fixes)
            "mlflow_alone": {"processes": processes * rounds,
                             "failed_processes": sum(r["failed_processes"] for r in alone),
                             "errors": sorted({e for r in alone for e in r["errors"]})[:8]},
            "tests": "tests/test_concurrent_tracking.py"}


def main() -> int:
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
