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


def kill_server_during(proc: subprocess.Popen, srv: TrackingServer, ready, *, restart: bool, wait_s: float = 600,
                       timeout: float = 1200) -> tuple[str, float | None]:
    """Once ``ready()`` holds (``ready`` None: never), SIGKILL the server, and start it again 2 s later when
    ``restart``; then wait for ``proc`` (killed if it outlives ``timeout``). Its stderr and the time of the kill."""
    killed_at = None
    try:
        if ready is not None:
            _wait(proc, ready, timeout=wait_s)
            srv.kill()
            killed_at = time.monotonic()
            if restart:
                time.sleep(2)
                srv.start()
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return err, killed_at


def scenario(kind: str, work: Path, data_root: Path, cache_dir: Path) -> dict[str, Any]:
    """One train.py against a fresh server: ``plain``; ``restart`` (server SIGKILLed after the first epoch, restarted
    2 s later on the same port and store); ``gone`` (killed for good, ``MEDSEG_TRACKING_SERVER_WAIT_S`` 10 s)."""
    epochs = {"plain": 2, "restart": 4, "gone": 30}[kind]
    env = {} if kind == "plain" else dict(FAST_HTTP, **({"MEDSEG_TRACKING_SERVER_WAIT_S": "10"} if kind == "gone"
                                                        else {}))
    with TrackingServer(work / "server") as srv:
        started = time.monotonic()
        proc = start_train(work, server_config(data_root, cache_dir, work, epochs=epochs), srv.uri, **env)
        ready = None if kind == "plain" else lambda: _first_epoch_logged(srv.uri)
        err, killed_at = kill_server_during(proc, srv, ready, restart=kind == "restart")
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


STUDY_EXPERIMENT, STUDY_REGISTRY = "server-study", "srv-model"


def study_command(work: Path, data_root: Path, cache_dir: Path, *, trials: int = 3, epochs: int = 2) -> list[str]:
    """A small study (``trials`` trials of ``epochs`` epochs, one at a time, no early stopping) of the tiny config,
    tracked into ``MLFLOW_TRACKING_URI``; the tune.py command that runs it."""
    base = server_config(data_root, cache_dir, work, epochs=epochs)
    work.mkdir(parents=True, exist_ok=True)
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    space = {"name": "srv", "base_config": "base.yaml", "num_samples": trials, "max_concurrent": 1,
             "resources": {"cpu": 1}, "max_failures": 0, "storage_path": str(work / "ray"),
             "asha": {"enabled": False, "max_t": epochs}, "experiment": STUDY_EXPERIMENT,
             "reports_dir": str(work / "reports"),
             "params": {"training.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
             "champion": {"registry_name": STUDY_REGISTRY, "models_dir": str(work / "models"),
                          "bootstrap_resamples": 200}}
    (work / "space.yaml").write_text(yaml.safe_dump(space))
    return [sys.executable, str(REPO / "tune.py"), "--space", str(work / "space.yaml"), "--name", "srv",
            "--num-cpus", "2"]


def _trial_epoch_logged(uri: str) -> bool:
    """A trial's first epoch is on the server."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(STUDY_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], "tags.trial_id != ''") if exp else []
    return any(client.get_metric_history(r.info.run_id, "val/dice") for r in runs)


def study_scenario(kind: str, work: Path, data_root: Path, cache_dir: Path) -> dict[str, Any]:
    """tune.py against a fresh server killed (SIGKILL) once a trial's first epoch is on it: ``study_restart``
    (restarted 2 s later on the same port and store: the study waits and finishes, its champion registered on the
    server with its decision) or ``study_gone`` (killed for good, ``MEDSEG_TRACKING_SERVER_WAIT_S`` 10 s: the study
    stops with one error line, no champion alias anywhere, and ``--resume`` finishes it once the server is back)."""
    env = {**child_env(), "MLFLOW_TRACKING_URI": "", "PYTHONUNBUFFERED": "1", **FAST_HTTP,
           **({"MEDSEG_TRACKING_SERVER_WAIT_S": "10"} if kind == "study_gone" else {})}
    cmd = study_command(work, data_root, cache_dir)
    resumed = None
    with TrackingServer(work / "server") as srv:
        env["MLFLOW_TRACKING_URI"] = srv.uri
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        err, killed_at = kill_server_during(proc, srv, lambda: _trial_epoch_logged(srv.uri),
                                            restart=kind == "study_restart", wait_s=900, timeout=1800)
        ended = time.monotonic()
        if kind == "study_gone":
            srv.start()
            from mlflow import MlflowClient

            alias_after_stop = _champion_version(MlflowClient(srv.uri))
            again = subprocess.run(cmd + ["--resume"], cwd=work, env=env, capture_output=True, text=True,
                                   timeout=1800)
            resumed = {"exit_code": again.returncode, "traceback": "Traceback" in again.stderr,
                       "alias_before_resume": alias_after_stop}
        from mlflow import MlflowClient

        client = MlflowClient(srv.uri)
        exp = client.get_experiment_by_name(STUDY_EXPERIMENT)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        champion = _champion_version(client)
        report = work / "reports" / "srv.json"
        decision = json.loads(report.read_text())["decision"] if report.exists() else None
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    result = {"kind": kind, "exit_code": proc.returncode, "runs": len(runs),
              "statuses": sorted(r.info.status for r in runs), "champion_version": champion,
              "decision_promoted": None if decision is None else decision["promoted"],
              "decision_version": None if decision is None else decision["version"],
              "traceback": "Traceback" in err, "error_lines": errors, "resumed": resumed,
              "seconds": round(ended - started, 1), "seconds_after_kill": round(ended - killed_at, 1)}
    finished = (len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs) and decision is not None
                and str(champion) == str(decision["version"]) and decision["promoted"])
    if kind == "study_restart":
        result["kept"] = proc.returncode == 0 and finished and not result["traceback"]
    else:
        result["kept"] = (proc.returncode != 0 and len(errors) == 1 and not result["traceback"]
                          and resumed["alias_before_resume"] is None and resumed["exit_code"] == 0
                          and not resumed["traceback"] and finished)
    return result


def _champion_version(client) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(STUDY_REGISTRY, "champion").version)
    except MlflowException:
        return None


def run(quick: bool) -> dict[str, Any]:
    """The tracking_server section: a plain run, ``restart`` kills (1 quick, 3 full) and one server gone for good."""
    from medseg.data.synthetic import generate_task

    kinds = ["plain", "restart", "gone"] if quick else ["plain", "restart", "restart", "restart", "gone",
                                                         "study_restart", "study_gone"]
    results = []
    with tempfile.TemporaryDirectory(prefix="medseg-server-") as tmp:
        data_root = Path(tmp) / "data"
        generate_task(data_root, cases=8, size=64, slices=(6, 10), seed=0)
        for i, kind in enumerate(kinds):
            work = Path(tmp) / f"{i}-{kind}"
            run_one = study_scenario if kind.startswith("study_") else scenario
            results.append(run_one(kind, work, data_root, Path(tmp) / "cache"))
            print(json.dumps(results[-1]), flush=True)
    restarts = [r for r in results if r["kind"] == "restart"]
    studies = [r for r in results if r["kind"].startswith("study_")]
    results = [r for r in results if not r["kind"].startswith("study_")]
    return {"runs_tried": len(results), "server_kills": len([r for r in results if r["kind"] != "plain"]),
            "restarts_survived": sum(r["kept"] for r in restarts), "restarts_tried": len(restarts),
            "metrics_expected": sum(r["metrics_expected"] for r in results if r["kind"] != "gone"),
            "metrics_present": sum(r["metrics_present"] for r in results if r["kind"] != "gone"),
            "server_gone_one_line_errors": sum(r["kept"] for r in results if r["kind"] == "gone"),
            "tracebacks": sum(r["traceback"] for r in results),
            "studies_tried": len(studies), "studies_kept": sum(r["kept"] for r in studies), "studies": studies,
            "nothing_lost": all(r["kept"] for r in results + studies), "results": results,
            "tests": "tests/test_tracking_server.py"}


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
