"""Concurrent tracking (issue 14, guarantee 2): processes writing to one embedded sqlite MLflow store at once lose no
run and no metric, leave no run RUNNING, and a store locked by another writer is retried, then refused in one line.
Real train.py processes, a real sqlite store, a real lock held by another connection."""
from __future__ import annotations

import random
import re
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from benchmarks.reliability_concurrency import (
    EXPERIMENT,
    GATED_TRAIN,
    REPO,
    check_store,
    child_env,
    lost_nothing,
    one_round,
    release_together,
)
from medseg.config import config_from_dict
from medseg.data.cache import build_cache
from tests.conftest import tiny_config_dict


# 4 train.py processes at once, 1-2 min on 2 cores: in make test-slow (its figure: bench_reliability.py)
@pytest.mark.slow
def test_four_train_runs_released_together_on_a_fresh_store_lose_nothing(synth_root, shared_cache, tmp_path):
    """No mlflow.db yet: the four processes reach it within milliseconds (gated after their imports), so each one's
    first use would create and migrate the schema at once ("table experiments already exists", a failed alembic
    migration: every process failed before get_client created the tables under a file lock)."""
    config = tiny_config_dict(synth_root, shared_cache, tmp_path, training={"epochs": 2, "samples_per_epoch": 16,
                                                                             "val_overlays": 0},
                              output={"experiment": EXPERIMENT})
    build_cache(config_from_dict(config, source="tiny").dataset, progress=False)
    assert not (tmp_path / "mlflow.db").exists()

    result = one_round(tmp_path, config, processes=4)

    assert result["exit_codes"] == [0, 0, 0, 0], result["stderr_tails"]
    assert result["error_lines"] == []  # no "database is locked", no OperationalError, no traceback
    assert result["runs"] == 4 and result["runs_reported_missing"] == 0
    assert result["runs_left_running"] == 0 and result["runs_not_finished"] == 0
    assert result["metrics_expected"] >= 4 * 2 * 8  # 4 runs, 2 epochs, train/val loss, Dice, IoU, lr, ...
    assert result["metrics_present"] == result["metrics_expected"], result["missing"]
    assert lost_nothing(result)


LOCKED_WRITER = r"""
import sys
from medseg import tracking
from medseg.cli import run_cli

uri, run_id, attempts = sys.argv[1], sys.argv[2], int(sys.argv[3])
tracking.LOCK_ATTEMPTS = attempts
client = tracking.get_client(uri)  # the store exists: opened before the lock is taken
print("ready", flush=True)
sys.stdin.readline()  # "go": the store is locked now


def main():
    tracking.log_metrics(client, run_id, {"val/dice": 0.5}, step=attempts)
    print("logged", flush=True)


run_cli(main)
"""


def test_lock_errors_are_retried_with_backoff_then_refused_in_one_line(tmp_path, monkeypatch):
    """``call_with_retries`` on a real sqlite database held by another connection: tried again (0.5 s, 1 s, ...)
    until the holder lets go; a database still held after the last try is one TrackingStoreError line naming the
    store. The jitter of the pauses never moves the global random generator that seeded training relies on."""
    from medseg import tracking

    db = tmp_path / "store.db"
    with sqlite3.connect(db) as setup:
        setup.execute("CREATE TABLE t (x)")
    uri, tries = f"sqlite:///{db}", []

    def insert() -> None:
        tries.append(time.monotonic())
        conn = sqlite3.connect(db, timeout=0.05)
        try:
            with conn:
                conn.execute("INSERT INTO t VALUES (1)")
        finally:
            conn.close()

    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(1.0, holder.execute, ("COMMIT",)).start()
    random.seed(7)
    state = random.getstate()
    tracking.call_with_retries(uri, insert)
    assert random.getstate() == state
    assert len(tries) >= 2 and tries[-1] - tries[0] >= 0.9  # locked at first, written once the holder committed
    assert sqlite3.connect(db).execute("SELECT count(*) FROM t").fetchone() == (1,)

    monkeypatch.setattr(tracking, "LOCK_ATTEMPTS", 3)
    holder.execute("BEGIN EXCLUSIVE")
    tries.clear()
    with pytest.raises(tracking.TrackingStoreError) as caught:
        tracking.call_with_retries(uri, insert)
    holder.execute("ROLLBACK")
    assert len(tries) == 3
    assert re.fullmatch(rf"{re.escape(uri)}: the tracking store stayed locked by other processes \(database is "
                        r"locked\) after 3 tries over \d+ s; run fewer jobs against this sqlite store at once, or "
                        r"point MLFLOW_TRACKING_URI at a tracking server", str(caught.value))
    with pytest.raises(ZeroDivisionError):  # any other error is not retried
        tracking.call_with_retries(uri, lambda: 1 / 0)


@pytest.mark.slow
def test_a_locked_store_is_retried_and_then_refused_in_one_line(tmp_path):
    """MLflow end to end (~30 s, most of it waiting): another connection holds the store exclusively for ~24 s;
    MLflow's sqlite sessions wait 20 s (busy_timeout) and then fail with "database is locked". A writer allowed one
    try gives up in one line naming the store; a writer allowed four waits, tries again after the lock is released,
    and its metric is in the store."""
    from medseg.tracking import ensure_experiment, get_client, start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = get_client(uri)
    run_id = start_run(client, ensure_experiment(uri, "locked"), run_name="r", params={}, tags={})
    writers = {attempts: subprocess.Popen([sys.executable, "-c", LOCKED_WRITER, uri, run_id, str(attempts)],
                                          cwd=tmp_path, env=child_env(), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for attempts in (1, 4)}
    for proc in writers.values():
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for proc in writers.values():
            proc.stdin.write("go\n")
            proc.stdin.flush()
        gave_up = writers[1]
        out, err = gave_up.communicate(timeout=120)
        held = time.monotonic()
        time.sleep(3)  # past the second writer's first 20 s wait and into its next try
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert gave_up.returncode == 1 and "logged" not in out
    assert len(err.splitlines()) == 1, err
    assert re.fullmatch(rf"error: {re.escape(uri)}: the tracking store stayed locked by other processes \(database is "
                        r"locked\) after 1 try over 2\d s; run fewer jobs against this sqlite store at once, or "
                        r"point MLFLOW_TRACKING_URI at a tracking server", err.strip()), err
    out, err = writers[4].communicate(timeout=120)
    assert writers[4].returncode == 0 and out.splitlines()[-1] == "logged", err
    assert "locked" not in err and "Traceback" not in err  # MLflow's logged traceback of each locked try is dropped
    assert time.monotonic() - held < 60
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/dice")] == [(4, 0.5)]


@pytest.mark.slow
def test_a_study_of_four_concurrent_trials_beside_train_runs_on_a_fresh_store(synth_root, shared_cache, tmp_path):
    """tune.py (a Ray Tune study, 4 trials at once on 2 CPUs, its MLflow calls from the driver) and two train.py runs
    released together on a fresh store: the study's parent run, its 4 trial runs and both train.py runs are there
    and FINISHED, every metric of every epoch of each run's history.json is in its run."""
    import yaml

    config = tiny_config_dict(synth_root, shared_cache, tmp_path, training={"epochs": 1, "samples_per_epoch": 16,
                                                                             "val_overlays": 0},
                              output={"experiment": EXPERIMENT})
    build_cache(config_from_dict(config, source="tiny").dataset, progress=False)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(config))
    space = {"name": "concurrent", "base_config": "base.yaml", "metric": "val/loss", "mode": "min", "num_samples": 4,
             "max_concurrent": 4, "resources": {"cpu": 0.5}, "asha": {"max_t": 1, "grace_period": 1},
             "max_failures": 0, "storage_path": str(tmp_path / "ray"), "tracking_uri": config["output"]["tracking_uri"],
             "experiment": EXPERIMENT, "reports_dir": str(tmp_path / "reports"),
             "champion": {"registry_name": "concurrent", "models_dir": str(tmp_path / "models")},
             "params": {"training.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    commands = [["-c", GATED_TRAIN, str(tmp_path / "gate"), str(REPO / "tune.py"), "--space",
                 str(tmp_path / "space.yaml"), "--no-promote", "--num-cpus", "2", "--cold"]]
    for i in range(2):
        path = tmp_path / f"p{i}.yaml"
        path.write_text(yaml.safe_dump({**config, "output": {**config["output"], "run_name": f"p{i}"}}))
        commands.append(["-c", GATED_TRAIN, str(tmp_path / "gate"), str(REPO / "train.py"), "--config", str(path),
                         "--quiet"])
    assert not (tmp_path / "mlflow.db").exists()

    reported = release_together(tmp_path, commands, timeout=900)
    result = check_store(config["output"]["tracking_uri"], reported)

    assert result["exit_codes"] == [0, 0, 0], result["stderr_tails"]
    assert result["error_lines"] == []
    assert result["runs"] == 1 + 4 + 2  # the study's parent run, its trials, the train.py runs
    assert result["runs_left_running"] == 0 and result["runs_not_finished"] == 0
    assert result["metrics_expected"] >= 6 * 8  # 4 trials and 2 train.py runs, one epoch each
    assert result["metrics_present"] == result["metrics_expected"], result["missing"]
