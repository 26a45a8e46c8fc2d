#!/usr/bin/env python
"""A real MLflow tracking server (issue 14, guarantee 3): ``mlflow server`` on 127.0.0.1 (a free port, a sqlite
backend and a local artifact destination in a work folder, artifacts proxied through the server), train.py runs
tracked into it through ``MLFLOW_TRACKING_URI``, and the server killed (SIGKILL) in the middle of a run and restarted
on the same port and store.

``TrackingServer`` starts, waits for (``/health``), kills and restarts one server; tests/test_tracking_server.py and
``run(quick)`` (the tracking_server section of benchmarks/bench_reliability.py) use it.

  python benchmarks/reliability_server.py          (prints the section)
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from benchmarks.reliability_concurrency import child_env, tiny_config

REPO = Path(__file__).resolve().parents[1]
MLFLOW = Path(sys.executable).parent / "mlflow"  # the venv's executable, beside its python
EXPERIMENT = "server"
READY_TIMEOUT_S = 300.0  # bounds a hang only: a loaded machine starts the server in seconds to a minute


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TrackingServer:
    """One ``mlflow server`` process (its own process group: killed with its workers) on ``root/mlflow.db`` and
    ``root/artifacts``; ``kill`` then ``start`` again restarts it on the same port and store."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = READY_TIMEOUT_S) -> TrackingServer:
        log = open(self.root / f"server-{self.starts}.log", "wb")
        cmd = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", ""))
                                                           if p)}
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        self.starts += 1
        self.wait_ready(timeout)
        return self

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"mlflow server on {self.uri} did not answer within {timeout:.0f} s")
            time.sleep(0.2)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.root.glob("server-*.log")))

    def kill(self) -> None:
        """SIGKILL the server and every process of its group (its workers), and wait for it."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        self.proc = None

    def __enter__(self) -> TrackingServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def server_config(data_root: Path, cache_dir: Path, work: Path, *, epochs: int = 2) -> dict[str, Any]:
    """The tiny 1-process config of benchmarks/reliability_concurrency.py, ``epochs`` epochs, no tracking URI of its
    own: the store is ``MLFLOW_TRACKING_URI``."""
    cfg = tiny_config(data_root, cache_dir, work)
    cfg["name"] = "server"
    cfg["training"] = {**cfg["training"], "epochs": epochs}
    cfg["output"] = {"run_dir": str(work / "runs"), "experiment": EXPERIMENT}
    return cfg


def start_train(work: Path, cfg: dict, uri: str, **env: str) -> subprocess.Popen:
    """train.py of ``cfg`` tracked into ``uri`` (stdout, stderr piped)."""
    path = work / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(path), "--quiet"], cwd=work,
                            env={**child_env(), "MLFLOW_TRACKING_URI": uri, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def tracked_runs(uri: str) -> list[dict]:
    """Each run of the experiment on the server: status, metric steps per key, artifacts, run_dir."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    out = []
    for run in client.search_runs([exp.experiment_id]) if exp else []:
        run_id = run.info.run_id
        history = json.loads((Path(run.data.tags["run_dir"]) / "history.json").read_text()) \
            if "run_dir" in run.data.tags and (Path(run.data.tags["run_dir"]) / "history.json").exists() else []
        expected = {(k, int(epoch["epoch"])) for epoch in history for k, v in epoch.items()
                    if k in ("val/dice", "train/loss", "val/loss", "lr") and isinstance(v, (int, float))}
        present = {(k, m.step) for k in {k for k, _ in expected} for m in client.get_metric_history(run_id, k)}
        out.append({"run_id": run_id, "status": run.info.status, "artifact_uri": run.info.artifact_uri,
                    "checkpoint": [a.path for a in client.list_artifacts(run_id, "checkpoint")],
                    "metrics_expected": len(expected), "metrics_present": len(expected & present),
                    "epochs": len(history)})
    return out


FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}  # each HTTP call short; medseg's bounded retry does the waiting


def _first_epoch_logged(uri: str) -> bool:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return bool(runs and client.get_metric_history(runs[0].info.run_id, "val/dice"))


def _wait(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"train.py ended or hung before its first epoch: {proc.communicate()}")
        time.sleep(0.2)


def scenario(kind: str, work: Path, data_root: Path, cache_dir: Path) -> dict[str, Any]:
    """One train.py against a fresh server: ``plain``; ``restart`` (server SIGKILLed after the first epoch, restarted
    2 s later on the same port and store); ``gone`` (killed for good, ``MEDSEG_TRACKING_SERVER_WAIT_S`` 10 s)."""
    epochs = {"plain": 2, "restart": 4, "gone": 30}[kind]
    env = {} if kind == "plain" else dict(FAST_HTTP, **({"MEDSEG_TRACKING_SERVER_WAIT_S": "10"} if kind == "gone"
                                                        else {}))
    with TrackingServer(work / "server") as srv:
        started = time.monotonic()
        proc = start_train(work, server_config(data_root, cache_dir, work, epochs=epochs), srv.uri, **env)
        killed_at = None
        try:
            if kind != "plain":
                _wait(proc, lambda: _first_epoch_logged(srv.uri))
                srv.kill()
                killed_at = time.monotonic()
                if kind == "restart":
                    time.sleep(2)
                    srv.start()
            _, err = proc.communicate(timeout=1200)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        ended = time.monotonic()
        if kind == "gone":
            srv.start()  # read back what the store kept
        runs = tracked_runs(srv.uri)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    run = runs[0] if len(runs) == 1 else {}
    result = {"kind": kind, "exit_code": proc.returncode, "runs": len(runs), "status": run.get("status"),
              "epochs": run.get("epochs"), "metrics_expected": run.get("metrics_expected", 0),
              "metrics_present": run.get("metrics_present", 0), "checkpoint_on_server": bool(run.get("checkpoint")),
              "traceback": "Traceback" in err, "error_lines": errors, "seconds": round(ended - started, 1),
              "seconds_after_kill": None if killed_at is None else round(ended - killed_at, 1)}
    if kind == "gone":
        result["kept"] = (proc.returncode == 1 and len(errors) == 1 and "did not answer" in errors[0]
                          and not result["traceback"] and result["metrics_present"] >= 1)
    else:
        result["kept"] = (proc.returncode == 0 and result["status"] == "FINISHED" and result["checkpoint_on_server"]
                          and result["metrics_present"] == result["metrics_expected"] == 4 * epochs
                          and not result["traceback"])
    return result


def run(quick: bool) -> dict[str, Any]:
    """The tracking_server section: a plain run, ``restart`` kills (1 quick, 3 full) and one server gone for good."""
    from medseg.data.synthetic import generate_task

    kinds = ["plain", "restart", "gone"] if quick else ["plain", "restart", "restart", "restart", "gone"]
    results = []
    with tempfile.TemporaryDirectory(prefix="medseg-server-") as tmp:
        data_root = Path(tmp) / "data"
        generate_task(data_root, cases=8, size=64, slices=(6, 10), seed=0)
        for i, kind in enumerate(kinds):
            results.append(scenario(kind, Path(tmp) / f"{i}-{kind}", data_root, Path(tmp) / "cache"))
            print(json.dumps(results[-1]), flush=True)
    restarts = [r for r in results if r["kind"] == "restart"]
    return {"runs_tried": len(results), "server_kills": len([r for r in results if r["kind"] != "plain"]),
            "restarts_survived": sum(r["kept"] for r in restarts), "restarts_tried": len(restarts),
            "metrics_expected": sum(r["metrics_expected"] for r in results if r["kind"] != "gone"),
            "metrics_present": sum(r["metrics_present"] for r in results if r["kind"] != "gone"),
            "server_gone_one_line_errors": sum(r["kept"] for r in results if r["kind"] == "gone"),
            "tracebacks": sum(r["traceback"] for r in results),
            "nothing_lost": all(r["kept"] for r in results), "results": results,
            "tests": "tests/test_tracking_server.py"}


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
