"""A real MLflow tracking server (issue 14, guarantee 3): `mlflow server` on 127.0.0.1 (sqlite backend, local artifact
destination, artifacts proxied), train.py tracked into it through MLFLOW_TRACKING_URI; the server killed in the middle
of a run and restarted on the same port and store (the run waits and finishes), or gone for good (one error line
naming the server, within a bounded time, never a hang)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from benchmarks.reliability_server import TrackingServer, free_port, server_config, start_train, tracked_runs
from tests.fixtures import wait_while_running

ROOT = Path(__file__).resolve().parents[1]

# Each MLflow HTTP call tries twice (1 s pause); medseg's own bounded retry (tracking.server_wait_s) does the waiting.
FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@pytest.fixture
def server(tmp_path):
    srv = TrackingServer(tmp_path / "server")
    try:
        yield srv.start()
    finally:
        srv.kill()


def _first_epoch_logged(uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("server")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return runs[0] if runs and client.get_metric_history(runs[0].info.run_id, "val/dice") else None


def _finish(proc, timeout: float = 900):
    try:
        return proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise


def test_train_run_is_tracked_on_a_real_server(server, tmp_path, synth_root, shared_cache):
    proc = start_train(tmp_path, server_config(synth_root, shared_cache, tmp_path, epochs=2), server.uri)
    out, err = _finish(proc)
    assert proc.returncode == 0, err
    [run] = tracked_runs(server.uri)
    assert run["status"] == "FINISHED" and run["epochs"] == 2
    assert run["metrics_present"] == run["metrics_expected"] == 8  # 4 metrics x 2 epochs, read back from the server
    assert run["checkpoint"] == ["checkpoint/best.pt"]
    assert run["artifact_uri"].startswith("mlflow-artifacts:/")  # proxied: the bytes went through the server
    stored = list((server.root / "artifacts").rglob("best.pt"))
    assert len(stored) == 1 and stored[0].stat().st_size > 0
    assert "Traceback" not in err


def test_a_server_that_does_not_answer_is_one_error_line_in_bounded_time(tmp_path, synth_root, shared_cache):
    """Nothing listens on the port: train.py waits MEDSEG_TRACKING_SERVER_WAIT_S, then one line naming the server."""
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = start_train(tmp_path, server_config(synth_root, shared_cache, tmp_path), uri,
                       MEDSEG_TRACKING_SERVER_WAIT_S="5", **FAST_HTTP)
    _, err = _finish(proc, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()  # one warning that it waits, then one error line; no urllib3 retry lines
    assert lines[0] == (f"WARNING medseg.tracking: {uri}: the tracking server does not answer; trying again for up "
                        "to 5 s")
    assert len(lines) == 2 and lines[1].startswith(f"error: {uri}: the tracking server did not answer"), err
    assert time.monotonic() - started < 600


@pytest.mark.slow
def test_a_server_killed_mid_run_and_restarted_the_run_waits_and_finishes(server, tmp_path, synth_root,
                                                                         shared_cache):
    proc = start_train(tmp_path, server_config(synth_root, shared_cache, tmp_path, epochs=6), server.uri,
                       **FAST_HTTP)
    wait_while_running(proc, lambda: _first_epoch_logged(server.uri), timeout=600, what="the first epoch")
    server.kill()  # SIGKILL: the server and its workers, mid-run
    time.sleep(2)
    server.start()  # same port, same store
    out, err = _finish(proc)
    assert proc.returncode == 0 and "Traceback" not in err, err
    [run] = tracked_runs(server.uri)
    assert run["status"] == "FINISHED" and run["epochs"] == 6
    assert run["metrics_present"] == run["metrics_expected"] == 24
    assert run["checkpoint"] == ["checkpoint/best.pt"]


@pytest.mark.slow
def test_a_server_killed_mid_run_for_good_is_one_error_line(server, tmp_path, synth_root, shared_cache):
    proc = start_train(tmp_path, server_config(synth_root, shared_cache, tmp_path, epochs=30), server.uri,
                       MEDSEG_TRACKING_SERVER_WAIT_S="10", **FAST_HTTP)
    run = wait_while_running(proc, lambda: _first_epoch_logged(server.uri), timeout=600, what="the first epoch")
    server.kill()
    _, err = _finish(proc, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "urllib3" not in err and len(errors) == 1, err
    assert errors[0].startswith(f"error: {server.uri}: the tracking server did not answer"), err
    server.start()  # the store kept what was logged before the kill
    from mlflow import MlflowClient

    assert 1 in {m.step for m in MlflowClient(server.uri).get_metric_history(run.info.run_id, "val/dice")}


@pytest.mark.slow
def test_a_study_registers_its_champion_on_the_server(server, tmp_path, synth_root, shared_cache):
    """tune.py (2 trials of 1 epoch) tracked into the server: trials FINISHED, the registry alias `champion` and the
    champion's checkpoint on the server."""
    import subprocess
    import sys

    import yaml
    from mlflow import MlflowClient

    from benchmarks.reliability_concurrency import child_env
    from tests.conftest import tiny_config_dict

    base = tiny_config_dict(synth_root, shared_cache, tmp_path, training={"epochs": 1, "samples_per_epoch": 16})
    base["output"].pop("tracking_uri")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    space = {"name": "srv", "base_config": "base.yaml", "metric": "val/loss", "mode": "min", "num_samples": 2,
             "max_concurrent": 1, "resources": {"cpu": 1}, "max_failures": 0, "storage_path": str(tmp_path / "ray"),
             "asha": {"max_t": 1, "grace_period": 1, "reduction_factor": 2},
             "experiment": "server-study", "reports_dir": str(tmp_path / "reports"),
             "params": {"training.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
             "champion": {"registry_name": "srv-model", "models_dir": str(tmp_path / "models"),
                          "bootstrap_resamples": 200, "margin": 0.01}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    proc = subprocess.run([sys.executable, str(ROOT / "tune.py"), "--space", str(tmp_path / "space.yaml"),
                           "--num-cpus", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=1500,
                          env={**child_env(), "MLFLOW_TRACKING_URI": server.uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("server-study")
    runs = client.search_runs([exp.experiment_id])
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    version = client.get_model_version_by_alias("srv-model", "champion")
    assert version.version
    assert list((server.root / "artifacts").rglob("*.pt"))  # checkpoints went through the server


@pytest.mark.slow
def test_a_server_killed_mid_study_and_restarted_the_study_finishes_with_its_champion(tmp_path, synth_root,
                                                                                      shared_cache):
    """tune.py (3 trials of 2 epochs) against a server SIGKILLed once a trial's first epoch is on it, restarted 2 s
    later: exit 0, every run FINISHED on the server, the champion alias on the version its decision names."""
    from benchmarks.reliability_server import study_scenario

    result = study_scenario("study_restart", tmp_path / "w", synth_root, shared_cache)
    assert result["kept"], result
    assert result["statuses"] == ["FINISHED"] * 4 and result["champion_version"] == "1"


@pytest.mark.slow
def test_a_server_killed_mid_study_for_good_stops_in_one_line_and_resumes(tmp_path, synth_root, shared_cache):
    """The server killed for good: the study stops with one error line and no traceback, no champion alias is set
    (never a promotion without its comparison); once the server is back, ``--resume`` finishes the study."""
    from benchmarks.reliability_server import study_scenario

    result = study_scenario("study_gone", tmp_path / "w", synth_root, shared_cache)
    assert result["exit_code"] != 0 and len(result["error_lines"]) == 1, result
    assert result["resumed"]["alias_before_resume"] is None, result
    assert result["kept"], result


def test_the_ui_link_printed_for_a_server_is_the_servers_own():
    from medseg.tracking import ui_url

    assert ui_url("3", uri="http://10.0.0.1:8080/") == "http://10.0.0.1:8080/#/experiments/3?workflowType=machine_learning"
    assert ui_url("3", uri="sqlite:///x.db") == "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"
