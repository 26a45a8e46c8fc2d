"""tune.py as a user runs it: Ctrl-C and --resume, and a study on a two-node Ray cluster (two raylets on loopback)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medseg.tracking import get_client
from tests.conftest import tiny_config_dict
from tests.fixtures import wait_while_running

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _study_files(tmp_path, synth_root, shared_cache, **space_fields) -> Path:
    base = tiny_config_dict(synth_root, shared_cache, tmp_path, training={"epochs": 2})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    space = {"name": "s", "base_config": "base.yaml", "num_samples": 3, "max_concurrent": 1, "resources": {"cpu": 1},
             "asha": {"enabled": False, "max_t": 2}, "max_failures": 0, "storage_path": str(tmp_path / "ray"),
             "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "cli-tests",
             "reports_dir": str(tmp_path / "reports"),
             "params": {"training.lr": {"type": "loguniform", "low": 0.001, "high": 0.01}},
             "champion": {"registry_name": "cli-model", "models_dir": str(tmp_path / "models"),
                          "bootstrap_resamples": 1000}}
    space.update(space_fields)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _histories(study_dir: Path) -> dict[str, int]:
    out = {}
    for path in study_dir.glob("artifacts/*/history.json"):
        try:
            out[path.parent.name] = len(json.loads(path.read_text()))
        except ValueError:  # being rewritten
            pass
    return out


# ~2 min on 2 cores: in make test-slow, so that make test stays near its time budget
@pytest.mark.slow
def test_ctrl_c_then_resume_does_not_rerun_finished_trials(tmp_path, synth_root, shared_cache):
    space = _study_files(tmp_path, synth_root, shared_cache)
    study_dir = tmp_path / "ray" / "resumable"
    cmd = [sys.executable, str(ROOT / "tune.py"), "--space", str(space), "--name", "resumable", "--num-cpus", "2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until one trial has finished both epochs while another is between its epochs: with max_concurrent 1 the
    # driver starts a trial only after it has processed the previous one's completion, so every 2-epoch trial seen
    # then is finished for the driver too. (A trial whose last epoch is on disk when Ctrl-C lands can still be
    # unfinished for the driver: the interrupt decides its status, not this test.)

    def one_done_one_between_epochs():
        done = _histories(study_dir)
        return done if any(n == 2 for n in done.values()) and any(n == 1 for n in done.values()) else None

    # A trial is between its epochs for one epoch only (a fraction of a second on a fast CPU): poll well inside that.
    done = wait_while_running(proc, one_done_one_between_epochs, timeout=600, what="the study's second trial",
                              poll=0.02)
    first_done = {t for t, n in done.items() if n == 2}
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err  # RunInterrupted: Tune saved the study on Ctrl-C (medseg.cli)
    assert "interrupted" in err and "--resume --name resumable" in err
    client = get_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("cli-tests").experiment_id
    runs = {r.data.tags.get("trial_id"): r for r in client.search_runs([experiment_id])}
    finished_before = {t for t, r in runs.items() if t and r.info.status == "FINISHED"}
    assert first_done and first_done <= finished_before
    assert runs[None].info.status == "KILLED"  # the study run
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs.values())

    proc = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "reports" / "resumable.json").read_text())
    assert report["n_trials"] == 3 and report["status_counts"]["completed"] == 3
    runs = {r.data.tags.get("trial_id"): r for r in client.search_runs([experiment_id])}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert len([t for t in runs if t]) == 3  # no trial got a second run
    for trial_id in finished_before:  # finished trials were not trained again
        assert [m.step for m in client.get_metric_history(runs[trial_id].info.run_id, "val/dice")] == [1, 2]
    assert str(client.get_model_version_by_alias("cli-model", "champion").version) == "1"


@pytest.mark.slow  # ~1 min: in make test-slow, so that make test stays near its time budget
def test_resume_of_a_configs_study_looks_for_the_named_study(tmp_path, synth_root, shared_cache):
    space = _study_files(tmp_path, synth_root, shared_cache)
    base = str(tmp_path / "base.yaml")

    def resume(*extra):
        cmd = [sys.executable, str(ROOT / "tune.py"), "--space", str(space), "--configs", base, "--resume", *extra]
        return subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)

    # the name printed by an interrupted `--configs` study is the study's own (experiments-<timestamp>)
    named = resume("--name", "experiments-20260101-000000")
    assert named.returncode == 2
    assert f"{tmp_path / 'ray' / 'experiments-20260101-000000'} holds no resumable study" in named.stderr
    latest = resume()  # no name: the latest study of `experiments`
    assert latest.returncode == 2 and "no unfinished study of space 'experiments'" in latest.stderr


@pytest.mark.slow
def test_study_on_a_two_node_cluster(tmp_path, synth_root, shared_cache):
    """`ray start --head` + `ray start --address` on loopback (two raylets, one CPU each); trials land on both."""
    port = 6400 + os.getpid() % 1000  # below the worker port range (10002-19999)
    # `ray start --head` enables token authentication; joining nodes and drivers must say they use it too
    env = {**_env(), "RAY_AUTH_MODE": "token"}
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                        "--node-ip-address=127.0.0.1", "--disable-usage-stats"], env=env, check=True,
                       capture_output=True, timeout=300)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                        "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=300)
        space = _study_files(tmp_path, synth_root, shared_cache, num_samples=2, max_concurrent=2)
        proc = subprocess.run([sys.executable, str(ROOT / "tune.py"), "--space", str(space), "--name", "cluster",
                               "--address", f"127.0.0.1:{port}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr
        report = json.loads((tmp_path / "reports" / "cluster.json").read_text())
        nodes = {t["node_id"] for t in report["trials"]}
        assert report["status_counts"]["completed"] == 2 and len(nodes) == 2, nodes
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)


@pytest.mark.slow  # ~1 min: in make test-slow, so that make test stays near its time budget
def test_killed_trial_process_retries_from_its_last_checkpoint(tmp_path, synth_root, shared_cache):
    """A trial whose worker dies (SIGKILL mid-training) is retried from its last tune.Checkpoint, not from scratch."""
    import psutil

    space = _study_files(tmp_path, synth_root, shared_cache, num_samples=1, max_failures=1,
                         asha={"enabled": False, "max_t": 3})
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["training"].update(epochs=4, samples_per_epoch=64)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    cmd = [sys.executable, str(ROOT / "tune.py"), "--space", str(space), "--name", "retry", "--num-cpus", "2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = get_client(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def logged_epochs() -> list[int]:
        exp = client.get_experiment_by_name("cli-tests")
        runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'") if exp else []
        return [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/dice")] if runs else []

    # Tune's driver logs a result (our callback) before it registers that result's checkpoint, so a kill right after
    # epoch 1 appears may still restart from scratch. Once epoch 2 appears, epoch 1's checkpoint is registered.
    # The trial ends two epochs after its second one is logged: poll (and kill) well inside that on a fast CPU.
    wait_while_running(proc, lambda: 2 in logged_epochs(), timeout=600, what="the trial's second epoch", poll=0.05)

    def is_trial_worker(p) -> bool:
        try:
            return any("ImplicitFunc" in part for part in p.cmdline())
        except psutil.Error:  # exited meanwhile
            return False

    # this study's workers only (its local Ray runs under the driver), not those of other Ray sessions on the machine
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if is_trial_worker(p)]
    assert workers, "no trial worker process found"
    for worker in workers:
        worker.kill()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    experiment_id = client.get_experiment_by_name("cli-tests").experiment_id
    run = client.search_runs([experiment_id], filter_string="tags.kind = 'trial'")[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("retries") == "1", run.data.tags  # the kill hit a running trial, which Tune retried
    # restored from a reported checkpoint: epoch 1 logged once (a restart from scratch would log it twice); epoch 2 is
    # logged again only if the kill fell between its result and the registration of its checkpoint
    logged = logged_epochs()
    assert sorted(set(logged)) == [1, 2, 3, 4] and logged.count(1) == 1, logged
    assert all(logged.count(e) == 1 for e in (1, 3, 4)), logged
